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

from .config import NSAConfig, validate_config
from .seqlens import check_cu_seqlens

Tensor = torch.Tensor


def _default_scale(q: Tensor, scale: Optional[float]) -> float:
    if scale is not None:
        return float(scale)
    # Dk = 0 (or a 0-d q) has no default scale: any value lets the op reject q with its own message.
    return float(q.shape[-1]) ** -0.5 if q.dim() and q.shape[-1] else 1.0


def _op_int(name: str, value) -> int:
    """int(value) for an op's int64 argument (past int64, torch's schema check would raise a
    RuntimeError)."""
    value = int(value)
    if not -2**63 <= value < 2**63:
        raise ValueError(f"nsa: argument '{name}' must fit in int64, got {value}")
    return value


def _max_seqlen(name: str, given: Optional[int], cu_seqlens: Optional[Tensor], padded_len: int) -> int:
    if given is not None:
        return _op_int(name, given)
    if cu_seqlens is None:
        return padded_len
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> Tuple[int, int]:
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    padded_q = 0 if packed or q.dim() < 2 else q.shape[1]
    padded_k = 0 if packed or k.dim() < 2 else k.shape[1]
    return (_max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q, padded_q),
            _max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k, padded_k))


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
        q, k, v, _op_int("window", window), _default_scale(q, scale), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k)


def _compressed_seqlens_args(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> Tuple[int, int]:
    """Ops over compressed keys: TK is max_seqlen_k (padded; TQ when not given) or the original key
    lengths in cu_seqlens_k (packed)."""
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    padded_q = 0 if packed or q.dim() < 2 else q.shape[1]
    max_q = _max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q, padded_q)
    max_k = _max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k, padded_q)
    return max_q, max_k


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
    max_seqlen_q, max_seqlen_k = _compressed_seqlens_args(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return torch.ops.nsa.compressed_attention_fwd(
        q, k_cmp, v_cmp, _op_int("compress_block", compress_block), _op_int("compress_stride", compress_stride),
        _default_scale(q, scale), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def select_blocks(
    q: Tensor,
    k_cmp: Tensor,
    lse: Tensor,
    *,
    compress_block: int,
    compress_stride: int,
    select_block: int,
    select_count: int,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
) -> Tensor:
    """Top-n selection blocks per query and kv-head group (spec section 3). Not differentiable.

    ``q [B, TQ, Hq, Dk]`` and ``lse [B, TQ, Hq]`` of the compressed branch (``lse`` as returned by
    ``compressed_attention`` with the same q, k_cmp, scale), ``k_cmp [B, TC, Hk, Dk]``; packed
    ``[total_q, Hq, Dk]``, ``[total_q, Hq]``, ``[total_c, Hk, Dk]`` with ``cu_seqlens_k`` holding the
    ORIGINAL key lengths (k_cmp rows follow ``compressed_seqlens(cu_seqlens_k, ...)``). In padded
    layout the original key length TK is ``max_seqlen_k``, else TQ.

    Query at position t scores block j (keys ``[j*select_block, (j+1)*select_block)``) by the
    compressed-attention probabilities of the tokens overlapping it, weighted by the number of
    ``compress_stride`` chunks they share and summed over the group's G heads. Candidates are blocks
    with ``j*select_block <= t``; the first ``init_blocks`` and the ``local_blocks`` ending at t's own
    block are always kept, the other slots go to the best scores (ties to the lower j). Returns int32
    ``[.., Hk, select_count]`` block ids, ascending, padded with -1.
    """
    validate_config(compress_block, compress_stride, select_block, select_count, init_blocks, local_blocks)
    max_seqlen_q, max_seqlen_k = _compressed_seqlens_args(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return torch.ops.nsa.select_blocks(
        q, k_cmp, lse, _op_int("compress_block", compress_block), _op_int("compress_stride", compress_stride),
        _op_int("select_block", select_block), _op_int("select_count", select_count),
        _op_int("init_blocks", init_blocks), _op_int("local_blocks", local_blocks), _default_scale(q, scale),
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def _check_config(config) -> None:
    if not isinstance(config, NSAConfig):
        raise ValueError(f"nsa: argument 'config' must be an NSAConfig, got {type(config).__name__}")


def native_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_swa: Tensor,
    *,
    config,
    scale: Optional[float] = None,
    k_swa: Optional[Tensor] = None,
    v_swa: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_indices: bool = False,
):
    """The NSA layer's attention (spec section 6): ``g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa``.

    ``k``/``v`` are the selection branch's keys and values (and the window's unless ``k_swa``/
    ``v_swa``, of the same shapes, are given); ``k_cmp``/``v_cmp`` the compressed tokens of the
    compression branch's keys (see ``compressed_attention`` for their layout). Gates ``[.., Hq]`` (padded ``[B, TQ, Hq]``),
    typically sigmoids. The blocks of the selection branch come from ``select_blocks`` on the
    compressed branch's q, k_cmp and lse; selection is not differentiable, the three attentions are.
    ``config`` is an ``NSAConfig``. Returns ``out [.., Hq, Dv]`` (and the int32 block indices when
    ``return_indices``).
    """
    _check_config(config)
    for name, given, like in (("k_swa", k_swa, k), ("v_swa", v_swa, v)):
        # The window's op would name its own argument, 'k' or 'v', for a bad k_swa or v_swa.
        if given is not None and (not isinstance(given, Tensor) or given.shape != like.shape):
            got = tuple(given.shape) if isinstance(given, Tensor) else repr(given)
            raise ValueError(f"nsa: argument '{name}' must have the shape of {name[0]}, {tuple(like.shape)}, got {got}")
    for name, gate in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        # Checked here: a gate of another shape would broadcast against o [.., Hq, Dv] silently.
        if not isinstance(gate, Tensor) or gate.shape != q.shape[:-1] or gate.device != q.device:
            got = f"{tuple(gate.shape)} on {gate.device}" if isinstance(gate, Tensor) else repr(gate)
            raise ValueError(f"nsa: argument '{name}' must have q's shape without the head dim, "
                             f"{tuple(q.shape[:-1])}, on {q.device}, got {got}")
    scale = _default_scale(q, scale)
    max_seqlen_q, max_seqlen_k = _seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    seqlens = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                   max_seqlen_k=max_seqlen_k)
    o_cmp, lse_cmp = compressed_attention(q, k_cmp, v_cmp, compress_block=config.compress_block,
                                          compress_stride=config.compress_stride, scale=scale, **seqlens)
    indices = select_blocks(q.detach(), k_cmp.detach(), lse_cmp.detach(), compress_block=config.compress_block,
                            compress_stride=config.compress_stride, select_block=config.select_block,
                            select_count=config.select_count, init_blocks=config.init_blocks,
                            local_blocks=config.local_blocks, scale=scale, **seqlens)
    o_slc, _ = selection_attention(q, k, v, indices, select_block=config.select_block, scale=scale, **seqlens)
    o_swa, _ = sliding_window_attention(q, k if k_swa is None else k_swa, v if v_swa is None else v_swa,
                                        window=config.window, scale=scale, **seqlens)
    out = g_cmp.unsqueeze(-1) * o_cmp + g_slc.unsqueeze(-1) * o_slc + g_swa.unsqueeze(-1) * o_swa
    return (out, indices) if return_indices else out


def native_sparse_attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_cmp_cache: Tensor,
    v_cmp_cache: Tensor,
    gates: Tensor,
    cache_seqlens: Tensor,
    *,
    config,
    scale: Optional[float] = None,
    k_swa_cache: Optional[Tensor] = None,
    v_swa_cache: Optional[Tensor] = None,
    return_indices: bool = False,
):
    """``native_sparse_attention`` for a few new queries per sequence over a KV cache, in one fused
    op (as FlashAttention's ``flash_attn_with_kvcache``): decoding and speculative decoding.

    ``q [B, TQ, Hq, Dk]``: the TQ newest tokens of every sequence (already appended to the cache);
    ``k_cache``/``v_cache [B, capacity, Hk, D]`` with int32 ``cache_seqlens [B]`` live keys per
    sequence (so query i of sequence b sits at position ``cache_seqlens[b] - TQ + i``); the compressed
    tokens ``k_cmp_cache``/``v_cmp_cache [B, token_capacity, Hk, D]`` (the first
    ``TC(cache_seqlens[b])`` rows live); ``gates [B, TQ, Hq, 3]`` (g_cmp, g_slc, g_swa); the window's
    own ``k_swa_cache``/``v_swa_cache`` or None to share k/v. Computes exactly what
    ``native_sparse_attention`` computes for those queries (selection included), but reads only the
    compressed tokens, the selected blocks and the window, never a copy of the cache. Not
    differentiable. Returns ``out [B, TQ, Hq, Dv]`` (and the int32 indices ``[B, TQ, Hk, n]``).
    """
    _check_config(config)
    out, indices = torch.ops.nsa.decode_attention(
        q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, k_swa_cache, v_swa_cache, gates, cache_seqlens,
        int(config.compress_block), int(config.compress_stride), int(config.select_block), int(config.select_count),
        int(config.init_blocks), int(config.local_blocks), int(config.window), _default_scale(q, scale))
    return (out, indices) if return_indices else out


def selection_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    *,
    select_block: int,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention over selected blocks of keys (spec section 4).

    ``indices`` int32 ``[B, TQ, Hk, n]`` (packed ``[total_q, Hk, n]``) lists, per query and kv-head
    group, the blocks it attends to; block j covers keys ``[j*select_block, (j+1)*select_block)``.
    Query at position t, head h attends to every key ``s <= t`` in the union of the blocks
    ``indices[t, h // G]``. Ids equal to -1, outside ``[0, ceil(TK / select_block))`` or starting
    after t are ignored (no id can make the kernel read out of bounds), and a repeated id counts
    once; ``validate_block_indices`` reports such rows. Rows left with no key give out = 0,
    lse = -inf. Differentiable in q, k, v (and through lse), not in indices; the backward is
    deterministic.
    """
    max_seqlen_q, max_seqlen_k = _seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return torch.ops.nsa.selection_attention_fwd(
        q, k, v, indices, _op_int("select_block", select_block), _default_scale(q, scale), cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k)


def _indices_error(message: str) -> ValueError:
    return ValueError(f"nsa: argument 'indices' {message}")


def validate_block_indices(
    indices: Tensor,
    *,
    select_block: int,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_k: Optional[int] = None,
) -> None:
    """Checks block ids built by hand before ``selection_attention``, which silently ignores bad ones.

    Raises ValueError naming the first bad row (sequence, query, kv head; rows in that order) and
    why: an id out of range (not -1 and outside ``[0, ceil(TK / select_block))``), a duplicate id,
    or a future block (starting after the query's position ``t = TK - TQ + i``). -1 is a valid hole.
    Padded ``indices [B, TQ, Hk, n]``: TK is ``max_seqlen_k``, default TQ. Packed
    ``[total_q, Hk, n]``: pass ``cu_seqlens_q`` and ``cu_seqlens_k`` (the key lengths).
    Pure PyTorch; copies indices to the CPU.
    """
    if int(select_block) < 1:
        raise ValueError(f"nsa: argument 'select_block' must be >= 1, got {select_block}")
    if indices.dtype != torch.int32:
        raise _indices_error(f"must be int32, got {indices.dtype}")
    packed = cu_seqlens_q is not None
    if packed != (cu_seqlens_k is not None):
        name = "cu_seqlens_k" if packed else "cu_seqlens_q"
        raise ValueError(f"nsa: argument '{name}' must be given together with the other cu_seqlens or not at all")
    if indices.dim() != (3 if packed else 4):
        raise _indices_error(f"must have shape {'[total_q, Hk, n]' if packed else '[B, TQ, Hk, n]'}, "
                             f"got {tuple(indices.shape)}")
    ids = indices.detach().cpu().long()
    if packed:
        # Unchecked, bad offsets would be blamed on the ids (rows sliced short, negative positions).
        check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", rows=ids.shape[0])
        check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        if len(cq) != len(ck):
            raise ValueError("nsa: argument 'cu_seqlens_k' must have as many sequences as cu_seqlens_q")
        sequences = [(ids[cq[b]:cq[b + 1]], ck[b + 1] - ck[b]) for b in range(len(cq) - 1)]
    else:
        k_len = ids.shape[1] if max_seqlen_k is None else int(max_seqlen_k)
        if k_len < 0:
            raise ValueError(f"nsa: argument 'max_seqlen_k' must be >= 0, got {k_len}")
        sequences = [(ids[b], k_len) for b in range(ids.shape[0])]
    for b, (rows, k_len) in enumerate(sequences):
        _validate_sequence(b, rows, k_len, int(select_block))


def _validate_sequence(b: int, ids: Tensor, k_len: int, select_block: int) -> None:
    q_len = ids.shape[0]
    if q_len == 0 or ids.shape[-1] == 0:
        return
    num_blocks = -(-k_len // select_block) if k_len > 0 else 0
    position = (torch.arange(q_len) + (k_len - q_len))[:, None, None]
    hole = ids == -1
    out_of_range = ~hole & ((ids < 0) | (ids >= num_blocks))
    future = ~hole & ~out_of_range & (ids * select_block > position)
    ordered = ids.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] != -1)
    bad = out_of_range.any(-1) | future.any(-1) | repeated.any(-1)  # [TQ, Hk]
    if not bool(bad.any()):
        return
    i, h = (int(x) for x in bad.nonzero()[0])
    t = k_len - q_len + i
    where = f"sequence {b}, query {i} (position {t}), kv head {h}: "
    row = ids[i, h]
    if bool(out_of_range[i, h].any()):
        j = int(row[out_of_range[i, h]][0])
        raise _indices_error(f"{where}block id {j} is out of range: a sequence of {k_len} keys has blocks "
                             f"[0, {num_blocks}) of {select_block} keys (-1 marks an unused slot)")
    if bool(future[i, h].any()):
        j = int(row[future[i, h]][0])
        raise _indices_error(f"{where}block {j} starts at key {j * select_block}, after the query's position "
                             f"{t} (a future block)")
    j = int(ordered[i, h, 1:][repeated[i, h]][0])
    raise _indices_error(f"{where}block {j} appears more than once")
