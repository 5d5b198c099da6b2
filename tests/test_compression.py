"""Compression modules phi (spec section 1): shapes in both layouts, padded vs packed, each variant
against an explicit per-token formula, gradients to every parameter, gradcheck and bad inputs."""

import pytest
import torch
from torch.func import functional_call

import nsa_ext
from nsa_ext import reference
from nsa_ext.compression import gather_blocks

from utils import cu_seqlens

KINDS = ["mean", "linear", "mlp"]


def make(kind, heads=2, dim=6, block=8, stride=4, seed=0, dtype=torch.float64, perturb=True):
    """A module of `kind`; learned ones get random parameters (perturb) so no test passes at init."""
    torch.manual_seed(seed)
    module = nsa_ext.make_compression(kind, compress_block=block, compress_stride=stride, num_heads=heads,
                                      head_dim=dim, hidden_dim=5).to(dtype)
    if perturb:
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return module


def explicit(module, k, block, stride):
    """phi applied token by token, one sequence k [TK, Hk, D] -> [TC, Hk, D]: the spec written out."""
    tokens = reference.num_compressed_tokens(k.shape[0], block, stride)
    out = []
    for i in range(tokens):
        keys = k[i * stride:i * stride + block]  # [l, Hk, D]
        per_head = []
        for h in range(k.shape[1]):
            x = keys[:, h]  # [l, D]
            if isinstance(module, nsa_ext.MeanCompression):
                per_head.append(x.sum(0) / block)
                continue
            flat = (x + module.position[h]).reshape(-1)  # [l*D]
            if isinstance(module, nsa_ext.LinearCompression):
                per_head.append(flat @ module.weight[h])
            else:
                hidden = torch.nn.functional.gelu(flat @ module.w1[h] + module.b1[h])
                per_head.append(hidden @ module.w2[h] + module.b2[h])
        out.append(torch.stack(per_head))
    return torch.stack(out) if out else k.new_zeros(0, k.shape[1], k.shape[2])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k_len", [3, 8, 9, 23, 40])  # shorter than a block, exactly one, not multiples
def test_padded_matches_explicit_formula(kind, k_len):
    module = make(kind)
    k = torch.randn(2, k_len, 2, 6, dtype=torch.float64)
    out = module(k)
    tokens = reference.num_compressed_tokens(k_len, 8, 4)
    assert out.shape == (2, tokens, 2, 6)
    for b in range(2):
        torch.testing.assert_close(out[b], explicit(module, k[b], 8, 4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_equals_padded_per_sequence(kind):
    module = make(kind, block=12, stride=4)
    lengths = [0, 1, 11, 12, 13, 30, 0, 57]
    k = torch.randn(sum(lengths), 2, 6, dtype=torch.float64)
    cu_k = cu_seqlens(lengths)
    out = module(k, cu_k)
    cu_c = nsa_ext.compressed_seqlens(cu_k, 12, 4)
    assert out.shape == (int(cu_c[-1]), 2, 6)
    starts = cu_k.tolist()
    for b, n in enumerate(lengths):
        single = module(k[starts[b]:starts[b] + n][None])[0]
        torch.testing.assert_close(out[cu_c[b]:cu_c[b + 1]], single, rtol=1e-12, atol=1e-12)
    assert int(cu_c[-1]) == 0 + 0 + 0 + 1 + 1 + 5 + 0 + 12


def test_mean_is_the_block_average():
    k = torch.randn(1, 50, 3, 4, dtype=torch.float64)
    out = nsa_ext.MeanCompression(16, 8)(k)
    for i in range(out.shape[1]):
        torch.testing.assert_close(out[0, i], k[0, i * 8:i * 8 + 16].mean(0), rtol=1e-14, atol=1e-14)


def test_linear_starts_as_mean():
    k = torch.randn(2, 37, 3, 5)
    linear = nsa_ext.LinearCompression(3, 5, 8, 4)
    torch.testing.assert_close(linear(k), nsa_ext.MeanCompression(8, 4)(k), rtol=1e-5, atol=1e-6)
    assert linear.weight.shape == (3, 8 * 5, 5) and linear.position.shape == (3, 8, 5)


def test_mlp_shapes_and_default_hidden():
    mlp = nsa_ext.MLPCompression(4, 16, 32, 16)
    assert mlp.w1.shape == (4, 32 * 16, 64) and mlp.w2.shape == (4, 64, 16) and mlp.position.shape == (4, 32, 16)
    out = mlp(torch.randn(2, 100, 4, 16))
    assert out.shape == (2, 5, 4, 16) and torch.isfinite(out).all()
    assert float(out.detach().std()) > 1e-3  # the init does not collapse the output


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradients_reach_every_parameter_and_key(kind, packed):
    module = make(kind, dtype=torch.float32)
    if packed:
        cu_k = cu_seqlens([20, 5, 33])
        k = torch.randn(58, 2, 6, requires_grad=True)
        out = module(k, cu_k)
    else:
        cu_k = None
        k = torch.randn(2, 33, 2, 6, requires_grad=True)
        out = module(k)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Keys that no token covers (past the last full block) get no gradient; the others do.
    covered = torch.zeros(k.shape[:-2], dtype=torch.bool)
    if packed:
        starts = cu_k.tolist()
        for b, n in enumerate([20, 5, 33]):
            covered[starts[b]:starts[b] + reference.num_compressed_tokens(n, 8, 4) * 4 + 4] = n >= 8
    else:
        covered[:, :reference.num_compressed_tokens(33, 8, 4) * 4 + 4] = True
    touched = k.grad.abs().sum((-1, -2)) > 0
    assert torch.equal(touched, covered)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradcheck_float64(kind, packed):
    module = make(kind, heads=2, dim=3, block=4, stride=2)
    params = dict(module.named_parameters())
    cu_k = cu_seqlens([7, 0, 4]) if packed else None
    k = torch.randn(*((11,) if packed else (2, 7)), 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(k, *values):
        return functional_call(module, dict(zip(params, values)), (k, cu_k))

    assert torch.autograd.gradcheck(fn, (k, *params.values()))


def test_gather_blocks_is_a_view_in_padded_layout():
    k = torch.randn(2, 30, 3, 4)
    blocks = gather_blocks(k, 8, 4)
    assert blocks.shape == (2, 6, 3, 8, 4) and blocks._base is not None
    torch.testing.assert_close(blocks[1, 2, 0], k[1, 8:16, 0])


def test_low_precision_module():
    k = torch.randn(1, 40, 2, 6)
    module = make("mlp", dtype=torch.float32)
    out = module.to(torch.bfloat16)(k.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), module.float()(k), rtol=3e-2, atol=3e-2)


BAD = {
    "kind": (lambda: nsa_ext.make_compression("max", compress_block=8, compress_stride=4), "kind"),
    "learned kind without heads": (lambda: nsa_ext.make_compression("mlp", compress_block=8, compress_stride=4),
                                   "num_heads"),
    "stride does not divide block": (lambda: nsa_ext.MeanCompression(8, 3), "compress_stride"),
    "block zero": (lambda: nsa_ext.MeanCompression(0, 1), "compress_block"),
    "k rank padded": (lambda: nsa_ext.MeanCompression(8, 4)(torch.randn(30, 2, 4)), "k"),
    "k rank packed": (lambda: nsa_ext.MeanCompression(8, 4)(torch.randn(1, 30, 2, 4), cu_seqlens([30])), "k"),
    "k heads differ from the module's": (lambda: make("linear", heads=2, dim=6)(torch.randn(1, 30, 3, 6)), "k"),
    "cu_seqlens_k int64": (lambda: nsa_ext.MeanCompression(8, 4)(torch.randn(30, 2, 4), cu_seqlens([30]).long()),
                           "cu_seqlens_k"),
    "cu_seqlens_k past the rows": (lambda: nsa_ext.MeanCompression(8, 4)(torch.randn(30, 2, 4), cu_seqlens([40])),
                                   "k"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_inputs(case):
    fn, name = BAD[case]
    with pytest.raises(ValueError, match=f"'{name}'"):
        fn()
