"""Compressed-token counts (spec section 1), shared by the reference, the functional API and the
compression modules, and the Python-side checks of packed-layout arguments. The C++ twins are
``num_compressed_tokens`` (csrc/common/selection.h), ``compressed_row_offsets`` (csrc/common/host_layout.h)
and ``check_cu_seqlens`` (csrc/common/checks.h)."""

from typing import Optional

import torch

Tensor = torch.Tensor


def check_compression(compress_block: int, compress_stride: int) -> None:
    """Raises ValueError naming the argument unless l >= 1 and d >= 1 divides l."""
    if compress_block < 1:
        raise ValueError(f"nsa: argument 'compress_block' must be >= 1, got {compress_block}")
    if compress_stride < 1 or compress_block % compress_stride:
        raise ValueError(f"nsa: argument 'compress_stride' must be >= 1 and divide compress_block "
                         f"({compress_block}), got {compress_stride}")


def check_cu_seqlens(cu_seqlens, name: str, rows: Optional[int] = None, exact: bool = False,
                     values: bool = True) -> None:
    """Raises ValueError naming ``name`` unless cu_seqlens is an int32 ``[N+1]`` tensor and, when
    ``values`` (this reads them to the host: only where the caller does anyway), starts at 0, never
    decreases and ends within ``rows`` (exactly at ``rows`` when ``exact``) if given."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 1:
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, Tensor) else repr(cu_seqlens)
        raise ValueError(f"nsa: argument '{name}' must be int32 [num_seqs + 1], got {got}")
    if not values:
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"nsa: argument '{name}' must start at 0, got {cu[0]}")
    for i in range(1, len(cu)):
        if cu[i] < cu[i - 1]:
            raise ValueError(f"nsa: argument '{name}' must be non-decreasing, but entry {i} ({cu[i]}) < entry "
                             f"{i - 1} ({cu[i - 1]})")
    if rows is not None and (cu[-1] != rows if exact else cu[-1] > rows):
        raise ValueError(f"nsa: argument '{name}' ends at {cu[-1]} but the tensor has {rows} rows")


def num_compressed_tokens(k_len: int, compress_block: int, compress_stride: int) -> int:
    """``TC = max(0, (TK - l) // d + 1)`` (spec section 1)."""
    return max(0, (k_len - compress_block) // compress_stride + 1)


def compressed_seqlens(cu_seqlens_k: Tensor, compress_block: int, compress_stride: int) -> Tensor:
    """int32 ``cu_seqlens_c [N+1]``: cumulative compressed-token counts of the original key lengths in
    ``cu_seqlens_k`` (the row offsets of packed ``k_cmp``/``v_cmp``). Stays on cu_seqlens_k's device."""
    check_compression(compress_block, compress_stride)
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    tokens = torch.div(lengths - compress_block, compress_stride, rounding_mode="floor").add(1).clamp_min(0)
    return torch.cat([tokens.new_zeros(1), tokens.cumsum(0)]).to(torch.int32)
