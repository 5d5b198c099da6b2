"""Malformed offsets that only the device holds. On a GPU the host checks cu_seqlens (and decoding's
cache_seqlens) for dtype, shape and device but never reads them (that would cost a sync), so the
kernels hold every sequence to the tensors themselves (common/attention_params.h seq_span; decoding
clamps its lengths). Wrong offsets give wrong results, never an access outside a tensor: every op,
forward and backward, runs on such offsets, and where the cut spans are well-formed offsets the result
is bitwise that of those offsets. Under the CUDA emulator NSA_EMULATE_DEVICE_VALUES=1 leaves its CPU
tensors unchecked as a GPU's; test_cuda_memcheck runs these tests under AddressSanitizer, which
reports any access outside a tensor, and scripts/gpu_check.sh runs them on a GPU."""

import pytest
import torch

import nsa_ext

from test_decode_attention import make_cache
from utils import GPU, requires_gpu

pytestmark = requires_gpu

INT32_MAX, INT32_MIN = 2**31 - 1, -2**31
ROWS, MAX_LEN, HEADS_Q, HEADS_K, DIM = 40, 24, 4, 2, 64
CMP = dict(compress_block=8, compress_stride=4)
WELL_FORMED = (0, 16, 40)
# Offsets the kernels cut to WELL_FORMED: the last sequence past the rows, a negative start (queries).
CUT_Q = [(0, 16, 60), (-5, 16, 40)]
CUT_K = [(0, 16, 60)]
# Offsets with no well-formed equivalent: overlapping, a sequence longer than MAX_LEN (a gap), huge,
# negative; used for q and k together.
MALFORMED = [(0, 30, 10, 40), (0, 30, 40), (0, INT32_MAX, 40), (7, INT32_MAX, INT32_MIN), (-9, -3, -1)]


@pytest.fixture(autouse=True)
def unchecked_values(monkeypatch):
    monkeypatch.setenv("NSA_EMULATE_DEVICE_VALUES", "1")  # read by the emulation build only


def offsets(values):
    return torch.tensor(values, dtype=torch.int32, device=GPU)


def run_every_op(cu_q, cu_k, dtype, k_cmp_rows=8):
    """Window, compressed and selected-block attention (forward and backward) and select_blocks on
    packed rows with offsets cu_q / cu_k; returns every output and gradient. Same inputs every call."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=GPU).requires_grad_()

    q, k, v = randn(ROWS, HEADS_Q, DIM), randn(ROWS, HEADS_K, DIM), randn(ROWS, HEADS_K, DIM)
    k_cmp, v_cmp = randn(k_cmp_rows, HEADS_K, DIM), randn(k_cmp_rows, HEADS_K, DIM)
    ids = torch.randint(-1, 6, (ROWS, HEADS_K, 3), generator=gen, dtype=torch.int32).to(GPU)
    layout = dict(cu_seqlens_q=offsets(cu_q), cu_seqlens_k=offsets(cu_k), max_seqlen_q=MAX_LEN, max_seqlen_k=MAX_LEN)
    branches = [nsa_ext.sliding_window_attention(q, k, v, window=10, **layout),
                nsa_ext.compressed_attention(q, k_cmp, v_cmp, **CMP, **layout),
                nsa_ext.selection_attention(q, k, v, ids, select_block=8, **layout)]
    indices = nsa_ext.select_blocks(q.detach(), k_cmp.detach(), branches[1][1].detach(), **CMP, select_block=8,
                                    select_count=3, init_blocks=1, local_blocks=1, **layout)
    loss = 0
    for out, lse in branches:
        cot = torch.randn(out.shape, generator=gen).to(GPU)
        loss = loss + (out.float() * cot).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()
    grads = torch.autograd.grad(loss, (q, k, v, k_cmp, v_cmp))
    for (out, lse), name in zip(branches, ("window", "compressed", "selection")):
        assert out.shape == (ROWS, HEADS_Q, DIM) and lse.shape == (ROWS, HEADS_Q), name
    assert indices.shape == (ROWS, HEADS_K, 3)
    return [t for pair in branches for t in pair] + [indices, *grads]


@pytest.mark.parametrize("schedule", ["tiles", "blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["tiled", "baseline"])
def test_offsets_cut_to_the_rows_equal_well_formed_ones(dtype, schedule, monkeypatch):
    monkeypatch.setenv("NSA_SELECTION_SCHEDULE", schedule)
    expected = run_every_op(WELL_FORMED, WELL_FORMED, dtype)
    cases = [(cu_q, WELL_FORMED) for cu_q in CUT_Q] + [(WELL_FORMED, cu_k) for cu_k in CUT_K]
    for cu_q, cu_k in cases:
        for i, (a, e) in enumerate(zip(run_every_op(cu_q, cu_k, dtype), expected)):
            assert torch.equal(a, e), (cu_q, cu_k, i)


@pytest.mark.parametrize("schedule", ["tiles", "blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["tiled", "baseline"])
@pytest.mark.parametrize("cu", MALFORMED)
def test_malformed_offsets_stay_in_bounds(cu, dtype, schedule, monkeypatch):
    monkeypatch.setenv("NSA_SELECTION_SCHEDULE", schedule)
    results = run_every_op(cu, cu, dtype)
    half = tuple(x // 2 for x in cu)  # different sequences of queries and keys
    results += run_every_op(cu, half, dtype) + run_every_op(half, cu, dtype)
    # The kernels wrote only the (possibly racing) rows of their cut spans: nothing NaN came from
    # memory outside the inputs.
    assert all(not t.is_floating_point() or not t.isnan().any() for t in results)
    if GPU == "cuda":
        torch.cuda.synchronize()  # an illegal address would surface here


def test_too_few_compressed_rows_stay_in_bounds():
    # cu_seqlens_k = WELL_FORMED makes 3 + 5 compressed tokens; k_cmp holds 3 rows: the second
    # sequence's tokens are cut to none.
    results = run_every_op(WELL_FORMED, WELL_FORMED, torch.bfloat16, k_cmp_rows=3)
    assert all(not t.is_floating_point() or not t.isnan().any() for t in results)


def test_decode_lengths_are_clamped_to_the_cache():
    cfg = nsa_ext.NSAConfig(**CMP, select_block=8, select_count=3, init_blocks=1, local_blocks=1, window=10)
    c = make_cache([30, 17], 2, 4, 2, 64, 64, cfg, True, dtype=torch.bfloat16, poison=0.5, seed=3)
    capacity = c["k"].shape[1]

    def run(lengths):
        args = {name: (t.to(GPU) if isinstance(t, torch.Tensor) else t) for name, t in c.items()}
        return nsa_ext.native_sparse_attention_with_kvcache(
            args["q"], args["k"], args["v"], args["k_cmp"], args["v_cmp"], args["gates"], offsets(lengths),
            config=cfg, k_swa_cache=args["k_swa"], v_swa_cache=args["v_swa"], return_indices=True)

    full = run([capacity, capacity])
    for lengths in ([capacity + 1, INT32_MAX], [INT32_MAX, capacity + 7]):
        assert all(torch.equal(a, e) for a, e in zip(run(lengths), full)), lengths
    # Shorter than the new queries, negative: the queries before position 0 see nothing.
    for lengths in ([1, 0], [-5, INT32_MIN]):
        out, indices = run(lengths)
        assert out.shape == c["q"].shape[:3] + (64,) and not out.isnan().any()
        tq = c["q"].shape[1]
        for b, length in enumerate(lengths):
            for i in range(tq):
                if max(length, 0) - tq + i < 0:
                    assert (indices[b, i] == -1).all() and (out[b, i] == 0).all(), (lengths, b, i)
