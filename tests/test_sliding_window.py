"""Sliding-window attention (spec section 5): kernels vs the fp64 reference, autograd, opcheck,
torch.compile/export, layouts, determinism and input validation."""

import pytest
import torch

import nsa_ext
from nsa_ext import reference

from utils import (DEVICES, LOW_PRECISION, assert_close_fp32, assert_within_torch_error, check_compiled_matches_eager,
                   check_compiled_without_graph_break, check_deterministic_across_thread_counts, check_export,
                   check_fake_matches_real, check_opcheck, check_packed_equals_padded, finite_cotangent, grads,
                   max_error, poisoned_outputs, random_batch, strided_qkv)

OPS = torch.ops.nsa

# (q_lens, k_lens, Hq, Hk, Dk, Dv, window): odd sizes that are multiples of no tile, every G.
SHAPES = [
    ([37, 37], [37, 37], 4, 2, 16, 24, 5),        # G=2, Dk != Dv
    ([70], [200], 8, 2, 32, 16, 64),              # TQ < TK
    ([130, 130], [130, 130], 4, 4, 8, 8, 1),      # G=1, window 1: a query sees only itself
    ([150], [150], 6, 3, 16, 16, 1000),           # window > T: plain causal
    ([97], [97], 16, 1, 40, 24, 33),              # G=16
    ([65], [131], 8, 1, 24, 40, 129),             # G=8, TQ < TK
    ([19], [19], 36, 2, 8, 8, 7),                 # G=18
    ([1, 1], [1, 1], 4, 4, 8, 8, 3),              # single tokens
]


def run(batch, window, scale=None):
    return nsa_ext.sliding_window_attention(batch.q, batch.k, batch.v, window=window, scale=scale, **batch.seqlens)


def run_reference(batch, window, scale=None):
    return reference.sliding_window_attention(batch.q, batch.k, batch.v, window=window, scale=scale,
                                              **batch.seqlens)


def forward_backward(fn, batch, window, cotangents):
    out, lse = fn(batch, window)
    return (out, lse, *grads((out, lse), (batch.q, batch.k, batch.v), cotangents))


NAMES = ["out", "lse", "dq", "dk", "dv"]


# --- the reference itself, against an independent formulation ------------------------------------

@pytest.mark.parametrize("window", [1, 4, 50])
def test_reference_matches_sdpa_with_explicit_mask(window):
    gen = torch.Generator().manual_seed(0)
    b = random_batch([23], [41], 6, 2, 16, 8, packed=False, generator=gen)
    out, lse = run_reference(b, window)
    t = torch.arange(41 - 23, 41)[:, None]
    s = torch.arange(41)[None, :]
    mask = (s <= t) & (s > t - window)
    expected = torch.nn.functional.scaled_dot_product_attention(
        b.q.transpose(1, 2), b.k.transpose(1, 2), b.v.transpose(1, 2), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)
    scores = torch.einsum("bqhd,bkhd->bhqk", b.q, b.k.repeat_interleave(3, dim=2)) * 16 ** -0.5
    torch.testing.assert_close(lse, scores.masked_fill(~mask, float("-inf")).logsumexp(-1).transpose(1, 2))


# --- kernels vs reference ------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[2:])))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(shape, packed, dtype, device):
    q_lens, k_lens, hq, hk, dk, dv, window = shape
    gen = torch.Generator().manual_seed(hash((tuple(q_lens), hq, dk, window)) % 2**31)
    exact = random_batch(q_lens, k_lens, hq, hk, dk, dv, packed, generator=gen)
    ref_in = exact.to(torch.float64, requires_grad=True)
    out_ref, lse_ref = run_reference(ref_in, window)
    cot = (torch.randn(out_ref.shape, dtype=torch.float64, generator=gen), finite_cotangent(lse_ref, gen))
    expected = (out_ref, lse_ref, *grads((out_ref, lse_ref), (ref_in.q, ref_in.k, ref_in.v), cot))

    ours_in = exact.to(dtype, device, requires_grad=True)
    with poisoned_outputs():
        actual = forward_backward(run, ours_in, window, [c.to(device) for c in cot])
    for name, a, e in zip(NAMES, actual, expected):
        assert a.dtype == (dtype if name != "lse" else (torch.float64 if dtype == torch.float64 else torch.float32))
        assert a.device.type == device
        assert_close_fp32(a.cpu(), e, rel=1e-10 if dtype == torch.float64 else 1e-5, name=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:6], ids=lambda s: "x".join(map(str, s[2:])))
def test_low_precision_within_twice_torch_error(shape, dtype, device):
    q_lens, k_lens, hq, hk, dk, dv, window = shape
    gen = torch.Generator().manual_seed(7)
    exact = random_batch(q_lens, k_lens, hq, hk, dk, dv, packed=False, generator=gen)
    cot_out = torch.randn(exact.q.shape[:-1] + (dv,), dtype=torch.float64, generator=gen)
    results = {}
    for key, fn, batch in [("exact", run_reference, exact.to(torch.float64, requires_grad=True)),
                           ("torch", run_reference, exact.to(dtype, requires_grad=True)),
                           ("ours", run, exact.to(dtype, device, requires_grad=True))]:
        out, lse = fn(batch, window)
        results[key] = (out, lse, *grads((out,), (batch.q, batch.k, batch.v), [cot_out.to(out.device)]))
    for i, name in enumerate(NAMES):
        assert_within_torch_error(results["ours"][i].cpu(), results["torch"][i], results["exact"][i], name=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [-8.0, 0.0, 8.0])
def test_any_finite_scale_matches_reference(scale, device):
    # The kernels find each row's max from the unscaled scores, which flips to the min for scale < 0;
    # |scale| = 8 makes a wrong max overflow exp.
    gen = torch.Generator().manual_seed(11)
    exact = random_batch([150], [150], 8, 2, 16, 16, packed=False, generator=gen)
    ref_in = exact.to(torch.float64, requires_grad=True)
    out_ref, lse_ref = run_reference(ref_in, 40, scale)
    cot = (torch.randn(out_ref.shape, dtype=torch.float64, generator=gen), finite_cotangent(lse_ref, gen))
    expected = (out_ref, lse_ref, *grads((out_ref, lse_ref), (ref_in.q, ref_in.k, ref_in.v), cot))
    ours_in = exact.to(torch.float32, device, requires_grad=True)
    with poisoned_outputs():
        out, lse = run(ours_in, 40, scale)
        actual = (out, lse, *grads((out, lse), (ours_in.q, ours_in.k, ours_in.v), [c.to(device) for c in cot]))
    for name, a, e in zip(NAMES, actual, expected):
        assert_close_fp32(a.cpu(), e, rel=1e-5, name=name)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    for packed in (False, True):
        b = random_batch([5, 5], [7, 7], 4, 2, 3, 2, packed, generator=gen).to(torch.float64, requires_grad=True)

        def fn(q, k, v):
            return nsa_ext.sliding_window_attention(q, k, v, window=3, **b.seqlens)

        assert torch.autograd.gradcheck(fn, (b.q, b.k, b.v))


def test_rows_that_see_nothing_are_zero_with_zero_gradient():
    # Padded TQ > TK puts the first queries before position 0: they see no key.
    gen = torch.Generator().manual_seed(4)
    b = random_batch([6], [4], 2, 1, 8, 8, packed=False, generator=gen).to(torch.float64, requires_grad=True)
    out, lse = run(b, 2)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    assert torch.isinf(lse[:, :2]).all() and (lse[:, :2] < 0).all()
    dq, = torch.autograd.grad(out.sum() + lse[:, 2:].sum(), b.q)
    assert torch.equal(dq[:, :2], torch.zeros_like(dq[:, :2]))
    assert not torch.isnan(dq).any()
    out_ref, lse_ref = run_reference(b, 2)
    assert max_error(out, out_ref) < 1e-12 and max_error(lse, lse_ref) < 1e-12


# --- layouts -------------------------------------------------------------------------------------

def test_packed_equals_padded_per_sequence():
    gen = torch.Generator().manual_seed(5)
    lengths = [0, 1, 17, 64, 65, 3, 0, 130]
    packed = random_batch(lengths, lengths, 8, 2, 24, 16, packed=True, dtype=torch.float32, generator=gen)
    check_packed_equals_padded(lambda q, k, v, **seqlens: nsa_ext.sliding_window_attention(q, k, v, window=16,
                                                                                            **seqlens), packed)


def test_packed_rows_outside_every_sequence_are_defined():
    gen = torch.Generator().manual_seed(6)
    b = random_batch([5], [5], 2, 2, 8, 8, packed=True, dtype=torch.float32, generator=gen)
    q = torch.cat([b.q, torch.randn(3, 2, 8, generator=gen)])  # 3 trailing rows belong to no sequence
    with poisoned_outputs():
        out, lse = nsa_ext.sliding_window_attention(q, b.k, b.v, window=4, **b.seqlens)
    assert torch.equal(out[5:], torch.zeros_like(out[5:])) and torch.isinf(lse[5:]).all()


def test_non_contiguous_inputs():
    q, k, v = strided_qkv(torch.Generator().manual_seed(8))
    out, lse = nsa_ext.sliding_window_attention(q, k, v, window=9)
    ref_out, ref_lse = reference.sliding_window_attention(q.double(), k.double(), v.double(), window=9)
    assert_close_fp32(out, ref_out, name="out")
    assert_close_fp32(lse, ref_lse, name="lse")


# --- determinism ---------------------------------------------------------------------------------

def test_backward_is_bitwise_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(9)
    b = random_batch([300], [300], 8, 2, 32, 32, packed=False, dtype=torch.float32, generator=gen)
    dout = torch.randn(1, 300, 8, 32, generator=gen)

    def run_once():
        x = b.to(torch.float32, requires_grad=True)
        out, _ = run(x, 77)
        return torch.autograd.grad((out * dout).sum(), (x.q, x.k, x.v))

    check_deterministic_across_thread_counts(run_once)


# --- torch.library / compile / export -------------------------------------------------------------

def opcheck_samples(device):
    gen = torch.Generator().manual_seed(10)
    samples = []
    for packed in (False, True):
        for requires_grad in (False, True):
            b = random_batch([9, 9] if not packed else [9, 4], [9, 9] if not packed else [12, 4], 4, 2, 8, 6, packed,
                             dtype=torch.float32, generator=gen).to(torch.float32, device, requires_grad)
            seq = b.seqlens if packed else dict(cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=9, max_seqlen_k=9)
            samples.append((b.q, b.k, b.v, 4, 0.3, seq["cu_seqlens_q"], seq["cu_seqlens_k"], seq["max_seqlen_q"],
                            seq["max_seqlen_k"]))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    check_opcheck(OPS.sliding_window_attention_fwd, OPS.sliding_window_attention_bwd, opcheck_samples(device))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_dynamic(device):
    gen = torch.Generator().manual_seed(11)
    cases = [(random_batch([t], [t], 4, 2, 16, 8, packed=False, dtype=torch.float32, generator=gen), ())
             for t in (33, 47)]  # two lengths: the second reuses the dynamic graph
    check_compiled_matches_eager(lambda q, k, v: nsa_ext.sliding_window_attention(q, k, v, window=8), cases, device)


def test_compile_packed_no_graph_break():
    gen = torch.Generator().manual_seed(12)
    b = random_batch([5, 0, 9], [5, 0, 9], 2, 1, 8, 8, packed=True, dtype=torch.float32, generator=gen)
    b = b.to(torch.float32, requires_grad=True)

    def fn(q, k, v, cu_q, cu_k):
        return nsa_ext.sliding_window_attention(q, k, v, window=3, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                max_seqlen_q=9, max_seqlen_k=9)[0].sum()

    check_compiled_without_graph_break(fn, (b.q, b.k, b.v, b.cu_seqlens_q, b.cu_seqlens_k))


def test_export():
    class Window(torch.nn.Module):
        def forward(self, q, k, v):
            return nsa_ext.sliding_window_attention(q, k, v, window=5)

    gen = torch.Generator().manual_seed(13)
    b = random_batch([21], [21], 4, 2, 8, 8, packed=False, dtype=torch.float32, generator=gen)
    check_export(Window(), (b.q, b.k, b.v), "nsa.sliding_window_attention_fwd")


def test_fake_outputs_match_real_shapes_and_strides():
    check_fake_matches_real(OPS.sliding_window_attention_fwd, opcheck_samples("cpu"))


# --- input validation: one test per check, each naming the argument -----------------------------

def _good():
    gen = torch.Generator().manual_seed(14)
    return random_batch([8], [8], 4, 2, 16, 8, packed=False, dtype=torch.float32, generator=gen)


def _packed():
    gen = torch.Generator().manual_seed(15)
    return random_batch([3, 5], [3, 5], 4, 2, 16, 8, packed=True, dtype=torch.float32, generator=gen)


BAD_INPUTS = {
    "q rank": (lambda b: dict(q=b.q[0]), "q"),
    "k rank": (lambda b: dict(k=b.k[0]), "k"),
    "v rank": (lambda b: dict(v=b.v[..., 0]), "v"),
    "q dtype int": (lambda b: dict(q=b.q.to(torch.int32)), "q"),
    "k dtype mismatch": (lambda b: dict(k=b.k.double()), "k"),
    "v dtype mismatch": (lambda b: dict(v=b.v.half()), "v"),
    "q last dim not contiguous": (lambda b: dict(q=b.q.transpose(-1, -2).contiguous().transpose(-1, -2)), "q"),
    "q without heads": (lambda b: dict(q=b.q[:, :, :0]), "q"),
    "heads not divisible": (lambda b: dict(k=b.k[:, :, :1].expand(-1, -1, 3, -1).contiguous(),
                                           v=b.v[:, :, :1].expand(-1, -1, 3, -1).contiguous()), "k"),
    "v heads differ from k": (lambda b: dict(v=b.v[:, :, :1]), "v"),
    "k head dim differs from q": (lambda b: dict(k=b.k[..., :8]), "k"),
    "v rows differ from k": (lambda b: dict(v=b.v[:, :7]), "v"),
    "batch mismatch": (lambda b: dict(k=torch.cat([b.k, b.k]), v=torch.cat([b.v, b.v])), "k"),
    "window zero": (lambda b: dict(window=0), "window"),
    "scale nan": (lambda b: dict(scale=float("nan")), "scale"),
    "max_seqlen_q wrong in padded layout": (lambda b: dict(max_seqlen_q=3), "max_seqlen_q"),
    "only cu_seqlens_q": (lambda b: dict(cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32)), "cu_seqlens_k"),
}

BAD_PACKED = {
    "cu_seqlens int64": (lambda b: dict(cu_seqlens_q=b.cu_seqlens_q.long()), "cu_seqlens_q"),
    "cu_seqlens 2-D": (lambda b: dict(cu_seqlens_k=b.cu_seqlens_k[None]), "cu_seqlens_k"),
    "cu_seqlens not from 0": (lambda b: dict(cu_seqlens_q=b.cu_seqlens_q + 1), "cu_seqlens_q"),
    "cu_seqlens decreasing": (lambda b: dict(cu_seqlens_k=torch.tensor([0, 5, 3], dtype=torch.int32)),
                              "cu_seqlens_k"),
    "cu_seqlens past the rows": (lambda b: dict(cu_seqlens_q=torch.tensor([0, 3, 9], dtype=torch.int32),
                                                max_seqlen_q=6), "cu_seqlens_q"),
    "cu_seqlens different counts": (lambda b: dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32),
                                                   max_seqlen_k=8), "cu_seqlens_k"),
    "max_seqlen_k too small": (lambda b: dict(max_seqlen_k=2), "max_seqlen_k"),
}


def _call_with(batch, overrides):
    args = dict(q=batch.q, k=batch.k, v=batch.v, window=4, scale=None, **batch.seqlens)
    args.update(overrides)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return nsa_ext.sliding_window_attention(q, k, v, **args)


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_padded(case):
    make, name = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=f"'{name}'"):
        _call_with(_good(), make(_good()))


@pytest.mark.parametrize("case", list(BAD_PACKED), ids=list(BAD_PACKED))
def test_bad_input_packed(case):
    make, name = BAD_PACKED[case]
    with pytest.raises(ValueError, match=f"'{name}'"):
        _call_with(_packed(), make(_packed()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bad_input_device_mix():
    b = _good()
    with pytest.raises(ValueError, match="'k'"):
        nsa_ext.sliding_window_attention(b.q.cuda(), b.k, b.v.cuda(), window=4)


def test_backward_op_checks_its_extra_inputs():
    b = _good()
    out, lse = OPS.sliding_window_attention_fwd(b.q, b.k, b.v, 4, 0.25, None, None, 8, 8)
    with pytest.raises(ValueError, match="'dout'"):
        OPS.sliding_window_attention_bwd(out[..., :4], None, b.q, b.k, b.v, out, lse, 4, 0.25, None, None, 8, 8)
    with pytest.raises(ValueError, match="'lse'"):
        OPS.sliding_window_attention_bwd(out, None, b.q, b.k, b.v, out, lse.double(), 4, 0.25, None, None, 8, 8)
    with pytest.raises(ValueError, match="'dlse'"):
        OPS.sliding_window_attention_bwd(out, lse[:, :3], b.q, b.k, b.v, out, lse, 4, 0.25, None, None, 8, 8)
    with pytest.raises(ValueError, match="'out'"):
        OPS.sliding_window_attention_bwd(out, None, b.q, b.k, b.v, out.double(), lse, 4, 0.25, None, None, 8, 8)


# --- CUDA against CPU (skipped without a GPU) ----------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_cpu_kernel_and_is_deterministic(dtype):
    gen = torch.Generator().manual_seed(16)
    b = random_batch([200, 3, 0, 77], [200, 3, 0, 90], 8, 2, 64, 32, packed=True, dtype=dtype, generator=gen)
    results = {}
    for device in ("cpu", "cuda", "cuda"):
        x = b.to(dtype, device, requires_grad=True)
        out, lse = run(x, 50)
        dout = torch.ones_like(out)
        results.setdefault(device, []).append((out, lse, *torch.autograd.grad((out * dout).sum(), (x.q, x.k, x.v))))
    for a, c in zip(*results["cuda"]):
        assert torch.equal(a, c)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, c in zip(results["cuda"][0], results["cpu"][0]):
        assert max_error(a.cpu(), c) <= tol * max(1.0, float(c[torch.isfinite(c)].abs().max()))
