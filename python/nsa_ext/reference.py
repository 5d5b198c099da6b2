"""Pure-PyTorch reference of every NSA operator, written line by line from ``NSA_SPEC.md``.

It is the oracle for the CPU and CUDA kernels: obviously right, not fast. It works in any dtype
(tests use float64), on padded and packed layouts, with TQ <= TK, and is differentiable wherever the
spec says the operator is. Shapes and arguments mirror ``nsa_ext.functional``.
"""

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .seqlens import compressed_seqlens, num_compressed_tokens  # noqa: F401  (part of the reference)

Tensor = torch.Tensor


# --- masks: the Python twins of csrc/common/masks.h ---------------------------------------------

def query_positions(q_len: int, k_len: int, device=None) -> Tensor:
    """Absolute positions of the queries: bottom-right aligned, query i sits at ``TK - TQ + i``."""
    return torch.arange(q_len, device=device) + (k_len - q_len)


def causal_mask(q_len: int, k_len: int, device=None) -> Tensor:
    """bool [TQ, TK]: query at t sees key s iff ``s <= t``."""
    t = query_positions(q_len, k_len, device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= t


def window_mask(q_len: int, k_len: int, window: int, device=None) -> Tensor:
    """bool [TQ, TK]: query at t sees key s iff ``t - window < s <= t`` (spec section 5)."""
    t = query_positions(q_len, k_len, device)[:, None]
    s = torch.arange(k_len, device=device)[None, :]
    return causal_mask(q_len, k_len, device) & (s > t - window)


def compressed_mask(q_len: int, k_len: int, compress_block: int, compress_stride: int, device=None) -> Tensor:
    """bool [TQ, TC]: query at t sees compressed token i iff ``i*d + l - 1 <= t`` (spec section 2)."""
    t = query_positions(q_len, k_len, device)[:, None]
    i = torch.arange(num_compressed_tokens(k_len, compress_block, compress_stride), device=device)[None, :]
    return i * compress_stride + compress_block - 1 <= t


# --- the attention core -------------------------------------------------------------------------

def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Softmax attention of one sequence under a boolean mask.

    q [TQ, Hq, Dk], k [TK, Hk, Dk], v [TK, Hk, Dv]; visible [TQ, TK] (all heads) or [TQ, Hk, TK]
    (per kv head). Returns out [TQ, Hq, Dv] and lse [TQ, Hq]; rows that see nothing give out = 0 and
    lse = -inf with zero gradient.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if visible.dim() == 3:
        visible = visible.repeat_interleave(group, dim=1).permute(1, 0, 2)  # [Hq, TQ, TK]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])  # exactly 0 where masked, also in empty rows
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse.transpose(0, 1).to(_lse_dtype(q.dtype))


# --- splitting batches into sequences ------------------------------------------------------------

def _map_sequences(
    one_sequence: Callable[..., Sequence[Tensor]],
    q: Tensor,
    per_query: Sequence[Tensor],
    keys: Sequence[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_key_rows: Optional[Tensor],
    key_lengths: List[int],
) -> List[Tensor]:
    """Calls ``one_sequence(q, *per_query, *keys, TK)`` per sequence and reassembles the outputs.

    Padded: batch b of every tensor. Packed: rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and of the
    per-query tensors, rows cu_key_rows[b]:cu_key_rows[b+1] of the key tensors. ``key_lengths[b]``
    is the original key length TK of sequence b, which places its queries.
    """
    if cu_seqlens_q is None:
        results = [one_sequence(q[b], *(t[b] for t in per_query), *(t[b] for t in keys), key_lengths[b])
                   for b in range(q.shape[0])]
        return [torch.stack(parts) for parts in zip(*results)]
    cq, ck = cu_seqlens_q.tolist(), cu_key_rows.tolist()
    results = []
    for b in range(len(cq) - 1):
        qs = slice(cq[b], cq[b + 1])
        ks = slice(ck[b], ck[b + 1])
        results.append(one_sequence(q[qs], *(t[qs] for t in per_query), *(t[ks] for t in keys), key_lengths[b]))
    return [torch.cat(parts) for parts in zip(*results)]


def _key_lengths(q: Tensor, cu_seqlens_k: Optional[Tensor], padded_len: int) -> List[int]:
    if cu_seqlens_k is None:
        return [padded_len] * q.shape[0]
    return (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


# --- the four operators -------------------------------------------------------------------------

def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                             max_seqlen_q=None, max_seqlen_k=None):
    """Spec section 5: query at t attends to keys ``t - window < s <= t``. Returns (out, lse)."""
    scale = _scale(q, scale)

    def one(q_, k_, v_, k_len):
        return masked_attention(q_, k_, v_, window_mask(q_.shape[0], k_len, window, q.device), scale)

    lengths = _key_lengths(q, cu_seqlens_k, k.shape[1] if cu_seqlens_k is None else 0)
    out, lse = _map_sequences(one, q, [], [k, v], cu_seqlens_q, cu_seqlens_k, lengths)
    return out, lse


def _original_key_lengths(q, cu_seqlens_k, max_seqlen_k) -> List[int]:
    """Operators over compressed keys: TK is cu_seqlens_k (packed), else max_seqlen_k, else TQ."""
    if cu_seqlens_k is not None:
        return _key_lengths(q, cu_seqlens_k, 0)
    return _key_lengths(q, None, q.shape[1] if max_seqlen_k is None else max_seqlen_k)


def compressed_attention(q, k_cmp, v_cmp, *, compress_block, compress_stride, scale=None, cu_seqlens_q=None,
                         cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Spec section 2: attention over the compressed tokens a query may see. Returns (out, lse).

    Packed: ``cu_seqlens_k`` holds the original key lengths; k_cmp/v_cmp rows follow
    ``compressed_seqlens(cu_seqlens_k, ...)``. Padded: TK is ``max_seqlen_k`` when given, else TQ,
    and the first TC(TK) rows of k_cmp are the tokens.
    """
    scale = _scale(q, scale)

    def one(q_, k_, v_, k_len):
        tokens = num_compressed_tokens(k_len, compress_block, compress_stride)
        visible = compressed_mask(q_.shape[0], k_len, compress_block, compress_stride, q.device)
        return masked_attention(q_, k_[:tokens], v_[:tokens], visible, scale)

    lengths = _original_key_lengths(q, cu_seqlens_k, max_seqlen_k)
    cu_rows = None if cu_seqlens_k is None else compressed_seqlens(cu_seqlens_k, compress_block, compress_stride)
    out, lse = _map_sequences(one, q, [], [k_cmp, v_cmp], cu_seqlens_q, cu_rows, lengths)
    return out, lse


def overlap_weights(num_tokens: int, num_blocks: int, compress_block: int, compress_stride: int,
                    select_block: int, dtype=torch.float64, device=None) -> Tensor:
    """[TC, NB]: chunks of ``compress_stride`` keys that token i and selection block j share (Eq. 9)."""
    i = torch.arange(num_tokens, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    token_first, token_end = i, i + compress_block // compress_stride
    block_first, block_end = j * (select_block // compress_stride), (j + 1) * (select_block // compress_stride)
    shared = torch.minimum(token_end, block_end) - torch.maximum(token_first, block_first)
    return shared.clamp_min(0).to(dtype)


def select_blocks(q, k_cmp, lse, *, compress_block, compress_stride, select_block, select_count, init_blocks=1,
                  local_blocks=2, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                  max_seqlen_k=None):
    """Spec section 3: int32 [B, TQ, Hk, select_count] (packed [total_q, Hk, n]) block ids per
    query and kv-head group, ascending, -1 padded."""
    scale = _scale(q, scale)
    group = q.shape[-2] // k_cmp.shape[-2]

    def one(q_, lse_, k_, k_len):
        tq, hq = q_.shape[0], q_.shape[1]
        tokens = num_compressed_tokens(k_len, compress_block, compress_stride)
        num_blocks = math.ceil(k_len / select_block)
        k_ = k_[:tokens].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->qhk", q_, k_) * scale
        visible = compressed_mask(tq, k_len, compress_block, compress_stride, q.device)[:, None, :]
        probs = torch.where(visible, torch.exp(scores - lse_[..., None].to(scores.dtype)), torch.zeros_like(scores))
        weights = overlap_weights(tokens, num_blocks, compress_block, compress_stride, select_block, probs.dtype,
                                  q.device)
        block_scores = torch.einsum("qhi,ij->qhj", probs, weights)
        group_scores = block_scores.view(tq, hq // group, group, num_blocks).sum(2)  # [TQ, Hk, NB]

        t = query_positions(tq, k_len, q.device)[:, None, None]
        j = torch.arange(num_blocks, device=q.device)[None, None, :]
        candidate = j * select_block <= t
        own_block = torch.div(t, select_block, rounding_mode="floor")
        forced = candidate & ((j < init_blocks) | ((j > own_block - local_blocks) & (j <= own_block)))
        rank_key = torch.where(forced, float("inf"), torch.where(candidate, group_scores, float("-inf")))
        # Stable descending sort: equal scores keep ascending j, so ties go to the lower block id.
        order = torch.sort(rank_key, dim=-1, descending=True, stable=True).indices[..., :select_count]
        kept = torch.gather(candidate.expand_as(rank_key), -1, order)
        ids = torch.where(kept, order, torch.full_like(order, num_blocks))
        ids = torch.sort(ids, dim=-1).values
        ids = torch.where(ids == num_blocks, torch.full_like(ids, -1), ids)
        if ids.shape[-1] < select_count:
            ids = torch.nn.functional.pad(ids, (0, select_count - ids.shape[-1]), value=-1)
        return (ids.to(torch.int32),)

    lengths = _original_key_lengths(q, cu_seqlens_k, max_seqlen_k)
    cu_rows = None if cu_seqlens_k is None else compressed_seqlens(cu_seqlens_k, compress_block, compress_stride)
    (indices,) = _map_sequences(one, q, [lse], [k_cmp], cu_seqlens_q, cu_rows, lengths)
    return indices


def selection_attention(q, k, v, indices, *, select_block, scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                        max_seqlen_q=None, max_seqlen_k=None):
    """Spec section 4: query at t, head h attends to keys s <= t in the union of the blocks
    ``indices[t, h // G, :]``; -1 and out-of-range ids are ignored. Returns (out, lse)."""
    scale = _scale(q, scale)

    def one(q_, idx, k_, v_, k_len):
        num_blocks = math.ceil(k_len / select_block)
        valid = (idx >= 0) & (idx < num_blocks)
        blocks = torch.arange(num_blocks, device=q.device)
        chosen = ((idx[..., None] == blocks) & valid[..., None]).any(dim=2)  # [TQ, Hk, NB]
        key_block = torch.arange(k_len, device=q.device) // select_block
        visible = chosen[:, :, key_block] & causal_mask(q_.shape[0], k_len, q.device)[:, None, :]
        return masked_attention(q_, k_, v_, visible, scale)

    lengths = _key_lengths(q, cu_seqlens_k, k.shape[1] if cu_seqlens_k is None else 0)
    out, lse = _map_sequences(one, q, [indices], [k, v], cu_seqlens_q, cu_seqlens_k, lengths)
    return out, lse


def native_sparse_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa, *, config, scale=None, k_swa=None,
                            v_swa=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                            max_seqlen_k=None, return_indices=False):
    """Spec section 6 from the reference operators: the gated sum of the three branches."""
    seqlens = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    tk = k.shape[1] if cu_seqlens_k is None else None
    o_cmp, lse_cmp = compressed_attention(q, k_cmp, v_cmp, compress_block=config.compress_block,
                                          compress_stride=config.compress_stride, scale=scale, max_seqlen_k=tk,
                                          **seqlens)
    indices = select_blocks(q.detach(), k_cmp.detach(), lse_cmp.detach(), compress_block=config.compress_block,
                            compress_stride=config.compress_stride, select_block=config.select_block,
                            select_count=config.select_count, init_blocks=config.init_blocks,
                            local_blocks=config.local_blocks, scale=scale, max_seqlen_k=tk, **seqlens)
    o_slc, _ = selection_attention(q, k, v, indices, select_block=config.select_block, scale=scale, **seqlens)
    o_swa, _ = sliding_window_attention(q, k if k_swa is None else k_swa, v if v_swa is None else v_swa,
                                        window=config.window, scale=scale, **seqlens)
    out = g_cmp.unsqueeze(-1) * o_cmp + g_slc.unsqueeze(-1) * o_slc + g_swa.unsqueeze(-1) * o_swa
    return (out, indices) if return_indices else out
