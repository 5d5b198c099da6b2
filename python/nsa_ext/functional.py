"""User-facing functions over the ``torch.ops.nsa`` operators.

Layouts (spec, Notation): padded ``q [B, TQ, Hq, Dk]``, ``k [B, TK, Hk, Dk]``, ``v [B, TK, Hk, Dv]``;
packed (varlen, as in FlashAttention) ``q [total_q, Hq, Dk]`` with int32 ``cu_seqlens_q [N+1]`` and
``cu_seqlens_k [N+1]``. Queries are bottom-right aligned: query i of a sequence sits at position
``TK - TQ + i``. Every function returns ``(out, lse)`` with ``lse`` the natural-log log-sum-exp of
the scaled scores (float32; float64 for float64 inputs), ``-inf`` and ``out = 0`` for rows that see
no key. Under torch.compile, pass ``max_seqlen_q``/``max_seqlen_k`` with packed inputs (otherwise
they are read from ``cu_seqlens`` with a device-to-host copy).
"""

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def _default_scale(q: Tensor, scale: Optional[float]) -> float:
    return float(q.shape[-1]) ** -0.5 if scale is None else float(scale)


def _max_seqlen(given: Optional[int], cu_seqlens: Optional[Tensor], padded_len: int) -> int:
    if given is not None:
        return int(given)
    if cu_seqlens is None:
        return padded_len
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> Tuple[int, int]:
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    padded_q = 0 if packed or q.dim() < 2 else q.shape[1]
    padded_k = 0 if packed or k.dim() < 2 else k.shape[1]
    return (_max_seqlen(max_seqlen_q, cu_seqlens_q, padded_q), _max_seqlen(max_seqlen_k, cu_seqlens_k, padded_k))


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Causal sliding-window attention (spec section 5).

    Query at position t attends to keys s with ``t - window < s <= t`` (``window`` keys, itself
    included; FlashAttention's ``window_size=(window - 1, 0)``). GQA: query head h reads kv head
    ``h // (Hq // Hk)``. ``scale`` defaults to ``Dk ** -0.5``. Differentiable in q, k, v (and
    through ``lse``). Returns ``out [.., Hq, Dv]`` in q's dtype and ``lse [.., Hq]``.
    """
    max_seqlen_q, max_seqlen_k = _seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return torch.ops.nsa.sliding_window_attention_fwd(
        q, k, v, int(window), _default_scale(q, scale), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def compressed_attention(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    *,
    compress_block: int,
    compress_stride: int,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention over compressed tokens (spec section 2).

    Token i summarises keys ``[i*compress_stride, i*compress_stride + compress_block)``; query at
    position t sees it iff ``i*compress_stride + compress_block - 1 <= t``. Padded layout:
    ``k_cmp [B, TC, Hk, Dk]`` and TK (which places the queries) is ``max_seqlen_k``, default TQ;
    rows of k_cmp beyond ``TC(TK)`` are ignored. Packed layout: ``cu_seqlens_k`` holds the ORIGINAL
    key lengths and k_cmp rows follow ``compressed_seqlens(cu_seqlens_k, ...)``. Rows that see no
    token (t < compress_block - 1) give out = 0 and lse = -inf. Differentiable in q, k_cmp, v_cmp.
    """
    if cu_seqlens_q is None and cu_seqlens_k is None:
        max_seqlen_q = q.shape[1] if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = q.shape[1] if max_seqlen_k is None else max_seqlen_k
    max_seqlen_q, max_seqlen_k = _seqlens(q, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return torch.ops.nsa.compressed_attention_fwd(
        q, k_cmp, v_cmp, int(compress_block), int(compress_stride), _default_scale(q, scale), cu_seqlens_q,
        cu_seqlens_k, max_seqlen_q, max_seqlen_k)
