"""A gradient of a gradient through an attention op (create_graph=True, e.g. a gradient penalty) raises
a clear error: the backward ops have no derivative, and torch's fallback for an op without one would
warn and return wrong values. The first-order gradient with create_graph=True still works."""

import pytest
import torch

import nsa_ext


def _attention(op, q, k, v):
    if op == "window":
        return nsa_ext.sliding_window_attention(q, k, v, window=4)
    if op == "compressed":
        return nsa_ext.compressed_attention(q, k, v, compress_block=2, compress_stride=2, max_seqlen_k=16)
    ids = torch.tensor([0, 1], dtype=torch.int32).expand(1, 8, 1, 2).contiguous()
    return nsa_ext.selection_attention(q, k, v, ids, select_block=4)


@pytest.mark.parametrize("op", ["window", "compressed", "selection"])
def test_double_backward_raises(op):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
               for shape in ((1, 8, 2, 16), (1, 8, 1, 16), (1, 8, 1, 16)))
    out, _ = _attention(op, q, k, v)
    dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    expected, = torch.autograd.grad(_attention(op, q, k, v)[0].square().sum(), q)
    assert torch.equal(dq.detach(), expected)
    with pytest.raises(RuntimeError, match=r"gradient of .*backward is not implemented \(double backward"):
        dq.square().sum().backward()
