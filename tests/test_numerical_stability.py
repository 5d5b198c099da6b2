"""Numerical stability: logits of 1e4 and more (q scaled up), and rows whose keys are all masked
(compressed-branch queries before the first token, selection rows with only -1 or future ids, empty
and length-1 packed sequences), in float64 and float32. Outputs and gradients must be finite (lse
-inf exactly on the empty rows) and match the reference: float64 within 1e-10 of the reference's
magnitude, float32 within twice the error of the reference computed in float32 (the softmax of 1e4
logits amplifies float32 rounding for any implementation). select_blocks at such logits: float64
picks as the reference's, float32 picks within the float32 dot-product error bound of their scores."""

import pytest
import torch

import nsa_ext
from nsa_ext import reference

from test_selection_attention import random_indices
from utils import (Batch, assert_close_fp32, assert_within_torch_error, cu_seqlens, finite_cotangent, grads,
                   poisoned_outputs, random_batch)

LOGIT = 1e4
LAYOUTS = {"padded": ([40, 40], [40, 40]), "packed": ([0, 1, 30, 12], [0, 1, 30, 50])}


def scaled(batch: Batch, scale: float, keys: torch.Tensor) -> Batch:
    """batch with q scaled so that the largest |scale * q.k| over all (query, key) pairs is 2 * LOGIT."""
    q = batch.q.flatten(0, -3) if batch.q.dim() == 4 else batch.q
    k = keys.flatten(0, -3) if keys.dim() == 4 else keys
    group = q.shape[1] // k.shape[1]
    largest = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(group, dim=1)).abs().max() * scale
    return Batch(batch.q * (2 * LOGIT / largest), batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k,
                 batch.max_seqlen_q, batch.max_seqlen_k)


def check(batch: Batch, call, call_reference, dtype, empty_rows: bool, seed: int):
    """call(q, k, v) -> (out, lse) in dtype vs the reference: finite values, lse reaching LOGIT, -inf
    lse and zero output on empty rows (when the problem has some), and the gradients of a random
    (dout, dlse)."""
    gen = torch.Generator().manual_seed(seed)

    def run(fn, in_dtype, poisoned=False):
        ins = [t.detach().to(in_dtype).requires_grad_() for t in (batch.q, batch.k, batch.v)]
        if poisoned:
            with poisoned_outputs():
                out, lse = fn(*ins)
        else:
            out, lse = fn(*ins)
        return out, lse, *grads((out, lse), ins, cotangents)

    exact_out, exact_lse = call_reference(batch.q, batch.k, batch.v)
    cotangents = (torch.randn(exact_out.shape, dtype=torch.float64, generator=gen), finite_cotangent(exact_lse, gen))
    exact = run(call_reference, torch.float64)
    ours = run(call, dtype, poisoned=True)
    out, lse = ours[:2]
    seen = torch.isfinite(lse)
    assert float(lse.detach()[seen].abs().max()) >= LOGIT
    assert empty_rows == bool((~seen).any())
    assert (lse[~seen] == float("-inf")).all() and (out[~seen] == 0).all()
    low = run(call_reference, dtype) if dtype != torch.float64 else None
    for i, name in enumerate(["out", "lse", "dq", "dk", "dv"]):
        a = ours[i].detach()
        assert torch.isfinite(a if name != "lse" else a[seen]).all(), f"{name}: not finite"
        if low is None:
            assert_close_fp32(a, exact[i], rel=1e-10, name=name)
        else:
            assert_within_torch_error(a, low[i].detach(), exact[i].detach(), name=name)


DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliding_window_attention(layout, dtype):
    q_lens, k_lens = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(1)
    batch = random_batch(q_lens, k_lens, 4, 2, 16, 8, packed=layout == "packed", generator=gen)
    batch = scaled(batch, 0.25, batch.k)

    def call(fn):
        return lambda q, k, v: fn(q, k, v, window=8, scale=0.25, **batch.seqlens)

    # Every query sees itself: no empty row.
    check(batch, call(nsa_ext.sliding_window_attention), call(reference.sliding_window_attention), dtype,
          empty_rows=False, seed=2)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compressed_attention(layout, dtype):
    q_lens, k_lens = LAYOUTS[layout]
    tokens = [reference.num_compressed_tokens(n, 8, 4) for n in k_lens]
    packed = layout == "packed"
    gen = torch.Generator().manual_seed(3)
    batch = random_batch(q_lens, tokens, 4, 2, 16, 8, packed=packed, generator=gen)
    # Packed: cu_seqlens_k holds the key lengths, whose compressed tokens are k's rows.
    seqlens = dict(batch.seqlens, cu_seqlens_k=cu_seqlens(k_lens), max_seqlen_k=max(k_lens)) if packed \
        else dict(max_seqlen_k=k_lens[0])
    batch = scaled(batch, 0.25, batch.k)

    def call(fn):
        return lambda q, k, v: fn(q, k, v, compress_block=8, compress_stride=4, scale=0.25, **seqlens)

    # Queries before position 7 see no token.
    check(batch, call(nsa_ext.compressed_attention), call(reference.compressed_attention), dtype, empty_rows=True,
          seed=4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_selection_attention(layout, dtype):
    q_lens, k_lens = LAYOUTS[layout]
    packed = layout == "packed"
    gen = torch.Generator().manual_seed(5)
    batch = random_batch(q_lens, k_lens, 4, 2, 16, 8, packed=packed, generator=gen)
    indices = random_indices(q_lens, k_lens, 2, 3, 8, packed, gen, holes=0.3)
    rows = indices.view(-1, *indices.shape[-2:])
    rows[:6] = -1               # rows with no id at all
    rows[6:9, :, 0] = 10**6     # and rows with only out-of-range ids
    rows[6:9, :, 1:] = -1
    batch = scaled(batch, 0.25, batch.k)

    def call(fn):
        return lambda q, k, v: fn(q, k, v, indices, select_block=8, scale=0.25, **batch.seqlens)

    check(batch, call(nsa_ext.selection_attention), call(reference.selection_attention), dtype, empty_rows=True,
          seed=6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_select_blocks(dtype):
    """Block scores from probabilities exp(scale * q.k - lse) with logits of 1e4: finite, and the
    picks are the reference's (forced exactly, free ones by score)."""
    from test_select_blocks import Config, Inputs, check_selection
    cfg = Config(8, 4, 8, 4, 1, 1)
    gen = torch.Generator().manual_seed(7)
    k_len = 60
    tokens = reference.num_compressed_tokens(k_len, 8, 4)
    batch = random_batch([k_len], [tokens], 4, 2, 16, 16, packed=False, generator=gen)
    batch = scaled(batch, 0.25, batch.k)
    _, lse = reference.compressed_attention(batch.q, batch.k, batch.k, compress_block=8, compress_stride=4,
                                            scale=0.25, max_seqlen_k=k_len)
    assert float(lse[torch.isfinite(lse)].abs().max()) >= LOGIT
    exact = Inputs(batch.q, batch.k, lse, [k_len], max_seqlen_k=k_len)
    ours = exact.to(dtype)
    with poisoned_outputs():
        ids = nsa_ext.select_blocks(ours.q, ours.k_cmp, ours.lse, scale=0.25, **cfg.kwargs, max_seqlen_k=k_len)
    rel = 1e-9
    if dtype == torch.float32:
        # Picks are only as good as float32 logits: a Dk-term dot product whose |terms| sum to S is off
        # by up to Dk * eps * S (the standard bound), a probability, hence a score, by that much relatively.
        terms = torch.einsum("qhd,khd->hqk", batch.q[0].abs(), batch.k[0].abs().repeat_interleave(2, dim=1)) * 0.25
        rel = 16 * torch.finfo(dtype).eps * float(terms.max())
    # Block scores of 1e-230 exist at these logits: float32 accumulation holds none below its smallest
    # normal number, where they all rank as 0 (ties to the lower block id).
    check_selection(ids, Inputs(ours.q.double(), ours.k_cmp.double(), ours.lse.double(), [k_len],
                                max_seqlen_k=k_len), cfg, rel=rel, scale=0.25, floor=torch.finfo(dtype).tiny)
