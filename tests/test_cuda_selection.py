"""The CUDA kernels of selected-block attention: tiled tensor-core kernels (bf16 / fp16, head dims
64 / 128 / 256 / 192-128) and the baseline (fp32 / fp64, other head dims) against the fp64 reference and
the CPU kernel: G in 1, 2, 4, 8, 16 (and 3), select_block 32 / 64 / 128, packed with empty and length-1
sequences, TQ < TK, -1 / duplicate / out-of-range / future ids, determinism, poisoned outputs, opcheck,
torch.compile and the NSA layer; the schedule by blocks of the forward and dq
(NSA_SELECTION_SCHEDULE=blocks) likewise. Skipped without a GPU."""

import pytest
import torch

import nsa_ext
from nsa_ext import reference
from nsa_ext.bench import nsa_like_indices

from test_selection_attention import opcheck_samples, random_indices
from utils import (GPU, LOW_PRECISION, assert_close_fp32, assert_within_torch_error, check_bitwise_reruns,
                   check_opcheck, check_tensor_core_kernels, finite_cotangent, grads, max_error, poisoned_outputs,
                   random_batch, requires_device, requires_gpu)

pytestmark = requires_gpu

OPS = torch.ops.nsa
HEAD_DIMS = [(64, 64), (128, 128), (256, 256), (192, 128)]
NAMES = ["out", "lse", "dq", "dk", "dv"]


def fn(select_block):
    def run(mod, b, indices):
        return mod.selection_attention(b.q, b.k, b.v, indices, select_block=select_block, **b.seqlens)
    return run


def forward_backward(run, mod, batch, indices, cot_out, cot_lse):
    out, lse = run(mod, batch, indices)
    cots = [cot_out.to(out.device), None if cot_lse is None else cot_lse.to(lse.device)]
    return (out, lse, *grads((out, lse), (batch.q, batch.k, batch.v), cots))


def check_against_reference(run, exact, indices, dtype, gen, with_dlse=True):
    """Ours (CUDA, dtype) vs fp64; bf16 / fp16 within 2x the error of the reference run in dtype on the
    CPU, fp32 / fp64 to a relative tolerance."""
    ref_in = exact.to(torch.float64, requires_grad=True)
    out_ref, lse_ref = run(reference, ref_in, indices)
    cot_out = torch.randn(out_ref.shape, dtype=torch.float64, generator=gen)
    cot_lse = finite_cotangent(lse_ref, gen) if with_dlse else None
    exact_res = forward_backward(run, reference, ref_in, indices, cot_out, cot_lse)
    with poisoned_outputs():
        ours = forward_backward(run, nsa_ext, exact.to(dtype, GPU, requires_grad=True), indices.to(GPU), cot_out,
                                cot_lse)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if dtype in LOW_PRECISION:
        torch_res = forward_backward(run, reference, exact.to(dtype, requires_grad=True), indices, cot_out, cot_lse)
    for i, (name, a, e) in enumerate(zip(NAMES, ours, exact_res)):
        assert a.dtype == (lse_dtype if name == "lse" else dtype) and a.device.type == GPU
        if dtype in LOW_PRECISION:
            assert_within_torch_error(a.cpu(), torch_res[i], e, name=name)
        else:
            assert_close_fp32(a.cpu(), e, rel=1e-10 if dtype == torch.float64 else 1e-5, name=name)


def batch_and_indices(q_lens, k_lens, hq, hk, dk, dv, block, count, packed, gen, holes=0.1):
    exact = random_batch(q_lens, k_lens, hq, hk, dk, dv, packed, generator=gen)
    return exact, random_indices(q_lens, k_lens, hk, count, block, packed, gen, holes=holes)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("group", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_tiled_matches_reference(dtype, dims, group, packed):
    gen = torch.Generator().manual_seed(dims[0] * 100 + group)
    hk = 2 if group < 8 else 1
    q_lens, k_lens = ([0, 1, 150, 77], [0, 1, 150, 203]) if packed else ([150, 150], [150, 150])
    exact, idx = batch_and_indices(q_lens, k_lens, hk * group, hk, dims[0], dims[1], 64, 4, packed, gen)
    check_against_reference(fn(64), exact, idx, dtype, gen)


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("group", [1, 3, 16])
def test_select_blocks_and_tq_below_tk(block, group):
    # Partial last blocks, TQ < TK, NSA-like ids (forced first and local blocks), no dlse.
    gen = torch.Generator().manual_seed(block + group)
    exact = random_batch([200], [333], 2 * group, 2, 128, 128, packed=False, generator=gen)
    idx = nsa_like_indices(333, 2, 6, block, gen)[:, -200:]
    check_against_reference(fn(block), exact, idx, torch.bfloat16, gen, with_dlse=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_baseline_matches_reference(dtype, packed):
    gen = torch.Generator().manual_seed(3)
    q_lens, k_lens = ([0, 1, 70, 33], [0, 1, 90, 33]) if packed else ([70, 70], [90, 90])
    exact, idx = batch_and_indices(q_lens, k_lens, 8, 2, 24, 40, 16, 5, packed, gen)
    check_against_reference(fn(16), exact, idx, dtype, gen)


def test_other_head_dims_and_many_ids_fall_back_to_the_baseline():
    gen = torch.Generator().manual_seed(4)
    exact, idx = batch_and_indices([90], [90], 4, 2, 48, 32, 8, 12, False, gen)  # Dk = 48: no tiled kernel
    check_against_reference(fn(8), exact, idx, torch.bfloat16, gen)
    exact, idx = batch_and_indices([40], [2100], 2, 1, 64, 64, 2, 1100, False, gen)  # n too large for a tile
    check_against_reference(fn(2), exact, idx, torch.bfloat16, gen)


def test_bad_ids_are_ignored():
    gen = torch.Generator().manual_seed(5)
    exact, idx = batch_and_indices([100], [130], 8, 2, 64, 64, 32, 4, False, gen)
    idx[0, ::3, 0, 0] = 2**31 - 1
    idx[0, ::5, 1, 1] = -2**31
    idx[0, 1::4, 0, 2] = 4  # block 4 of 130 keys: keys 128, 129 (partial); future for early queries
    idx[0, 2::7, 1] = idx[0, 2::7, 1, :1]  # duplicates
    check_against_reference(fn(32), exact, idx, torch.float16, gen)


@requires_device
def test_matches_cpu_kernel():
    gen = torch.Generator().manual_seed(6)
    b = random_batch([300, 1, 0, 129], [300, 1, 0, 200], 16, 2, 128, 128, packed=True, dtype=torch.bfloat16,
                     generator=gen)
    idx = random_indices([300, 1, 0, 129], [300, 1, 0, 200], 2, 8, 64, True, gen)
    results = {}
    dout = torch.randn(b.q.shape[:-1] + (128,), generator=gen).to(torch.bfloat16)
    for device in ("cpu", "cuda"):
        x = b.to(torch.bfloat16, device, requires_grad=True)
        out, lse = nsa_ext.selection_attention(x.q, x.k, x.v, idx.to(device), select_block=64, **x.seqlens)
        results[device] = (out, lse, *torch.autograd.grad((out * dout.to(device)).sum(), (x.q, x.k, x.v)))
    for name, a, c in zip(NAMES, results["cuda"], results["cpu"]):
        finite = c[torch.isfinite(c)].abs().max() if c.numel() else torch.tensor(1.0)
        assert max_error(a.cpu(), c) <= 3e-2 * max(1.0, float(finite)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bitwise_deterministic(dtype):
    gen = torch.Generator().manual_seed(7)
    b = random_batch([700], [700], 16, 2, 128, 128, packed=False, dtype=dtype, generator=gen)
    idx = nsa_like_indices(700, 2, 8, 64, gen).to(GPU)
    dout = torch.randn(1, 700, 16, 128, generator=gen).to(dtype).to(GPU)

    def run_once():
        x = b.to(dtype, GPU, requires_grad=True)
        out, lse = nsa_ext.selection_attention(x.q, x.k, x.v, idx, select_block=64)
        return (out, lse, *torch.autograd.grad((out * dout).sum() + lse.sum(), (x.q, x.k, x.v)))

    check_bitwise_reruns(run_once)


@pytest.mark.parametrize("schedule", ["tiles", "blocks"])
def test_rows_that_see_nothing(monkeypatch, schedule):
    monkeypatch.setenv("NSA_SELECTION_SCHEDULE", schedule)
    gen = torch.Generator().manual_seed(8)
    b = random_batch([70], [40], 4, 2, 64, 64, packed=False, dtype=torch.bfloat16, generator=gen)
    x = b.to(torch.bfloat16, GPU, requires_grad=True)
    idx = torch.full((1, 70, 2, 3), -1, dtype=torch.int32)
    idx[0, 30:, :, 0] = 0  # the first 30 queries (before position 0) and the -1 rows see nothing
    idx[0, 50:, 1, 0] = -1
    with poisoned_outputs():
        out, lse = nsa_ext.selection_attention(x.q, x.k, x.v, idx.to(GPU), select_block=16, max_seqlen_q=70,
                                               max_seqlen_k=40)
    assert torch.equal(out[:, :30], torch.zeros_like(out[:, :30]))
    assert torch.isneginf(lse[:, :30]).all() and torch.isneginf(lse[:, 50:, 2:]).all()
    dq, dk = torch.autograd.grad(out.float().sum() + lse[:, 30:50].sum(), (x.q, x.k))
    assert torch.equal(dq[:, :30], torch.zeros_like(dq[:, :30])) and not torch.isnan(dq).any()
    assert torch.equal(dk[:, 16:], torch.zeros_like(dk[:, 16:]))  # no query chose block 1 or 2


def test_tiled_kernels_are_the_ones_that_run():
    gen = torch.Generator().manual_seed(9)
    b = random_batch([128], [128], 4, 2, 64, 64, packed=False, dtype=torch.bfloat16, generator=gen)
    x = b.to(torch.bfloat16, GPU, requires_grad=True)
    idx = nsa_like_indices(128, 2, 4, 32, gen).to(GPU)
    out = []
    check_tensor_core_kernels(
        [lambda: out.append(nsa_ext.selection_attention(x.q, x.k, x.v, idx, select_block=32)[0]),
         lambda: out[0].sum().backward()],
        [f"tiled::{kernel}" for kernel in ("fwd_kernel", "delta_kernel", "dq_kernel", "dkv_kernel")] +
        ["SelectionSchedule", "SelectionKeyBlock"])


def test_tile_positions_knob_gives_the_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(10)
    b = random_batch([200], [200], 2, 2, 64, 64, packed=False, dtype=torch.float16, generator=gen)
    idx = nsa_like_indices(200, 2, 6, 32, gen).to(GPU)
    x = b.to(torch.float16, GPU)
    base = nsa_ext.selection_attention(x.q, x.k, x.v, idx, select_block=32)
    for positions in ("1", "5", "64"):
        monkeypatch.setenv("NSA_SELECTION_TILE_POSITIONS", positions)
        for a, e in zip(nsa_ext.selection_attention(x.q, x.k, x.v, idx, select_block=32), base):
            torch.testing.assert_close(a, e, rtol=0, atol=2e-3)


# --- the schedule by blocks (NSA_SELECTION_SCHEDULE=blocks) ---------------------------------------------

def by_blocks(monkeypatch, chunk_rows, heads_q, count, dv):
    """Selects the forward and dq by blocks with chunks of `chunk_rows` index rows for the forward's
    partials (Dv + 1 floats per slot), and of about as many for dq's (Dk floats per slot)."""
    monkeypatch.setenv("NSA_SELECTION_SCHEDULE", "blocks")
    monkeypatch.setenv("NSA_SELECTION_PARTIAL_BYTES", str(chunk_rows * heads_q * count * (dv + 1) * 4))


@pytest.mark.parametrize("group", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_by_blocks_matches_reference(monkeypatch, group, packed):
    # Chunks of 37 index rows (24 for dq at Dk 192): slots straddle chunks and the partial buffers are
    # reused; G = 3 with Dk != Dv, G = 2 at 256; empty and length-1 sequences; 10% of the slots -1.
    gen = torch.Generator().manual_seed(20 + group)
    hk = 2 if group < 8 else 1
    dims = {3: (192, 128), 2: (256, 256)}.get(group, (64, 64))
    q_lens, k_lens = ([0, 1, 150, 77], [0, 1, 150, 203]) if packed else ([150, 150], [150, 150])
    exact, idx = batch_and_indices(q_lens, k_lens, hk * group, hk, dims[0], dims[1], 32, 5, packed, gen)
    by_blocks(monkeypatch, 37, hk * group, 5, dims[1])
    check_against_reference(fn(32), exact, idx, torch.bfloat16, gen)


@pytest.mark.parametrize("block", [32, 128])
def test_by_blocks_bad_ids_and_tq_below_tk(monkeypatch, block):
    gen = torch.Generator().manual_seed(30 + block)
    exact, idx = batch_and_indices([100], [130], 8, 2, 128, 128, block, 4, False, gen)
    idx[0, ::3, 0, 0] = 2**31 - 1
    idx[0, ::5, 1, 1] = -2**31
    idx[0, 1::4, 0, 2] = 130 // block  # the partial last block; future for early queries
    idx[0, 2::7, 1] = idx[0, 2::7, 1, :1]  # duplicates
    by_blocks(monkeypatch, 1000, 8, 4, 128)
    check_against_reference(fn(block), exact, idx, torch.float16, gen)


def test_by_blocks_is_deterministic_and_uses_tensor_cores(monkeypatch):
    gen = torch.Generator().manual_seed(40)
    b = random_batch([300], [300], 4, 4, 64, 64, packed=False, dtype=torch.bfloat16, generator=gen)
    idx = nsa_like_indices(300, 4, 6, 32, gen).to(GPU)
    dout = torch.randn(1, 300, 4, 64, generator=gen).to(torch.bfloat16).to(GPU)
    by_blocks(monkeypatch, 50, 4, 6, 64)
    x = b.to(torch.bfloat16, GPU, requires_grad=True)
    out = []
    check_tensor_core_kernels(
        [lambda: out.extend(nsa_ext.selection_attention(x.q, x.k, x.v, idx, select_block=32)),
         lambda: torch.autograd.grad((out[0] * dout).sum(), x.q)],
        ["SelectionBlockSchedule", "combine_partials_kernel", "dq_kernel", "combine_dq_partials_kernel"])

    def run_once():
        y = b.to(torch.bfloat16, GPU, requires_grad=True)
        o, lse = nsa_ext.selection_attention(y.q, y.k, y.v, idx, select_block=32)
        return (o, lse, *torch.autograd.grad((o * dout).sum() + lse.sum(), (y.q, y.k, y.v)))

    check_bitwise_reruns(run_once)


def test_opcheck():
    samples = [tuple(a.to(GPU) if isinstance(a, torch.Tensor) else a for a in s) for s in opcheck_samples()]
    check_opcheck(OPS.selection_attention_fwd, OPS.selection_attention_bwd, samples, tensors_before_out=1)


def test_compile():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def layer(q, k, v, idx):
        out, lse = nsa_ext.selection_attention(q, k, v, idx, select_block=64)
        return (out.float() * 2).sum() + lse.sum()

    gen = torch.Generator().manual_seed(11)
    b = random_batch([100], [100], 8, 2, 128, 128, packed=False, dtype=torch.bfloat16, generator=gen)
    idx = nsa_like_indices(100, 2, 2, 64, gen).to(GPU)
    eager, comp = (b.to(torch.bfloat16, GPU, requires_grad=True) for _ in range(2))
    out, lse = nsa_ext.selection_attention(eager.q, eager.k, eager.v, idx, select_block=64)
    loss_eager = (out.float() * 2).sum() + lse.sum()
    loss = layer(comp.q, comp.k, comp.v, idx)
    torch.testing.assert_close(loss, loss_eager)
    for a, e in zip(torch.autograd.grad(loss, (comp.q, comp.k, comp.v)),
                    torch.autograd.grad(loss_eager, (eager.q, eager.k, eager.v))):
        torch.testing.assert_close(a, e)
