"""Long sequences: one bf16 buffer of 2,151,682,048 elements (> 2^31, 4.0 GiB) read by every CPU kernel
at element offsets past 2^31, which only 64-bit offsets reach.

Largest sequence tested: TK = 2,101,248 keys (packed, after a sequence of 4), Hk = 1, Dk = 1024, as the
keys of sliding_window_attention (forward and backward), the compressed tokens of compressed_attention
and select_blocks (l = d = 1: one token per key); the same buffer viewed as q [525,313, 64, 64] of
selection_attention (forward; its backward keeps fp32 copies of every input, 8 GiB more). Only a few
queries at the far end of each sequence do work, and their rows are checked against the reference on
the slice of keys they can see. Peak resident memory 8.8 GiB (the buffer and the backward's dk,
measured). About 1 to 2.5 minutes on 2 cores.

Queries see only the last SLICE keys of the long sequence: the window and the selected blocks lie
there, and for the compressed branch every earlier key is (-3e4, 0, ..) against q's first feature 1,
a logit of -940 whose exp is exactly 0 in fp32 and fp64, so the slice gives the full sequence's result.
"""

import pytest
import torch

import nsa_ext
from nsa_ext import reference

from test_select_blocks import Config, Inputs, check_selection
from utils import assert_within_torch_error, finite_cotangent, grads, poisoned_outputs

pytestmark = pytest.mark.slow

DIM = 1024
SHORT = 4                   # keys of sequence 0
LONG = 2**21 + 2**12        # keys of sequence 1
SLICE = 2**12               # the keys its queries see, at the end
ROWS = SHORT + LONG         # rows of the buffer: ROWS * DIM > 2^31
Q_LENS = (3, 4)             # queries of the two sequences (bottom-right aligned)
DTYPE = torch.bfloat16


def cu(*offsets):
    return torch.tensor(offsets, dtype=torch.int32)


@pytest.fixture(scope="module")
def keys():
    """The buffer [ROWS, 1, DIM]: sequence 0 and the last SLICE keys random, the rest (-3e4, 0, ..)."""
    assert ROWS * DIM > 2**31 and (ROWS - SLICE) * DIM > 2**31
    gen = torch.Generator().manual_seed(0)
    k = torch.zeros(ROWS, 1, DIM, dtype=DTYPE)
    k[SHORT:ROWS - SLICE, :, 0] = -3e4
    k[:SHORT] = torch.randn(SHORT, 1, DIM, generator=gen)
    k[ROWS - SLICE:] = torch.randn(SLICE, 1, DIM, generator=gen)
    yield k
    del k


def small_inputs(gen):
    """q [7, 2, DIM] (first feature 1), v [ROWS, 1, 8], and the packed layout."""
    q = torch.randn(sum(Q_LENS), 2, DIM, generator=gen).to(DTYPE)
    q[..., 0] = 1
    v = torch.randn(ROWS, 1, 8, generator=gen).to(DTYPE)
    seqlens = dict(cu_seqlens_q=cu(0, Q_LENS[0], sum(Q_LENS)), cu_seqlens_k=cu(0, SHORT, ROWS),
                   max_seqlen_q=max(Q_LENS), max_seqlen_k=LONG)
    return q, v, seqlens


def sequence_slices():
    """(query rows, key rows of the slice the reference sees) of each sequence."""
    return [(slice(0, Q_LENS[0]), slice(0, SHORT)), (slice(Q_LENS[0], sum(Q_LENS)), slice(ROWS - SLICE, ROWS))]


def test_sliding_window_forward_and_backward(keys):
    gen = torch.Generator().manual_seed(1)
    q, v, seqlens = small_inputs(gen)
    q.requires_grad_()
    v.requires_grad_()
    keys.requires_grad_()
    try:
        with poisoned_outputs():
            out, lse = nsa_ext.sliding_window_attention(q, keys, v, window=64, **seqlens)
        dout = torch.randn(out.shape, generator=gen).to(DTYPE)
        dlse = finite_cotangent(lse, gen).float()
        with poisoned_outputs():
            dq, dk, dv = torch.autograd.grad((out, lse), (q, keys, v), (dout, dlse))
    finally:
        keys.requires_grad_(False)
    # Keys before the slices get zero gradient (a sample: reading all 4 GiB would take seconds).
    assert not dk[SHORT:ROWS - SLICE:4099].any() and not dv[SHORT:ROWS - SLICE:4099].any()
    for rows, key_rows in sequence_slices():
        def run(dtype):  # the reference on the sequence's slice, as one padded sequence
            ins = [t.detach()[r][None].to(dtype).requires_grad_()
                   for t, r in ((q, rows), (keys, key_rows), (v, key_rows))]
            o, l = reference.sliding_window_attention(*ins, window=64)
            return (o, l, *grads((o, l), ins, (dout[rows][None], dlse[rows][None])))
        ours = (out[rows], lse[rows], dq[rows], dk[key_rows], dv[key_rows])
        for name, a, lo, e in zip(["out", "lse", "dq", "dk", "dv"], ours, run(DTYPE), run(torch.float64)):
            assert_within_torch_error(a.detach()[None], lo.detach(), e.detach(), name=name)


@pytest.fixture(scope="module")
def compressed(keys):
    """compressed_attention with the buffer as k_cmp (l = d = 1: TC = TK), and its inputs."""
    gen = torch.Generator().manual_seed(2)
    q, v, seqlens = small_inputs(gen)
    with poisoned_outputs():
        out, lse = nsa_ext.compressed_attention(q, keys, v, compress_block=1, compress_stride=1, **seqlens)
    return q, v, seqlens, out, lse


def test_compressed_attention_forward(keys, compressed):
    q, v, seqlens, out, lse = compressed
    for rows, key_rows in sequence_slices():
        def run(dtype):  # the reference on the sequence's slice, as one padded sequence of TK = the slice
            return reference.compressed_attention(q[rows][None].to(dtype), keys[key_rows][None].to(dtype),
                                                  v[key_rows][None].to(dtype), compress_block=1, compress_stride=1,
                                                  max_seqlen_k=key_rows.stop - key_rows.start)
        for name, a, lo, e in zip(["out", "lse"], (out[rows], lse[rows]), run(DTYPE), run(torch.float64)):
            assert_within_torch_error(a[None], lo, e, name=name)


def test_select_blocks(keys, compressed):
    q, _, seqlens, _, lse = compressed
    cfg = Config(1, 1, 64, 5, init_blocks=0, local_blocks=1)  # init 0: block 0 is no block of the slice
    with poisoned_outputs():
        ids = nsa_ext.select_blocks(q, keys, lse, **cfg.kwargs, **seqlens)
    rows, key_rows = sequence_slices()[1]
    offset = (LONG - SLICE) // cfg.select_block  # blocks before the slice: none scores above 0
    assert (ids[rows] >= offset).all()
    exact = Inputs(q[rows][None].double(), keys[key_rows][None].double(), lse[rows][None].double(), [SLICE],
                   max_seqlen_k=SLICE)
    check_selection(ids[rows][None] - offset, exact, cfg, rel=1e-5)


def test_selection_attention_forward(keys):
    """The buffer as q [525,313, 64, 64] of one sequence (queries at offsets up to 2^31 + 2^22), against
    k [525,313, 1, 64]; every query but the last 8 has only -1 ids (no work), those 8 pick blocks of
    32 keys at the end, with out-of-range and future ids among them."""
    q = keys.view(-1, 64, 64)
    t = q.shape[0]
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(t, 1, 64, generator=gen).to(DTYPE)
    v = torch.randn(t, 1, 8, generator=gen).to(DTYPE)
    start = (t - 1024) // 32 * 32  # the slice starts at a block
    blocks = -(-t // 32)
    ids = torch.full((t, 1, 4), -1, dtype=torch.int32)
    ids[-8:] = torch.randint(start // 32, blocks + 2, (8, 1, 4), generator=gen, dtype=torch.int32)
    seqlens = dict(cu_seqlens_q=cu(0, t), cu_seqlens_k=cu(0, t), max_seqlen_q=t, max_seqlen_k=t)
    with poisoned_outputs():
        out, lse = nsa_ext.selection_attention(q, k, v, ids, select_block=32, **seqlens)
    assert (out[:-8] == 0).all() and (lse[:-8] == float("-inf")).all()
    assert torch.isfinite(lse[-8:]).any()

    def run(dtype):
        local = torch.where(ids[-8:] >= 0, ids[-8:] - start // 32, ids[-8:])
        return reference.selection_attention(q[-8:][None].to(dtype), k[start:][None].to(dtype),
                                             v[start:][None].to(dtype), local[None], select_block=32)
    for name, a, lo, e in zip(["out", "lse"], (out[-8:][None], lse[-8:][None]), run(DTYPE), run(torch.float64)):
        assert_within_torch_error(a, lo, e, name=name)
