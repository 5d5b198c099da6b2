"""The tiled tensor-core CUDA kernels (bf16 / fp16) of sliding-window and compressed attention against
the fp64 reference and the CPU kernel: head dims 64 / 128 / 256 / 192-128, GQA groups 1..16, padded and
packed layouts with empty and length-1 sequences, TQ < TK, determinism, poisoned outputs, opcheck,
torch.compile and CUDA-graph capture. Skipped without a GPU."""

import pytest
import torch

import nsa_ext
from nsa_ext import reference

from utils import (EMULATED_CUDA, GPU, LOW_PRECISION, assert_within_torch_error, check_bitwise_reruns,
                   check_tensor_core_kernels, cu_seqlens, grads, max_error, poisoned_outputs, random_batch,
                   requires_device, requires_gpu)

pytestmark = requires_gpu

OPS = torch.ops.nsa
HEAD_DIMS = [(64, 64), (128, 128), (256, 256), (192, 128)]
NAMES = ["out", "lse", "dq", "dk", "dv"]


def window_fn(window):
    def run(mod, b):
        return mod.sliding_window_attention(b.q, b.k, b.v, window=window, **b.seqlens)
    return run


def compressed_fn(block, stride):
    def run(mod, b):
        return mod.compressed_attention(b.q, b.k, b.v, compress_block=block, compress_stride=stride, **b.seqlens)
    return run


def compressed_inputs(q_lens, k_lens, hq, hk, dk, dv, block, stride, packed, gen):
    tokens = [reference.num_compressed_tokens(n, block, stride) for n in k_lens]
    b = random_batch(q_lens, tokens, hq, hk, dk, dv, packed, generator=gen)
    if packed:
        b.cu_seqlens_k, b.max_seqlen_k = cu_seqlens(k_lens), max(k_lens, default=0)
    else:
        b.max_seqlen_k = k_lens[0]
    return b


def forward_backward(fn, mod, batch, cot_out, cot_lse):
    out, lse = fn(mod, batch)
    cots = [cot_out.to(out.device), None if cot_lse is None else cot_lse.to(lse.device)]
    return (out, lse, *grads((out, lse), (batch.q, batch.k, batch.v), cots))


def check_against_reference(fn, exact, dtype, gen, with_dlse=True):
    """Ours (CUDA, dtype) vs fp64, within 2x the error of the reference run in dtype on the CPU."""
    ref_in = exact.to(torch.float64, requires_grad=True)
    out_ref, lse_ref = fn(reference, ref_in)
    cot_out = torch.randn(out_ref.shape, dtype=torch.float64, generator=gen)
    cot_lse = None
    if with_dlse:
        cot_lse = torch.randn(lse_ref.shape, dtype=torch.float64, generator=gen)
        cot_lse = torch.where(torch.isinf(lse_ref), torch.zeros_like(cot_lse), cot_lse)
    exact_res = forward_backward(fn, reference, ref_in, cot_out, cot_lse)
    torch_res = forward_backward(fn, reference, exact.to(dtype, requires_grad=True), cot_out, cot_lse)
    with poisoned_outputs():
        ours = forward_backward(fn, nsa_ext, exact.to(dtype, GPU, requires_grad=True), cot_out, cot_lse)
    for name, a, t, e in zip(NAMES, ours, torch_res, exact_res):
        assert a.dtype == (torch.float32 if name == "lse" else dtype) and a.device.type == GPU
        assert_within_torch_error(a.cpu(), t, e, name=name)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("group", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_window_matches_reference(dtype, dims, group, packed):
    gen = torch.Generator().manual_seed(dims[0] * 100 + group)
    hk = 2 if group < 8 else 1
    q_lens, k_lens = ([0, 1, 150, 77], [0, 1, 150, 203]) if packed else ([150, 150], [150, 150])
    exact = random_batch(q_lens, k_lens, hk * group, hk, dims[0], dims[1], packed, generator=gen)
    check_against_reference(window_fn(37), exact, dtype, gen)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("group", [1, 4, 16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compressed_matches_reference(dtype, dims, group, packed):
    gen = torch.Generator().manual_seed(dims[0] * 7 + group)
    q_lens, k_lens = ([1, 0, 300, 45], [40, 0, 300, 400]) if packed else ([70, 70], [500, 500])
    exact = compressed_inputs(q_lens, k_lens, group * 2, 2, dims[0], dims[1], 32, 16, packed, gen)
    check_against_reference(compressed_fn(32, 16), exact, dtype, gen)


@pytest.mark.parametrize("window", [1, 64, 65, 1000])
def test_window_tile_boundaries(window):
    # Windows around the tile sizes; TQ < TK; no dlse (the op's dlse = None path).
    gen = torch.Generator().manual_seed(window)
    exact = random_batch([200], [333], 8, 2, 128, 128, packed=False, generator=gen)
    check_against_reference(window_fn(window), exact, torch.bfloat16, gen, with_dlse=False)


@requires_device
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_matches_cpu_kernel(dtype):
    gen = torch.Generator().manual_seed(1)
    b = random_batch([300, 1, 0, 129], [300, 1, 0, 200], 16, 2, 128, 128, packed=True, dtype=dtype, generator=gen)
    results = {}
    for device in ("cpu", "cuda"):
        x = b.to(dtype, device, requires_grad=True)
        out, lse = nsa_ext.sliding_window_attention(x.q, x.k, x.v, window=100, **x.seqlens)
        dout = torch.randn(out.shape, generator=gen).to(dtype).to(device) if device == "cpu" else dout.to(device)
        results[device] = (out, lse, *torch.autograd.grad((out * dout).sum(), (x.q, x.k, x.v)))
    for name, a, c in zip(NAMES, results["cuda"], results["cpu"]):
        finite = c[torch.isfinite(c)].abs().max() if c.numel() else torch.tensor(1.0)
        assert max_error(a.cpu(), c) <= 3e-2 * max(1.0, float(finite)), name


def test_rows_that_see_nothing():
    # TQ > TK puts early queries before position 0; compressed early queries see no token.
    gen = torch.Generator().manual_seed(2)
    b = random_batch([70], [40], 4, 4, 64, 64, packed=False, dtype=torch.bfloat16, generator=gen)
    x = b.to(torch.bfloat16, GPU, requires_grad=True)
    with poisoned_outputs():
        out, lse = nsa_ext.sliding_window_attention(x.q, x.k, x.v, window=8, max_seqlen_q=70, max_seqlen_k=40)
    assert torch.equal(out[:, :30], torch.zeros_like(out[:, :30]))
    assert torch.isneginf(lse[:, :30]).all() and torch.isfinite(lse[:, 30:]).all()
    dq, = torch.autograd.grad(out.float().sum() + lse[:, 30:].sum(), x.q)
    assert torch.equal(dq[:, :30], torch.zeros_like(dq[:, :30])) and not torch.isnan(dq).any()


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=lambda d: f"{d[0]}-{d[1]}")
def test_bitwise_deterministic(dims):
    gen = torch.Generator().manual_seed(3)
    b = random_batch([500], [500], 16, 2, dims[0], dims[1], packed=False, dtype=torch.bfloat16, generator=gen)
    dout = torch.randn(1, 500, 16, dims[1], generator=gen).to(GPU, torch.bfloat16)

    def run_once():
        x = b.to(torch.bfloat16, GPU, requires_grad=True)
        out, lse = nsa_ext.sliding_window_attention(x.q, x.k, x.v, window=128)
        return (out, lse, *torch.autograd.grad((out * dout).sum() + lse.sum(), (x.q, x.k, x.v)))

    check_bitwise_reruns(run_once)


def test_tiled_kernels_are_the_ones_that_run():
    gen = torch.Generator().manual_seed(4)
    b = random_batch([64], [64], 4, 2, 64, 64, packed=False, dtype=torch.bfloat16, generator=gen)
    x = b.to(torch.bfloat16, GPU, requires_grad=True)
    out = []
    check_tensor_core_kernels(
        [lambda: out.append(nsa_ext.sliding_window_attention(x.q, x.k, x.v, window=16)[0]),
         lambda: out[0].sum().backward()],
        [f"tiled::{kernel}" for kernel in ("fwd_kernel", "delta_kernel", "dq_kernel", "dkv_kernel")])


def _wgmma_available():
    if EMULATED_CUDA:
        return True  # the emulator is an H200
    return torch.cuda.get_device_capability()[0] == 9 and "9.0a" in nsa_ext.build_info()["cuda_archs"].split()


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=lambda d: f"{d[0]}-{d[1]}")
def test_wgmma_forward_matches_reference(dims, monkeypatch):
    """The Hopper forward and dq kernels (NSA_WGMMA=1: wgmma, core-matrix tiles) under the same
    2x-torch-error rule, both branches, packed with empty and length-1 sequences, G = 3 (tiles straddle
    positions), and they are the kernels that run (emulated wgmma instructions, no mma.sync in the
    forward; on a GPU their kernel names)."""
    if not _wgmma_available():
        pytest.skip("wgmma needs an sm_90 GPU and a build with sm_90a code")
    monkeypatch.setenv("NSA_WGMMA", "1")
    gen = torch.Generator().manual_seed(dims[0] + 11)
    exact = random_batch([0, 1, 150, 77], [0, 1, 150, 203], 6, 2, dims[0], dims[1], True, generator=gen)
    check_against_reference(window_fn(37), exact, torch.bfloat16, gen)
    # Four to six key tiles per query tile: the forward's three-stage pipeline reuses every stage and
    # runs each P V under the next tile's softmax.
    exact = random_batch([330], [330], 6, 2, dims[0], dims[1], False, generator=gen)
    check_against_reference(window_fn(250), exact, torch.bfloat16, gen)
    exact = compressed_inputs([1, 0, 300, 45], [40, 0, 300, 400], 6, 2, dims[0], dims[1], 32, 16, True, gen)
    check_against_reference(compressed_fn(32, 16), exact, torch.float16, gen)
    x = exact.to(torch.bfloat16, GPU, requires_grad=True)
    out = []
    forward = lambda: out.append(compressed_fn(32, 16)(nsa_ext, x)[0])  # noqa: E731
    backward = lambda: out[0].float().sum().backward()  # noqa: E731
    if EMULATED_CUDA:
        ran = []
        for step in (forward, backward):
            nsa_ext._C._emulation_counters()
            step()
            ran.append(nsa_ext._C._emulation_counters())
        assert ran[0]["wgmma"] > 0 and ran[0]["mma"] == 0 and ran[0]["ldmatrix"] == 0, ran[0]
        assert ran[1]["wgmma"] > 0, ran[1]  # dq (dk / dv stay on mma.sync)
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            forward()
            backward()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if "WarpgroupMma" in e.name]
        assert any("fwd_kernel" in n for n in names) and any("dq_kernel" in n for n in names), names


def test_unaligned_rows_fall_back_to_the_baseline():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1, 50, 4, 72, generator=gen).to(torch.bfloat16)
    q = base[..., 4:68].to(GPU)  # row starts 8 bytes off 16-byte alignment
    k, v = (torch.randn(1, 50, 2, 64, generator=gen).to(GPU, torch.bfloat16) for _ in range(2))
    out, lse = nsa_ext.sliding_window_attention(q, k, v, window=9)
    ref_out, ref_lse = reference.sliding_window_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), window=9)
    assert max_error(out.cpu(), ref_out) < 3e-2 and max_error(lse.cpu(), ref_lse) < 1e-2


def test_opcheck():
    gen = torch.Generator().manual_seed(6)
    for packed in (False, True):
        b = random_batch([33, 20], [33, 20] if packed else [33, 33], 4, 2, 64, 64, packed=packed, dtype=torch.bfloat16,
                         generator=gen) if packed else random_batch([33], [33], 4, 2, 64, 64, packed=False,
                                                                    dtype=torch.bfloat16, generator=gen)
        x = b.to(torch.bfloat16, GPU, requires_grad=True)
        seq = x.seqlens
        args = (x.q, x.k, x.v, 9, 0.125, seq["cu_seqlens_q"], seq["cu_seqlens_k"],
                seq["max_seqlen_q"] or 33, seq["max_seqlen_k"] or 33)
        torch.library.opcheck(OPS.sliding_window_attention_fwd.default, args)
        out, lse = OPS.sliding_window_attention_fwd(*args)
        bwd = (torch.randn_like(out), torch.randn_like(lse), x.q.detach(), x.k.detach(), x.v.detach(), out.detach(),
               lse.detach(), *args[3:])
        torch.library.opcheck(OPS.sliding_window_attention_bwd.default, bwd)


def test_compile():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def layer(q, k, v):
        out, lse = nsa_ext.sliding_window_attention(q, k, v, window=32)
        return (out.float() * 2).sum() + lse.sum()

    gen = torch.Generator().manual_seed(7)
    b = random_batch([100], [100], 8, 2, 128, 128, packed=False, dtype=torch.bfloat16, generator=gen)
    eager, comp = (b.to(torch.bfloat16, GPU, requires_grad=True) for _ in range(2))
    out, lse = nsa_ext.sliding_window_attention(eager.q, eager.k, eager.v, window=32)
    loss_eager = (out.float() * 2).sum() + lse.sum()
    loss = layer(comp.q, comp.k, comp.v)
    torch.testing.assert_close(loss, loss_eager)
    for a, e in zip(torch.autograd.grad(loss, (comp.q, comp.k, comp.v)),
                    torch.autograd.grad(loss_eager, (eager.q, eager.k, eager.v))):
        torch.testing.assert_close(a, e)


@requires_device
def test_cuda_graph_capture():
    gen = torch.Generator().manual_seed(8)
    b = random_batch([128], [128], 8, 2, 64, 64, packed=False, dtype=torch.float16, generator=gen)
    x = b.to(torch.float16, GPU)
    dout = torch.randn(1, 128, 8, 64, generator=gen).to(GPU, torch.float16)
    args = (x.q, x.k, x.v, 40, 0.125, None, None, 128, 128)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture
        out, lse = OPS.sliding_window_attention_fwd(*args)
        OPS.sliding_window_attention_bwd(dout, None, x.q, x.k, x.v, out, lse, *args[3:])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = OPS.sliding_window_attention_fwd(*args)
        g_grads = OPS.sliding_window_attention_bwd(dout, None, x.q, x.k, x.v, g_out, g_lse, *args[3:])
    x.q.copy_(torch.randn(x.q.shape, generator=gen).to(torch.float16))
    graph.replay()
    torch.cuda.synchronize()
    out, lse = OPS.sliding_window_attention_fwd(*args)
    grads_eager = OPS.sliding_window_attention_bwd(dout, None, x.q, x.k, x.v, out, lse, *args[3:])
    assert torch.equal(g_out, out) and torch.equal(g_lse, lse)
    for a, c in zip(g_grads, grads_eager):
        assert torch.equal(a, c)
