"""Compressed-token counts (spec section 1), shared by the reference, the functional API and the
compression modules. The C++ twins are ``num_compressed_tokens`` (csrc/common/selection.h) and
``compressed_row_offsets`` (csrc/common/host_layout.h)."""

import torch

Tensor = torch.Tensor


def num_compressed_tokens(k_len: int, compress_block: int, compress_stride: int) -> int:
    """``TC = max(0, (TK - l) // d + 1)`` (spec section 1)."""
    return max(0, (k_len - compress_block) // compress_stride + 1)


def compressed_seqlens(cu_seqlens_k: Tensor, compress_block: int, compress_stride: int) -> Tensor:
    """int32 ``cu_seqlens_c [N+1]``: cumulative compressed-token counts of the original key lengths in
    ``cu_seqlens_k`` (the row offsets of packed ``k_cmp``/``v_cmp``). Stays on cu_seqlens_k's device."""
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    tokens = torch.div(lengths - compress_block, compress_stride, rounding_mode="floor").add(1).clamp_min(0)
    return torch.cat([tokens.new_zeros(1), tokens.cumsum(0)]).to(torch.int32)
