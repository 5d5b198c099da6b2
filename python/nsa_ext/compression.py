"""Compression of keys and values into block tokens: the learnable map phi of spec section 1.

Compressed token i of a sequence summarises its keys ``[i*d, i*d + l)`` (``l = compress_block``,
``d = compress_stride``); a sequence of TK keys has ``TC = max(0, (TK - l) // d + 1)`` tokens. Every
module here maps

- padded ``k [B, TK, Hk, D]`` to ``k_cmp [B, TC, Hk, D]``, or
- packed ``k [total_k, Hk, D]`` with int32 ``cu_seqlens_k [N+1]`` to ``k_cmp [total_c, Hk, D]``, whose
  row offsets are ``cu_seqlens_c = nsa_ext.compressed_seqlens(cu_seqlens_k, l, d)``.

The compressed-key ops (``compressed_attention``, ``select_blocks``) take the ORIGINAL
``cu_seqlens_k`` and derive those offsets themselves, so the modules return only the tensor. The same
modules compress values (D is then Dv). They are plain PyTorch: one gather (``unfold`` or an index
tensor, no Python loop over tokens) followed by batched matmuls, differentiable in k and in every
parameter. Parameters are float32; ``.to(dtype)`` the module for other input dtypes.

Variants:

- ``MeanCompression``: the average of the block (no parameters).
- ``LinearCompression``: a learned intra-block position embedding ``[Hk, l, D]`` is added, the block is
  flattened to ``l*D`` and projected by a per-kv-head weight ``[Hk, l*D, D]``. Initialised to the
  block mean (weight = stacked identities / l, embedding zero), so training starts from ``mean``.
- ``MLPCompression`` (the paper's choice): block + position embedding, flattened, then
  ``Linear(l*D, hidden) -> GELU -> Linear(hidden, D)``. The MLP is **per kv head** (weights
  ``[Hk, l*D, hidden]``, ``[Hk, hidden, D]``): kv heads live in different subspaces, this matches
  ``linear``, and the cost is one batched matmul either way. ``hidden_dim`` defaults to ``4 * D``.
  Initialised like ``nn.Linear`` (uniform within ``1/sqrt(fan_in)``), embedding ``N(0, 0.02^2)``.
"""

import math
from typing import Optional

import torch
from torch import nn

from .seqlens import check_compression, check_cu_seqlens, compressed_seqlens, num_compressed_tokens

Tensor = torch.Tensor


def gather_blocks(k: Tensor, compress_block: int, compress_stride: int,
                  cu_seqlens_k: Optional[Tensor] = None) -> Tensor:
    """The key blocks that compressed tokens summarise, as ``[B, TC, Hk, l, D]`` (padded ``k``) or
    ``[total_c, Hk, l, D]`` (packed ``k`` with ``cu_seqlens_k``). Padded: a view of k (``unfold``);
    packed: one index gather (reads cu_seqlens once to size the result)."""
    check_compression(compress_block, compress_stride)
    rank = 3 if cu_seqlens_k is not None else 4
    if k.dim() != rank:
        shape = "[total_k, Hk, D]" if rank == 3 else "[B, TK, Hk, D]"
        raise ValueError(f"nsa: argument 'k' must have shape {shape} (rank {rank}), got {tuple(k.shape)}")
    if cu_seqlens_k is None:
        batch, k_len, heads, dim = k.shape
        if num_compressed_tokens(k_len, compress_block, compress_stride) == 0:
            return k.new_empty((batch, 0, heads, compress_block, dim))
        return k.unfold(1, compress_block, compress_stride).transpose(-1, -2)  # [B, TC, Hk, l, D]
    # The gather reads cu_seqlens anyway; unchecked, a decreasing or negative entry gathers wrong rows
    # (the rows it needs are checked against k below).
    check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
    cu_c = compressed_seqlens(cu_seqlens_k, compress_block, compress_stride).long()
    total = int(cu_c[-1])
    token = torch.arange(total, device=k.device)
    seq = torch.searchsorted(cu_c[1:], token, right=True)  # sequence of each compressed token
    first_key = cu_seqlens_k.long()[seq] + (token - cu_c[seq]) * compress_stride
    rows = first_key[:, None] + torch.arange(compress_block, device=k.device)  # [total_c, l]
    if total and int(rows[-1, -1]) >= k.shape[0]:
        raise ValueError(f"nsa: argument 'k' has {k.shape[0]} rows but cu_seqlens_k needs key row {int(rows[-1, -1])}")
    return k[rows].transpose(1, 2)  # [total_c, Hk, l, D]


class Compression(nn.Module):
    """Base of the phi modules: ``forward(k, cu_seqlens_k=None)`` gathers the blocks and applies
    ``phi(blocks [.., Hk, l, D]) -> [.., Hk, D]``."""

    def __init__(self, compress_block: int, compress_stride: int, num_heads: Optional[int] = None,
                 head_dim: Optional[int] = None):
        super().__init__()
        check_compression(compress_block, compress_stride)
        self.compress_block = compress_block
        self.compress_stride = compress_stride
        self.num_heads = num_heads
        self.head_dim = head_dim

    def phi(self, blocks: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, k: Tensor, cu_seqlens_k: Optional[Tensor] = None) -> Tensor:
        if self.num_heads is not None and k.dim() >= 2 and tuple(k.shape[-2:]) != (self.num_heads, self.head_dim):
            raise ValueError(f"nsa: argument 'k' must have [.., Hk, D] = [.., {self.num_heads}, {self.head_dim}] "
                             f"for this module, got {tuple(k.shape)}")
        return self.phi(gather_blocks(k, self.compress_block, self.compress_stride, cu_seqlens_k))

    def extra_repr(self) -> str:
        heads = "" if self.num_heads is None else f", num_heads={self.num_heads}, head_dim={self.head_dim}"
        return f"compress_block={self.compress_block}, compress_stride={self.compress_stride}{heads}"


class MeanCompression(Compression):
    """phi = average of the block's l keys."""

    def __init__(self, compress_block: int, compress_stride: int):
        super().__init__(compress_block, compress_stride)

    def phi(self, blocks: Tensor) -> Tensor:
        return blocks.mean(dim=-2)


class _PositionalCompression(Compression):
    """Adds the learned intra-block position embedding [Hk, l, D] and flattens to [.., Hk, l*D]."""

    def __init__(self, num_heads: int, head_dim: int, compress_block: int, compress_stride: int):
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"nsa: arguments 'num_heads' and 'head_dim' must be >= 1, got {num_heads}, {head_dim}")
        super().__init__(compress_block, compress_stride, num_heads, head_dim)
        self.position = nn.Parameter(torch.zeros(num_heads, compress_block, head_dim))

    def flat(self, blocks: Tensor) -> Tensor:
        return (blocks + self.position.to(blocks.dtype)).flatten(-2)


class LinearCompression(_PositionalCompression):
    """phi = (block + position embedding) flattened, times a per-kv-head weight [Hk, l*D, D]."""

    def __init__(self, num_heads: int, head_dim: int, compress_block: int, compress_stride: int):
        super().__init__(num_heads, head_dim, compress_block, compress_stride)
        self.weight = nn.Parameter(torch.empty(num_heads, compress_block * head_dim, head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start as the block mean: weight = [I; I; ...; I] / l per head, zero position embedding."""
        with torch.no_grad():
            mean = torch.eye(self.head_dim).repeat(self.compress_block, 1) / self.compress_block
            self.weight.copy_(mean.expand_as(self.weight))
            self.position.zero_()

    def phi(self, blocks: Tensor) -> Tensor:
        return torch.einsum("...hi,hio->...ho", self.flat(blocks), self.weight.to(blocks.dtype))


class MLPCompression(_PositionalCompression):
    """phi = Linear(l*D, hidden) -> GELU -> Linear(hidden, D) of (block + position embedding),
    flattened; one MLP per kv head."""

    def __init__(self, num_heads: int, head_dim: int, compress_block: int, compress_stride: int,
                 hidden_dim: Optional[int] = None):
        super().__init__(num_heads, head_dim, compress_block, compress_stride)
        hidden_dim = 4 * head_dim if hidden_dim is None else hidden_dim
        if hidden_dim < 1:
            raise ValueError(f"nsa: argument 'hidden_dim' must be >= 1, got {hidden_dim}")
        self.hidden_dim = hidden_dim
        self.w1 = nn.Parameter(torch.empty(num_heads, compress_block * head_dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_heads, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_heads, hidden_dim, head_dim))
        self.b2 = nn.Parameter(torch.empty(num_heads, head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init per head (uniform within 1/sqrt(fan_in)); embedding N(0, 0.02^2)."""
        with torch.no_grad():
            for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
                bound = 1.0 / math.sqrt(weight.shape[1])
                weight.uniform_(-bound, bound)
                bias.uniform_(-bound, bound)
            self.position.normal_(0.0, 0.02)

    def phi(self, blocks: Tensor) -> Tensor:
        dtype = blocks.dtype
        hidden = torch.einsum("...hi,hij->...hj", self.flat(blocks), self.w1.to(dtype)) + self.b1.to(dtype)
        return torch.einsum("...hj,hjo->...ho", nn.functional.gelu(hidden), self.w2.to(dtype)) + self.b2.to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_dim={self.hidden_dim}"


def make_compression(kind: str, *, compress_block: int, compress_stride: int, num_heads: Optional[int] = None,
                     head_dim: Optional[int] = None, hidden_dim: Optional[int] = None) -> Compression:
    """The phi module named ``kind``: ``"mean"``, ``"linear"`` or ``"mlp"`` (the learned ones need
    num_heads = Hk and head_dim = D of the tensor they compress)."""
    if kind == "mean":
        return MeanCompression(compress_block, compress_stride)
    if kind not in ("linear", "mlp"):
        raise ValueError(f"nsa: argument 'kind' must be 'mean', 'linear' or 'mlp', got {kind!r}")
    if num_heads is None or head_dim is None:
        raise ValueError(f"nsa: argument 'num_heads' and 'head_dim' are required for kind={kind!r}")
    if kind == "linear":
        return LinearCompression(num_heads, head_dim, compress_block, compress_stride)
    return MLPCompression(num_heads, head_dim, compress_block, compress_stride, hidden_dim)
