"""nsa_ext: Native Sparse Attention (DeepSeek, arXiv 2502.11089) for PyTorch.

Operators live in ``torch.ops.nsa``; this package adds their fake tensors and autograd
(``nsa_ext.ops``), the user-facing functions (``nsa_ext.functional``) and a pure-PyTorch
reference of every operator (``nsa_ext.reference``).
"""

import torch

from . import _build_config

if torch.__version__ != _build_config.TORCH_VERSION:
    raise ImportError(
        f"nsa_ext was built against torch {_build_config.TORCH_VERSION}, but torch {torch.__version__} "
        "is installed; rebuild it against this torch: "
        "pip install --no-build-isolation --force-reinstall --no-deps <path to nsa_ext>"
    )

from . import _C  # noqa: E402  (loading it registers the torch.ops.nsa operators)
from . import ops  # noqa: E402,F401  (fake tensors and autograd of those operators)
from . import reference  # noqa: E402,F401
from . import compression  # noqa: E402,F401
from .compression import LinearCompression, MeanCompression, MLPCompression, make_compression  # noqa: E402
from .config import NSAConfig, validate_config  # noqa: E402
from .functional import (compressed_attention, native_sparse_attention,  # noqa: E402
                         native_sparse_attention_with_kvcache, select_blocks, selection_attention,
                         sliding_window_attention, validate_block_indices)
from .cache import NSACache  # noqa: E402
from .modules import NativeSparseAttention, RotaryEmbedding  # noqa: E402
from .seqlens import compressed_seqlens  # noqa: E402

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """How this build was made: package version, torch it was built against, CUDA version and
    compiled architectures, whether CUDA kernels are in, and the head dims (Dk) with tensor-core
    kernels (`tiled_head_dims`; other head dims and fp32/fp64 run the baseline CUDA kernels)."""
    return dict(_C.build_info())


__all__ = [
    "LinearCompression",
    "MLPCompression",
    "MeanCompression",
    "NSACache",
    "NSAConfig",
    "NativeSparseAttention",
    "RotaryEmbedding",
    "build_info",
    "compressed_attention",
    "compressed_seqlens",
    "compression",
    "make_compression",
    "native_sparse_attention",
    "native_sparse_attention_with_kvcache",
    "reference",
    "select_blocks",
    "selection_attention",
    "sliding_window_attention",
    "validate_block_indices",
    "validate_config",
]
