"""Compressed attention (spec section 2): kernels vs the fp64 reference, autograd, opcheck,
torch.compile, layouts and input validation."""

import pytest
import torch

import nsa_ext
from nsa_ext import reference

from utils import (DEVICES, LOW_PRECISION, Batch, assert_close_fp32, assert_within_torch_error, cu_seqlens,
                   finite_cotangent, grads, poisoned_outputs, random_batch)

OPS = torch.ops.nsa


def compressed_batch(q_lens, k_lens, hq, hk, dk, dv, block, stride, packed, dtype=torch.float64, gen=None,
                     extra_tokens=0):
    """Queries plus the compressed tokens of keys of the given original lengths."""
    tokens = [reference.num_compressed_tokens(n, block, stride) + extra_tokens for n in k_lens]
    b = random_batch(q_lens, tokens, hq, hk, dk, dv, packed, dtype, gen)
    if packed:
        b.cu_seqlens_k, b.max_seqlen_k = cu_seqlens(k_lens), max(k_lens, default=0)
    else:
        b.max_seqlen_k = k_lens[0]
    return b


def run(b: Batch, block, stride, scale=None):
    return nsa_ext.compressed_attention(b.q, b.k, b.v, compress_block=block, compress_stride=stride, scale=scale,
                                        **b.seqlens)


def run_reference(b: Batch, block, stride, scale=None):
    return reference.compressed_attention(b.q, b.k, b.v, compress_block=block, compress_stride=stride, scale=scale,
                                          **b.seqlens)


# (q_lens, k_lens, Hq, Hk, Dk, Dv, block, stride)
SHAPES = [
    ([100, 100], [100, 100], 4, 2, 16, 24, 32, 16),   # paper's l, d; Dk != Dv
    ([45], [300], 8, 2, 32, 16, 32, 16),              # TQ < TK
    ([77], [77], 16, 1, 24, 24, 8, 8),                # l = d, G = 16
    ([13], [13], 4, 4, 8, 8, 16, 4),                  # shorter than one block: nothing visible
    ([150], [150], 36, 2, 8, 40, 12, 4),              # G = 18, not multiples of anything
    ([1, 1], [40, 40], 8, 1, 16, 16, 16, 8),          # decoding-like single queries
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[2:])))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference(shape, packed, dtype, device):
    q_lens, k_lens, hq, hk, dk, dv, block, stride = shape
    gen = torch.Generator().manual_seed(sum(q_lens) * 31 + hq)
    exact = compressed_batch(q_lens, k_lens, hq, hk, dk, dv, block, stride, packed, gen=gen)
    ref_in = exact.to(torch.float64, requires_grad=True)
    out_ref, lse_ref = run_reference(ref_in, block, stride)
    cot = (torch.randn(out_ref.shape, dtype=torch.float64, generator=gen), finite_cotangent(lse_ref, gen))
    expected = (out_ref, lse_ref, *grads((out_ref, lse_ref), (ref_in.q, ref_in.k, ref_in.v), cot))
    ours_in = exact.to(dtype, device, requires_grad=True)
    with poisoned_outputs():
        out, lse = run(ours_in, block, stride)
        actual = (out, lse, *grads((out, lse), (ours_in.q, ours_in.k, ours_in.v), [c.to(device) for c in cot]))
    for name, a, e in zip(["out", "lse", "dq", "dk_cmp", "dv_cmp"], actual, expected):
        assert a.shape == e.shape
        assert_close_fp32(a.cpu(), e, rel=1e-10 if dtype == torch.float64 else 1e-5, name=name)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_within_twice_torch_error(dtype):
    gen = torch.Generator().manual_seed(1)
    exact = compressed_batch([200], [200], 8, 2, 32, 32, 32, 16, packed=False, gen=gen)
    cot = torch.randn(1, 200, 8, 32, dtype=torch.float64, generator=gen)
    results = {}
    for key, fn, b in [("exact", run_reference, exact.to(torch.float64, requires_grad=True)),
                       ("torch", run_reference, exact.to(dtype, requires_grad=True)),
                       ("ours", run, exact.to(dtype, requires_grad=True))]:
        out, lse = fn(b, 32, 16)
        results[key] = (out, lse, *grads((out,), (b.q, b.k, b.v), [cot]))
    for i, name in enumerate(["out", "lse", "dq", "dk_cmp", "dv_cmp"]):
        assert_within_torch_error(results["ours"][i], results["torch"][i], results["exact"][i], name=name)


def test_early_queries_see_nothing():
    gen = torch.Generator().manual_seed(2)
    b = compressed_batch([40], [40], 2, 1, 8, 8, 16, 8, packed=False, gen=gen).to(torch.float64, requires_grad=True)
    out, lse = run(b, 16, 8)
    assert torch.equal(out[:, :15], torch.zeros_like(out[:, :15]))      # t < l - 1
    assert torch.isinf(lse[:, :15]).all() and torch.isfinite(lse[:, 15:]).all()
    dq, = torch.autograd.grad(out.sum(), b.q)
    assert torch.equal(dq[:, :15], torch.zeros_like(dq[:, :15])) and not torch.isnan(dq).any()


def test_extra_token_rows_are_ignored_with_zero_gradient():
    gen = torch.Generator().manual_seed(3)
    b = compressed_batch([50], [50], 4, 2, 8, 8, 16, 8, packed=False, gen=gen, extra_tokens=3)
    b = b.to(torch.float64, requires_grad=True)
    tokens = reference.num_compressed_tokens(50, 16, 8)
    out, lse = run(b, 16, 8)
    trimmed = Batch(b.q, b.k[:, :tokens], b.v[:, :tokens], max_seqlen_k=50)
    out_ref, _ = run_reference(trimmed, 16, 8)
    torch.testing.assert_close(out, out_ref)
    _, dk, _ = torch.autograd.grad(out.sum(), (b.q, b.k, b.v))
    assert torch.equal(dk[:, tokens:], torch.zeros_like(dk[:, tokens:]))


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(4)
    for packed in (False, True):
        b = compressed_batch([9, 9], [9, 9], 4, 2, 3, 2, 4, 2, packed, gen=gen).to(torch.float64, requires_grad=True)

        def fn(q, k, v):
            out, lse = nsa_ext.compressed_attention(q, k, v, compress_block=4, compress_stride=2, **b.seqlens)
            return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

        assert torch.autograd.gradcheck(fn, (b.q, b.k, b.v))


def test_packed_with_empty_and_short_sequences_equals_padded():
    gen = torch.Generator().manual_seed(5)
    lengths = [0, 1, 31, 32, 33, 100, 0, 47]
    packed = compressed_batch(lengths, lengths, 4, 2, 16, 16, 32, 16, packed=True, dtype=torch.float32, gen=gen)
    out, lse = run(packed, 32, 16)
    q_start, c_start = packed.cu_seqlens_q.tolist(), reference.compressed_seqlens(packed.cu_seqlens_k, 32, 16).tolist()
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        rows, toks = slice(q_start[i], q_start[i] + n), slice(c_start[i], c_start[i + 1])
        o1, l1 = nsa_ext.compressed_attention(packed.q[rows][None], packed.k[toks][None], packed.v[toks][None],
                                              compress_block=32, compress_stride=16)
        torch.testing.assert_close(o1[0], out[rows], rtol=0, atol=1e-6)
        torch.testing.assert_close(l1[0], lse[rows], rtol=0, atol=1e-6)


def test_compressed_seqlens():
    # TC = max(0, (TK - 32) // 16 + 1) for TK = 0, 1, 31, 32, 33, 47, 48, 100 is 0, 0, 0, 1, 1, 1, 2, 5.
    cu = cu_seqlens([0, 1, 31, 32, 33, 47, 48, 100])
    assert reference.compressed_seqlens(cu, 32, 16).tolist() == [0, 0, 0, 0, 1, 2, 3, 5, 10]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(6)
    for packed in (False, True):
        for requires_grad in (False, True):
            b = compressed_batch([20, 20], [20, 20], 4, 2, 8, 6, 8, 4, packed, torch.float32, gen)
            b = b.to(torch.float32, device, requires_grad)
            s = b.seqlens
            args = (b.q, b.k, b.v, 8, 4, 0.3, s["cu_seqlens_q"], s["cu_seqlens_k"], 20, 20)
            torch.library.opcheck(OPS.compressed_attention_fwd.default, args)
            out, lse = OPS.compressed_attention_fwd(*args)
            dout, dlse = torch.randn_like(out), finite_cotangent(lse).float()
            bwd_args = (dout, dlse, b.q.detach(), b.k.detach(), b.v.detach(), out.detach(), lse.detach(), *args[3:])
            torch.library.opcheck(OPS.compressed_attention_bwd.default, bwd_args)


def test_compile_fullgraph_dynamic():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True)
    def fn(q, k, v, tk: int):
        out, lse = nsa_ext.compressed_attention(q, k, v, compress_block=16, compress_stride=8, max_seqlen_k=tk)
        return out.sum() + torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).sum()

    gen = torch.Generator().manual_seed(7)
    for t in (40, 57):
        b = compressed_batch([t], [t], 4, 2, 16, 8, 16, 8, packed=False, dtype=torch.float32, gen=gen)
        b = b.to(torch.float32, requires_grad=True)
        loss = fn(b.q, b.k, b.v, t)
        out, lse = run(b, 16, 8)
        eager = out.sum() + torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).sum()
        torch.testing.assert_close(loss, eager)
        for a, e in zip(torch.autograd.grad(loss, (b.q, b.k, b.v)), torch.autograd.grad(eager, (b.q, b.k, b.v))):
            torch.testing.assert_close(a, e)


def _call(b, **overrides):
    args = dict(q=b.q, k_cmp=b.k, v_cmp=b.v, compress_block=16, compress_stride=8, **b.seqlens)
    args.update(overrides)
    q, k, v = args.pop("q"), args.pop("k_cmp"), args.pop("v_cmp")
    return nsa_ext.compressed_attention(q, k, v, **args)


BAD = {
    "stride zero": (dict(compress_stride=0), "compress_stride"),
    "block not a multiple of stride": (dict(compress_block=12), "compress_block"),
    "too few tokens for TK": (dict(max_seqlen_k=200), "k_cmp"),
    "k_cmp head dim": (lambda b: dict(k_cmp=b.k[..., :4]), "k_cmp"),
    "v_cmp heads": (lambda b: dict(v_cmp=b.v[:, :, :1]), "v_cmp"),
    "k_cmp dtype": (lambda b: dict(k_cmp=b.k.double()), "k_cmp"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case):
    gen = torch.Generator().manual_seed(8)
    b = compressed_batch([40], [40], 4, 2, 16, 8, 16, 8, packed=False, dtype=torch.float32, gen=gen)
    overrides, name = BAD[case]
    overrides = overrides(b) if callable(overrides) else overrides
    with pytest.raises(ValueError, match=f"'{name}'"):
        _call(b, **overrides)


def test_bad_input_packed_token_count():
    gen = torch.Generator().manual_seed(9)
    b = compressed_batch([40, 30], [40, 30], 4, 2, 16, 8, 16, 8, packed=True, dtype=torch.float32, gen=gen)
    with pytest.raises(ValueError, match="'k_cmp'"):
        _call(b, k_cmp=b.k[:-1], v_cmp=b.v[:-1])
