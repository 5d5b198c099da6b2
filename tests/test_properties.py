"""Property-based tests (hypothesis): every operator against the fp64 reference on drawn problems.

Each example draws a layout (padded, or packed with empty and length-1 sequences), B or N, TQ <= TK
per sequence, Hk and G, Dk != Dv, strided (non-contiguous) inputs, the op's own configuration (window,
compression block and stride, selection block, select count, forced blocks), the scale and the dtype,
then checks the forward and, for the attention ops, the gradients of a random (dout, dlse) through
autograd: float64 within 1e-10 and float32 within 1e-5 of the reference's magnitude, outputs poisoned.

The example count comes from the hypothesis profile (tests/conftest.py): "ci" by default (few,
derandomized: every run draws the same examples), NSA_HYPOTHESIS_PROFILE=thorough for many more.
"""

from dataclasses import dataclass
from typing import List

import torch
from hypothesis import given
from hypothesis import strategies as st

import nsa_ext
from nsa_ext import reference

from test_select_blocks import Config, Inputs, check_selection
from utils import Batch, assert_close_fp32, cu_seqlens, finite_cotangent, grads, poisoned_outputs

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass
class Problem:
    """Sizes of one drawn problem: per-sequence query and key lengths (TQ <= TK), heads, head dims."""
    q_lens: List[int]
    k_lens: List[int]
    packed: bool
    heads_k: int
    group: int
    dim_qk: int
    dim_v: int
    strided: bool
    dtype: torch.dtype
    scale_factor: float
    seed: int

    @property
    def heads_q(self) -> int:
        return self.heads_k * self.group

    @property
    def scale(self) -> float:
        return self.scale_factor * self.dim_qk ** -0.5

    def seqlens(self) -> dict:
        """The packed layout's keywords (cu_seqlens_k: the key lengths, which place the queries, also
        for the ops over compressed tokens); none in padded layout."""
        if not self.packed:
            return {}
        return dict(cu_seqlens_q=cu_seqlens(self.q_lens), cu_seqlens_k=cu_seqlens(self.k_lens),
                    max_seqlen_q=max(self.q_lens, default=0), max_seqlen_k=max(self.k_lens, default=0))


@st.composite
def problems(draw, max_len=70) -> Problem:
    packed = draw(st.booleans())
    if packed:
        # Empty and length-1 sequences (in q, in k, or both) are drawn often, anywhere in the batch.
        lengths = st.one_of(st.sampled_from([0, 1]), st.integers(0, max_len))
        k_lens = draw(st.lists(lengths, min_size=1, max_size=4))
        q_lens = [draw(st.integers(0, n)) if draw(st.booleans()) else n for n in k_lens]
    else:
        k_len = draw(st.integers(1, max_len))
        q_len = draw(st.sampled_from([1, k_len])) if draw(st.booleans()) else draw(st.integers(1, k_len))
        batch = draw(st.integers(1, 3))
        q_lens, k_lens = [q_len] * batch, [k_len] * batch
    return Problem(q_lens=q_lens, k_lens=k_lens, packed=packed, heads_k=draw(st.integers(1, 3)),
                   group=draw(st.sampled_from([1, 2, 3, 4])), dim_qk=draw(st.integers(1, 40)),
                   dim_v=draw(st.integers(1, 40)), strided=draw(st.booleans()),
                   dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                   scale_factor=draw(st.floats(0.5, 1.5)), seed=draw(st.integers(0, 2**31 - 1)))


def _tensor(rows_shape, heads, dim, strided, gen):
    """fp64 normal [*rows_shape, heads, dim]; strided: a slice of a wider tensor (row, head and batch
    strides not those of a compact tensor; the last dim stays contiguous, as the ops require)."""
    if not strided:
        return torch.randn(*rows_shape, heads, dim, dtype=torch.float64, generator=gen)
    wide = torch.randn(*rows_shape, heads + 2, dim + 3, dtype=torch.float64, generator=gen)
    return wide[..., 1:heads + 1, 2:dim + 2]


def make_batch(p: Problem, key_rows: List[int], gen) -> Batch:
    """q with the problem's query rows, k/v with key_rows rows per sequence (the keys themselves, or
    compressed tokens), in the problem's layout."""
    if p.packed:
        q_shape, k_shape = (sum(p.q_lens),), (sum(key_rows),)
    else:
        q_shape, k_shape = (len(p.q_lens), p.q_lens[0]), (len(p.q_lens), key_rows[0])
    q = _tensor(q_shape, p.heads_q, p.dim_qk, p.strided, gen)
    k = _tensor(k_shape, p.heads_k, p.dim_qk, p.strided, gen)
    v = _tensor(k_shape, p.heads_k, p.dim_v, p.strided, gen)
    return Batch(q, k, v)


def _as(t: torch.Tensor, dtype) -> torch.Tensor:
    """t in dtype with t's strides (a non-contiguous input stays non-contiguous), as a fresh leaf."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype)
    return out.copy_(t.detach()).requires_grad_()


def check_attention(p: Problem, batch: Batch, call, call_reference, gen):
    """call(q, k, v) -> (out, lse) in the problem's dtype against call_reference in fp64: outputs and
    the gradients of sum(out * dout) + sum(lse * dlse), for a random dout and dlse."""
    ref_in = [t.detach().clone().requires_grad_() for t in (batch.q, batch.k, batch.v)]
    out_ref, lse_ref = call_reference(*ref_in)
    cot = (torch.randn(out_ref.shape, dtype=torch.float64, generator=gen), finite_cotangent(lse_ref, gen))
    expected = (out_ref, lse_ref, *grads((out_ref, lse_ref), ref_in, cot))
    ours = [_as(t, p.dtype) for t in (batch.q, batch.k, batch.v)]
    with poisoned_outputs():
        out, lse = call(*ours)
        actual = (out, lse, *grads((out, lse), ours, cot))
    for name, a, e in zip(["out", "lse", "dq", "dk", "dv"], actual, expected):
        assert a.shape == e.shape and a.dtype == (torch.float32 if name == "lse" and p.dtype == torch.float32
                                                  else p.dtype), name
        assert_close_fp32(a, e, rel=TOLERANCE[p.dtype], name=name)


@given(p=problems(), window=st.one_of(st.integers(1, 8), st.integers(1, 100)))
def test_sliding_window_attention(p, window):
    gen = torch.Generator().manual_seed(p.seed)
    batch = make_batch(p, p.k_lens, gen)
    seqlens = p.seqlens()

    def call(fn):
        return lambda q, k, v: fn(q, k, v, window=window, scale=p.scale, **seqlens)

    check_attention(p, batch, call(nsa_ext.sliding_window_attention), call(reference.sliding_window_attention), gen)


@st.composite
def compression_configs(draw):
    """(l, d) with d | l: strides 1 to 8, blocks 1 to 4 strides."""
    stride = draw(st.sampled_from([1, 2, 3, 4, 8]))
    return stride * draw(st.integers(1, 4)), stride


def _tokens(k_lens, block, stride):
    return [reference.num_compressed_tokens(n, block, stride) for n in k_lens]


@given(p=problems(), config=compression_configs(), extra_rows=st.integers(0, 2))
def test_compressed_attention(p, config, extra_rows):
    block, stride = config
    gen = torch.Generator().manual_seed(p.seed)
    # Padded k_cmp may hold rows past TC(TK), which the op ignores.
    rows = [n + (0 if p.packed else extra_rows) for n in _tokens(p.k_lens, block, stride)]
    batch = make_batch(p, rows, gen)
    seqlens = p.seqlens() if p.packed else dict(max_seqlen_k=p.k_lens[0])

    def call(fn):
        return lambda q, k, v: fn(q, k, v, compress_block=block, compress_stride=stride, scale=p.scale, **seqlens)

    check_attention(p, batch, call(nsa_ext.compressed_attention), call(reference.compressed_attention), gen)


@st.composite
def block_ids(draw, p: Problem, select_block: int):
    """int32 indices [.., Hk, n]: ids anywhere in [-2, blocks + 2) (holes, out-of-range, future and
    repeated ids all occur), sometimes the int32 extremes, which the op must ignore."""
    count = draw(st.integers(1, 6))
    rows = sum(p.q_lens) if p.packed else len(p.q_lens) * p.q_lens[0]
    blocks = -(-max(p.k_lens) // select_block)
    gen = torch.Generator().manual_seed(p.seed + 1)
    ids = torch.randint(-2, blocks + 2, (rows, p.heads_k, count), generator=gen, dtype=torch.int32)
    if draw(st.booleans()):
        extreme = torch.where(torch.rand(ids.shape, generator=gen) < 0.5, -2**31, 2**31 - 1).to(torch.int32)
        ids = torch.where(torch.rand(ids.shape, generator=gen) < 0.1, extreme, ids)
    return ids if p.packed else ids.view(len(p.q_lens), p.q_lens[0], p.heads_k, count)


@given(data=st.data(), p=problems(), select_block=st.integers(1, 40))
def test_selection_attention(data, p, select_block):
    gen = torch.Generator().manual_seed(p.seed)
    batch = make_batch(p, p.k_lens, gen)
    indices = data.draw(block_ids(p, select_block))
    seqlens = p.seqlens()

    def call(fn):
        return lambda q, k, v: fn(q, k, v, indices, select_block=select_block, scale=p.scale, **seqlens)

    check_attention(p, batch, call(nsa_ext.selection_attention), call(reference.selection_attention), gen)


@st.composite
def selection_configs(draw):
    """A valid Config: d | l, d | l', n >= n_init + n_local (zero forced blocks included)."""
    block, stride = draw(compression_configs())
    init, local = draw(st.integers(0, 2)), draw(st.integers(0, 3))
    return Config(block, stride, stride * draw(st.integers(1, 4)), draw(st.integers(max(1, init + local), 8)),
                  init, local)


@given(p=problems(), cfg=selection_configs())
def test_select_blocks(p, cfg):
    gen = torch.Generator().manual_seed(p.seed)
    tokens = _tokens(p.k_lens, cfg.compress_block, cfg.compress_stride)
    batch = make_batch(p, tokens, gen)
    seqlens = p.seqlens() if p.packed else dict(max_seqlen_k=p.k_lens[0])
    # The compressed branch's lse for these q and k_cmp, from the reference (as select_blocks expects).
    _, lse = reference.compressed_attention(batch.q, batch.k, batch.k, compress_block=cfg.compress_block,
                                            compress_stride=cfg.compress_stride, scale=p.scale, **seqlens)
    x = Inputs(batch.q, batch.k, lse, list(p.k_lens), **seqlens)
    ours = Inputs(_as(batch.q, p.dtype).detach(), _as(batch.k, p.dtype).detach(),
                  lse.to(torch.float64 if p.dtype == torch.float64 else torch.float32), x.k_lens, **seqlens)
    with poisoned_outputs():
        actual = nsa_ext.select_blocks(ours.q, ours.k_cmp, ours.lse, scale=p.scale, **cfg.kwargs, **ours.seqlens)
    check_selection(actual, x, cfg, rel=1e-9 if p.dtype == torch.float64 else 1e-5, scale=p.scale)
