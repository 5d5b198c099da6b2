"""Shared test helpers: input generation in both layouts, the error rules, poisoned outputs."""

import contextlib
import os
from dataclasses import dataclass
from typing import List, Optional

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The CUDA tests' device: "cuda", or "cpu" in a child of tests/test_cuda_emulated.py, which runs them
# against the emulation build (scripts/emulate.sh), where CPU tensors take the CUDA kernels.
EMULATED_CUDA = os.environ.get("NSA_TEST_EMULATED_CUDA") == "1"
GPU = "cpu" if EMULATED_CUDA else "cuda"
requires_gpu = pytest.mark.skipif(not (EMULATED_CUDA or torch.cuda.is_available()),
                                  reason="needs a CUDA device (or the emulation build)")
# CUDA graphs, the profiler, and comparisons with the CPU kernels (which the emulation build bypasses).
requires_device = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LOW_PRECISION = [torch.bfloat16, torch.float16]


def seqlens_kwargs(inputs) -> dict:
    """The layout keywords every op takes, read from an object that carries them as attributes."""
    return dict(cu_seqlens_q=inputs.cu_seqlens_q, cu_seqlens_k=inputs.cu_seqlens_k,
                max_seqlen_q=inputs.max_seqlen_q, max_seqlen_k=inputs.max_seqlen_k)


@dataclass
class Batch:
    """Attention inputs in one layout, plus what the ops need to know about it."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: Optional[int] = None
    max_seqlen_k: Optional[int] = None

    seqlens = property(seqlens_kwargs)

    def to(self, dtype=None, device=None, requires_grad=False) -> "Batch":
        def conv(t):
            return t.detach().to(dtype=dtype, device=device).clone().requires_grad_(requires_grad)
        cu = None if self.cu_seqlens_q is None else self.cu_seqlens_q.to(device)
        cu_k = None if self.cu_seqlens_k is None else self.cu_seqlens_k.to(device)
        return Batch(conv(self.q), conv(self.k), conv(self.v), cu, cu_k, self.max_seqlen_q, self.max_seqlen_k)


def cu_seqlens(lengths: List[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def random_batch(q_lens: List[int], k_lens: List[int], heads_q: int, heads_k: int, dim_qk: int, dim_v: int,
                 packed: bool, dtype=torch.float64, generator=None) -> Batch:
    """Fresh random inputs (never zeros). Padded layout needs equal lengths across the batch."""
    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)
    if packed:
        return Batch(randn(sum(q_lens), heads_q, dim_qk), randn(sum(k_lens), heads_k, dim_qk),
                     randn(sum(k_lens), heads_k, dim_v), cu_seqlens(q_lens), cu_seqlens(k_lens),
                     max(q_lens, default=0), max(k_lens, default=0))
    assert len(set(q_lens)) <= 1 and len(set(k_lens)) <= 1
    b, tq, tk = len(q_lens), q_lens[0], k_lens[0]
    return Batch(randn(b, tq, heads_q, dim_qk), randn(b, tk, heads_k, dim_qk), randn(b, tk, heads_k, dim_v))


def strided_qkv(generator=None):
    """q [2, 50, 4, 16], k [2, 50, 1, 16], v [2, 50, 1, 8], none of them contiguous: heads and head
    dims sliced out of wider tensors (strided rows and heads), v transposed."""
    base = torch.randn(2, 50, 6, 32, generator=generator)
    v = torch.randn(2, 4, 50, 8, generator=generator).transpose(1, 2)[:, :, :1]
    return base[:, :, :4, :16], base[:, :, 4:5, 16:], v


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, with -inf == -inf counted as equal."""
    a, e = actual.detach().double(), expected.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(e) & (a.sign() == e.sign())
    diff = torch.where(both_inf, torch.zeros_like(a), (a - e).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, name: str = ""):
    """fp32 kernel vs fp64 reference: max error within `rel` of the reference's magnitude."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in output"
    finite = expected.detach()[torch.isfinite(expected.detach())]
    magnitude = float(finite.abs().max()) if finite.numel() else 1.0
    err = max_error(actual, expected)
    assert err <= rel * max(magnitude, 1.0), f"{name}: max error {err:.3e} > {rel:.0e} x {magnitude:.3e}"


def assert_within_torch_error(actual: torch.Tensor, low_precision_ref: torch.Tensor, exact: torch.Tensor,
                              name: str = ""):
    """FlashAttention's rule: error vs the fp64 result at most 2x the error of the same computation
    done by plain PyTorch in the low precision dtype (plus a hair for results torch gets exact)."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in output"
    ours = max_error(actual, exact)
    torch_err = max_error(low_precision_ref, exact)
    finite = exact.detach()[torch.isfinite(exact.detach())]
    slack = 1e-5 * max(float(finite.abs().max()), 1.0) if finite.numel() else 0.0
    assert ours <= 2 * torch_err + slack, f"{name}: error {ours:.3e} > 2 x torch's {torch_err:.3e}"


@contextlib.contextmanager
def poisoned_outputs():
    """Every tensor an op allocates without initialising starts as NaN, so an output element a
    kernel forgets to write fails the comparison instead of passing by luck."""
    import torch.utils.deterministic as det
    old_mode, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_mode)
        det.fill_uninitialized_memory = old_fill


def grads(outputs, inputs, cotangents):
    """Gradients of sum(out * cotangent) over (out, cotangent) pairs w.r.t. inputs."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if c is not None]
    loss = sum((o.double() * c.double()).sum() for o, c in pairs)
    return torch.autograd.grad(loss, inputs)


def finite_cotangent(lse: torch.Tensor, generator=None) -> torch.Tensor:
    """Random cotangent for lse; zero on rows whose lse is -inf (they have no gradient)."""
    g = torch.randn(lse.shape, dtype=torch.float64, generator=generator).to(lse.device)
    return torch.where(torch.isinf(lse.double()), torch.zeros_like(g), g)


# --- checks every attention op's tests run, parameterised by how to call the op ---------------------

def check_compiled_matches_eager(attn, cases, device="cpu"):
    """torch.compile(fullgraph=True, dynamic=True) of loss = sum(2 out) + sum(lse), with
    (out, lse) = attn(q, k, v, *extra), equals eager in value and gradients. `cases` holds
    (batch, extra) pairs of different sizes: the later ones reuse the dynamic graph."""
    torch._dynamo.reset()

    def loss_fn(q, k, v, *extra):
        out, lse = attn(q, k, v, *extra)
        return (out * 2).sum() + lse.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    for batch, extra in cases:
        eager_in, comp_in = (batch.to(torch.float32, device, requires_grad=True) for _ in range(2))
        loss_eager = loss_fn(eager_in.q, eager_in.k, eager_in.v, *extra)
        loss = compiled(comp_in.q, comp_in.k, comp_in.v, *extra)
        torch.testing.assert_close(loss, loss_eager)
        for a, e in zip(torch.autograd.grad(loss, (comp_in.q, comp_in.k, comp_in.v)),
                        torch.autograd.grad(loss_eager, (eager_in.q, eager_in.k, eager_in.v))):
            torch.testing.assert_close(a, e)


def check_compiled_without_graph_break(fn, args):
    """fn(*args) -> scalar loss traces without a graph break, compiles with fullgraph=True to the
    same value, and its backward gives finite, non-zero gradients to args[0]."""
    torch._dynamo.reset()
    assert torch._dynamo.explain(fn)(*args).graph_break_count == 0
    loss = torch.compile(fn, fullgraph=True)(*args)
    torch.testing.assert_close(loss, fn(*args))
    loss.backward()
    grad = args[0].grad
    assert grad is not None and not torch.isnan(grad).any() and grad.abs().sum() > 0


def check_opcheck(fwd, bwd, samples, tensors_before_out=0):
    """torch.library.opcheck of a forward op on every sample and of its backward op, with and without
    dlse. The backward takes (dout, dlse, q, k, v, *config[:tensors_before_out], out, lse,
    *config[tensors_before_out:]) where config is the forward's arguments after q, k, v."""
    for args in samples:
        torch.library.opcheck(fwd.default, args)
        q, k, v, *config = args
        out, lse = fwd(*args)
        dout, dlse = torch.randn_like(out), finite_cotangent(lse).to(lse.dtype)
        head = (q.detach(), k.detach(), v.detach(), *config[:tensors_before_out], out.detach(), lse.detach())
        bwd_args = (*head, *config[tensors_before_out:])
        torch.library.opcheck(bwd.default, (dout, dlse, *bwd_args))
        torch.library.opcheck(bwd.default, (dout, None, *bwd_args))


def check_fake_matches_real(op, samples):
    """The fake (meta) implementation gives the real outputs' shapes, strides and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    for args in samples:
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype


def check_export(module, args, op_name):
    """torch.export keeps the op as one node and the exported module computes what eager does."""
    exported = torch.export.export(module, args)
    assert any(op_name in str(n.target) for n in exported.graph.nodes)
    for a, e in zip(exported.module()(*args), module(*args)):
        torch.testing.assert_close(a, e)


def check_packed_equals_padded(attn, packed: Batch, per_query=()):
    """attn(q, k, v, *per_query, **seqlens) on a packed batch equals, sequence by sequence, the call
    on that sequence alone in padded layout: outputs and gradients (for a random dout). per_query
    are extra tensors with one row per query (sliced like q)."""
    packed = packed.to(torch.float32, requires_grad=True)
    out, lse = attn(packed.q, packed.k, packed.v, *per_query, **packed.seqlens)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad((out * dout).sum(), (packed.q, packed.k, packed.v))
    q_starts, k_starts = packed.cu_seqlens_q.tolist(), packed.cu_seqlens_k.tolist()
    for i in range(len(q_starts) - 1):
        rows, keys = slice(q_starts[i], q_starts[i + 1]), slice(k_starts[i], k_starts[i + 1])
        if rows.stop == rows.start:
            continue
        q, k, v = (t.detach()[r][None].clone().requires_grad_()
                   for t, r in ((packed.q, rows), (packed.k, keys), (packed.v, keys)))
        o1, l1 = attn(q, k, v, *(t[rows][None] for t in per_query))
        g = torch.autograd.grad((o1 * dout[rows][None]).sum(), (q, k, v))
        torch.testing.assert_close(o1[0], out[rows], rtol=0, atol=1e-6)
        torch.testing.assert_close(l1[0], lse[rows], rtol=0, atol=1e-6)
        for a, b, r in zip(g, (dq, dk, dv), (rows, keys, keys)):
            torch.testing.assert_close(a[0], b[r], rtol=0, atol=1e-5)


def check_deterministic_across_thread_counts(run_once):
    """run_once() -> tuple of tensors gives bitwise the same results twice with torch's thread count
    and once with a single thread."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            results.append(run_once())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


def check_bitwise_reruns(run_once, runs: int = 3):
    """run_once() -> tuple of tensors gives bitwise the same results every time (no atomics whose order
    changes from run to run)."""
    first = run_once()
    for _ in range(runs - 1):
        for a, c in zip(first, run_once()):
            assert torch.equal(a, c)


def check_tensor_core_kernels(steps, names):
    """The steps (callables, run one after another) launch kernels whose names contain each of `names`
    (the profiler's kernel names). Under emulation, where kernels have no names, each step must run
    tensor-core code instead: emulated mma and ldmatrix (or wgmma) and cp.async instructions, which the
    emulation build counts (a step that fell back to a baseline kernel runs none)."""
    if EMULATED_CUDA:
        import nsa_ext
        for step in steps:
            nsa_ext._C._emulation_counters()
            step()
            ran = nsa_ext._C._emulation_counters()
            assert (ran["mma"] > 0 and ran["ldmatrix"] > 0 or ran["wgmma"] > 0) and ran["cp_async"] > 0, ran
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for step in steps:
            step()
        torch.cuda.synchronize()
    launched = " ".join(e.name for e in prof.events())
    for name in names:
        assert name in launched, name
