"""Selected-block attention (spec section 4): kernels vs the fp64 reference, index edge cases
(holes, empty rows, out-of-range, duplicate and future ids), autograd, opcheck, torch.compile/export,
layouts, determinism, input validation and validate_block_indices."""

import pytest
import torch

import nsa_ext
from nsa_ext import reference
from nsa_ext.bench import nsa_like_indices

from utils import (LOW_PRECISION, assert_close_fp32, assert_within_torch_error, check_compiled_matches_eager,
                   check_compiled_without_graph_break, check_deterministic_across_thread_counts, check_export,
                   check_fake_matches_real, check_opcheck, check_packed_equals_padded, cu_seqlens, finite_cotangent,
                   grads, max_error, poisoned_outputs, random_batch, strided_qkv)

OPS = torch.ops.nsa
INT32_MAX, INT32_MIN = 2**31 - 1, -2**31

# (q_lens, k_lens, Hq, Hk, Dk, Dv, select_block, n): every G in 1, 2, 4, 8, 16, 18, Dk != Dv,
# select_block 16 to 128, TQ < TK, partial last blocks, single tokens.
SHAPES = [
    ([37, 37], [37, 37], 4, 2, 16, 24, 16, 3),        # G=2, Dk != Dv
    ([70], [200], 8, 2, 32, 16, 32, 4),               # G=4, TQ < TK
    ([130, 130], [130, 130], 4, 4, 8, 8, 16, 5),      # G=1
    ([97], [97], 16, 1, 40, 24, 64, 2),               # G=16
    ([65], [131], 8, 1, 24, 40, 128, 2),              # G=8, TQ < TK, partial last block of 3 keys
    ([19], [19], 36, 2, 8, 8, 16, 2),                 # G=18
    ([150], [150], 8, 2, 16, 16, 32, 9),              # n > blocks of early queries: unused slots
    ([1, 1], [1, 1], 4, 4, 8, 8, 16, 1),              # single tokens
]


def shape_id(shape):
    return "G{}_l{}_n{}_{}x{}".format(shape[2] // shape[3], shape[6], shape[7], shape[4], shape[5])


def random_indices(q_lens, k_lens, heads_k, count, select_block, packed, generator, holes=0.0):
    """Distinct ids per row, drawn among the blocks each query may see, in random order; unused
    slots (fewer blocks than count) and a `holes` fraction of the slots are -1."""
    parts = []
    for tq, tk in zip(q_lens, k_lens):
        blocks = max(1, -(-tk // select_block))
        position = torch.arange(tq) + (tk - tq)
        j = torch.arange(blocks)
        visible = (j[None, :] * select_block <= position[:, None]) & (j[None, :] * select_block < tk)
        score = torch.rand(tq, heads_k, blocks, generator=generator).masked_fill(~visible[:, None, :], -1.0)
        top = score.topk(min(count, blocks), dim=-1)
        ids = torch.where(top.values >= 0, top.indices, -1)
        ids = torch.nn.functional.pad(ids, (0, count - ids.shape[-1]), value=-1)
        if holes:
            ids = ids.masked_fill(torch.rand(ids.shape, generator=generator) < holes, -1)
        parts.append(ids)
    ids = torch.cat(parts) if packed else torch.stack(parts)
    return ids.to(torch.int32)


def selection(select_block):
    """attn(q, k, v, indices, **seqlens) for the shared checks in utils."""
    return lambda q, k, v, idx, **seqlens: nsa_ext.selection_attention(q, k, v, idx, select_block=select_block,
                                                                       **seqlens)


def run(batch, indices, select_block, scale=None):
    return nsa_ext.selection_attention(batch.q, batch.k, batch.v, indices, select_block=select_block, scale=scale,
                                       **batch.seqlens)


def run_reference(batch, indices, select_block, scale=None):
    return reference.selection_attention(batch.q, batch.k, batch.v, indices, select_block=select_block, scale=scale,
                                         **batch.seqlens)


NAMES = ["out", "lse", "dq", "dk", "dv"]


def forward_backward(fn, batch, indices, select_block, cotangents):
    out, lse = fn(batch, indices, select_block)
    return (out, lse, *grads((out, lse), (batch.q, batch.k, batch.v), cotangents))


def compare_to_reference(exact, indices, select_block, dtype=torch.float32, rel=1e-5, gen=None):
    """fwd + bwd (through out and lse) of the kernel in `dtype` vs the fp64 reference, outputs poisoned."""
    gen = gen or torch.Generator().manual_seed(0)
    ref_in = exact.to(torch.float64, requires_grad=True)
    out_ref, lse_ref = run_reference(ref_in, indices, select_block)
    cot = (torch.randn(out_ref.shape, dtype=torch.float64, generator=gen), finite_cotangent(lse_ref, gen))
    expected = (out_ref, lse_ref, *grads((out_ref, lse_ref), (ref_in.q, ref_in.k, ref_in.v), cot))
    ours_in = exact.to(dtype, requires_grad=True)
    with poisoned_outputs():
        actual = forward_backward(run, ours_in, indices, select_block, cot)
    for name, a, e in zip(NAMES, actual, expected):
        assert_close_fp32(a, e, rel=rel, name=name)
    return actual


# --- the reference itself, against an independent formulation ------------------------------------

def test_reference_matches_sdpa_with_explicit_mask():
    gen = torch.Generator().manual_seed(0)
    b = random_batch([23], [41], 6, 2, 16, 8, packed=False, generator=gen)
    idx = random_indices([23], [41], 2, 3, 8, False, gen, holes=0.2)
    idx[0, 5, 1] = torch.tensor([4, 4, INT32_MAX], dtype=torch.int32)  # duplicate and out-of-range
    out, lse = run_reference(b, idx, 8)
    mask = torch.zeros(1, 6, 23, 41, dtype=torch.bool)  # built one key at a time
    for i in range(23):
        t = 41 - 23 + i
        for h in range(6):
            for j in idx[0, i, h // 3].tolist():
                for s in range(max(j, 0) * 8, min((j + 1) * 8, t + 1)):
                    mask[0, h, i, s] = j >= 0
    safe = mask.any(-1, keepdim=True)
    expected = torch.nn.functional.scaled_dot_product_attention(
        b.q.transpose(1, 2), b.k.transpose(1, 2), b.v.transpose(1, 2), attn_mask=mask | ~safe, enable_gqa=True)
    expected = torch.where(safe, expected, torch.zeros_like(expected))
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)
    scores = torch.einsum("bqhd,bkhd->bhqk", b.q, b.k.repeat_interleave(3, dim=2)) * 16 ** -0.5
    torch.testing.assert_close(lse, scores.masked_fill(~mask, float("-inf")).logsumexp(-1).transpose(1, 2))


# --- kernels vs reference ------------------------------------------------------------------------

@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference(shape, packed, dtype):
    q_lens, k_lens, hq, hk, dk, dv, block, count = shape
    gen = torch.Generator().manual_seed(hash((tuple(q_lens), hq, dk, block)) % 2**31)
    exact = random_batch(q_lens, k_lens, hq, hk, dk, dv, packed, generator=gen)
    indices = random_indices(q_lens, k_lens, hk, count, block, packed, gen, holes=0.1)
    actual = compare_to_reference(exact, indices, block, dtype, rel=1e-10 if dtype == torch.float64 else 1e-5,
                                  gen=gen)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a in zip(NAMES, actual):
        assert a.dtype == (lse_dtype if name == "lse" else dtype)


def test_large_tiles_and_long_block_lists_match_reference():
    # Enough tasks for the largest query tiles, and blocks chosen by more queries than one dk/dv
    # product takes (NSA-like ids: block 0 and the local blocks are chosen by many queries).
    gen = torch.Generator().manual_seed(1)
    exact = random_batch([520, 520], [520, 520], 8, 4, 32, 32, packed=False, generator=gen)
    indices = torch.cat([nsa_like_indices(520, 4, 6, 32, gen) for _ in range(2)])
    compare_to_reference(exact, indices, 32, gen=gen)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:6], ids=shape_id)
def test_low_precision_within_twice_torch_error(shape, dtype):
    q_lens, k_lens, hq, hk, dk, dv, block, count = shape
    gen = torch.Generator().manual_seed(7)
    exact = random_batch(q_lens, k_lens, hq, hk, dk, dv, packed=False, generator=gen)
    indices = random_indices(q_lens, k_lens, hk, count, block, False, gen, holes=0.1)
    cot_out = torch.randn(exact.q.shape[:-1] + (dv,), dtype=torch.float64, generator=gen)
    results = {}
    for key, fn, batch in [("exact", run_reference, exact.to(torch.float64, requires_grad=True)),
                           ("torch", run_reference, exact.to(dtype, requires_grad=True)),
                           ("ours", run, exact.to(dtype, requires_grad=True))]:
        out, lse = fn(batch, indices, block)
        results[key] = (out, lse, *grads((out,), (batch.q, batch.k, batch.v), [cot_out]))
    for i, name in enumerate(NAMES):
        assert results["ours"][i].dtype == results["torch"][i].dtype
        assert_within_torch_error(results["ours"][i], results["torch"][i], results["exact"][i], name=name)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    for packed in (False, True):
        b = random_batch([6, 6], [9, 9], 4, 2, 3, 2, packed, generator=gen).to(torch.float64, requires_grad=True)
        idx = random_indices([6, 6], [9, 9], 2, 2, 2, packed, gen, holes=0.2)

        def fn(q, k, v):
            out, lse = nsa_ext.selection_attention(q, k, v, idx, select_block=2, **b.seqlens)
            # Rows that see nothing (lse = -inf) would make finite differences NaN; their zero
            # gradient is tested on its own.
            return out, lse.masked_fill(torch.isinf(lse.detach()), 0)

        assert torch.autograd.gradcheck(fn, (b.q, b.k, b.v))


# --- index values ---------------------------------------------------------------------------------

def _index_batch(seed=20):
    gen = torch.Generator().manual_seed(seed)
    b = random_batch([50], [77], 8, 2, 16, 16, packed=False, dtype=torch.float32, generator=gen)
    return b, random_indices([50], [77], 2, 4, 16, False, gen), gen


def _outputs_and_grads(batch, indices, block=16):
    x = batch.to(torch.float32, requires_grad=True)
    out, lse = run(x, indices, block)
    g = torch.autograd.grad((out * out.detach().sin()).sum() + lse.nan_to_num(neginf=0).sum(), (x.q, x.k, x.v))
    return (out, lse, *g)


def _assert_bitwise_equal(actual, expected):
    for name, a, e in zip(NAMES, actual, expected):
        assert torch.equal(a, e), name


def test_rows_with_only_unused_slots_are_zero_with_zero_gradient():
    b, idx, _ = _index_batch()
    idx[0, :10] = -1        # every kv head: no block at all
    idx[0, 10:20, 1] = -1   # one kv head only
    x = b.to(torch.float64, requires_grad=True)
    with poisoned_outputs():
        out, lse = run(x, idx, 16)
    assert torch.equal(out[0, :10], torch.zeros_like(out[0, :10]))
    assert torch.isinf(lse[0, :10]).all() and (lse[0, :10] < 0).all()
    assert torch.isinf(lse[0, 10:20, 4:]).all() and torch.isfinite(lse[0, 10:20, :4]).all()
    live = torch.isfinite(lse)
    dq, dk, dv = torch.autograd.grad((out * torch.randn_like(out)).sum() + lse[live].sum(), (x.q, x.k, x.v))
    assert torch.equal(dq[0, :10], torch.zeros_like(dq[0, :10])) and torch.equal(dq[0, 10:20, 4:],
                                                                                  torch.zeros_like(dq[0, 10:20, 4:]))
    assert not any(torch.isnan(t).any() for t in (out, lse, dq, dk, dv))
    out_ref, lse_ref = run_reference(x, idx, 16)
    assert max_error(out, out_ref) < 1e-12 and max_error(lse, lse_ref) < 1e-12


def test_all_rows_empty():
    b, idx, _ = _index_batch()
    out, lse, dq, dk, dv = _outputs_and_grads(b, torch.full_like(idx, -1))
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    for g in (dq, dk, dv):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("bad", [INT32_MAX, INT32_MIN, -2, 5, 6, 1000], ids=str)
def test_out_of_range_ids_are_ignored(bad):
    # TK = 77 with blocks of 16: ids 0..4 exist, 5 and beyond do not.
    b, idx, gen = _index_batch()
    holes = random_indices([50], [77], 2, 4, 16, False, gen, holes=0.3)
    with_bad = torch.where(holes == -1, torch.full_like(holes, bad), holes)
    expected = _outputs_and_grads(b, holes)
    _assert_bitwise_equal(_outputs_and_grads(b, with_bad), expected)
    out_ref, lse_ref = run_reference(b.to(torch.float64), with_bad, 16)
    assert_close_fp32(expected[0], out_ref, name="out")
    assert_close_fp32(expected[1], lse_ref, name="lse")


def test_future_blocks_are_ignored():
    b, idx, _ = _index_batch()
    future = idx.clone()
    future[0, :, :, 0] = 4  # block 4 starts at key 64; the first queries sit at 27..63
    before = 64 - (77 - 50)
    expected_idx = future.clone()
    expected_idx[0, :before, :, 0] = -1
    _assert_bitwise_equal(_outputs_and_grads(b, future), _outputs_and_grads(b, expected_idx))


def test_duplicate_ids_count_once_and_order_does_not_matter():
    b, idx, gen = _index_batch()
    dup = idx.clone()
    dup[..., 1] = dup[..., 0]  # the set loses the id that was in slot 1
    unique = dup.clone()
    unique[..., 1] = -1
    expected = _outputs_and_grads(b, unique)
    _assert_bitwise_equal(_outputs_and_grads(b, dup), expected)
    shuffled = dup.gather(-1, torch.rand(dup.shape, generator=gen).argsort(-1))
    _assert_bitwise_equal(_outputs_and_grads(b, shuffled), expected)
    out_ref, _ = run_reference(b.to(torch.float64), dup, 16)
    assert_close_fp32(expected[0], out_ref, name="out")


def test_keys_past_the_end_of_a_partial_last_block_are_never_read():
    # Packed: sequence 0 has 37 keys (blocks of 16: the last holds 5), followed by rows that belong
    # to no sequence and hold NaN; any read past key 36 would turn outputs or gradients into NaN.
    gen = torch.Generator().manual_seed(21)
    b = random_batch([37], [37], 4, 2, 8, 8, packed=True, dtype=torch.float32, generator=gen)
    nan = torch.full((11, 2, 8), float("nan"))
    k, v = torch.cat([b.k, nan]), torch.cat([b.v, nan])
    idx = random_indices([37], [37], 2, 3, 16, True, gen)
    idx[-5:, :, 0] = 2  # the last queries all read the partial block
    q, k, v = (t.requires_grad_() for t in (b.q.clone(), k, v))
    out, lse = nsa_ext.selection_attention(q, k, v, idx, select_block=16, **b.seqlens)
    dq, dk, dv = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    for t in (out, lse, dq, dk[:37], dv[:37]):
        assert torch.isfinite(t).all()
    assert torch.equal(dk[37:], torch.zeros_like(dk[37:]))
    out_ref, lse_ref = reference.selection_attention(b.q.double(), b.k.double(), b.v.double(), idx, select_block=16,
                                                     **b.seqlens)
    assert_close_fp32(out, out_ref, name="out")


# --- layouts -------------------------------------------------------------------------------------

def test_packed_equals_padded_per_sequence():
    gen = torch.Generator().manual_seed(5)
    lengths = [0, 1, 17, 64, 65, 3, 0, 130]
    packed = random_batch(lengths, lengths, 8, 2, 24, 16, packed=True, dtype=torch.float32, generator=gen)
    idx = random_indices(lengths, lengths, 2, 3, 16, True, gen, holes=0.1)
    check_packed_equals_padded(selection(16), packed, per_query=(idx,))


def test_packed_rows_outside_every_sequence_are_defined():
    gen = torch.Generator().manual_seed(6)
    b = random_batch([5], [5], 2, 2, 8, 8, packed=True, dtype=torch.float32, generator=gen)
    q = torch.cat([b.q, torch.randn(3, 2, 8, generator=gen)]).requires_grad_()  # 3 rows belong to no sequence
    idx = torch.zeros(8, 2, 2, dtype=torch.int32)
    with poisoned_outputs():
        out, lse = nsa_ext.selection_attention(q, b.k, b.v, idx, select_block=4, **b.seqlens)
        dq, = torch.autograd.grad(out.sum(), q)
    assert torch.equal(out[5:], torch.zeros_like(out[5:])) and torch.isinf(lse[5:]).all()
    assert torch.equal(dq[5:], torch.zeros_like(dq[5:])) and torch.isfinite(dq).all()


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(8)
    q, k, v = strided_qkv(gen)
    idx = random_indices([50, 50], [50, 50], 1, 12, 8, False, gen)[..., ::2]  # strided ids
    assert not idx.is_contiguous()
    out, lse = nsa_ext.selection_attention(q, k, v, idx, select_block=8)
    ref_out, ref_lse = reference.selection_attention(q.double(), k.double(), v.double(), idx, select_block=8)
    assert_close_fp32(out, ref_out, name="out")
    assert_close_fp32(lse, ref_lse, name="lse")


# --- determinism ---------------------------------------------------------------------------------

def test_backward_is_bitwise_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(9)
    b = random_batch([300, 300], [300, 300], 8, 2, 32, 32, packed=False, dtype=torch.float32, generator=gen)
    idx = torch.cat([nsa_like_indices(300, 2, 8, 16, gen) for _ in range(2)])
    dout = torch.randn(2, 300, 8, 32, generator=gen)

    def run_once():
        x = b.to(torch.float32, requires_grad=True)
        out, lse = run(x, idx, 16)
        return (out, lse, *torch.autograd.grad((out * dout).sum() + lse.sum(), (x.q, x.k, x.v)))

    check_deterministic_across_thread_counts(run_once)


# --- torch.library / compile / export -------------------------------------------------------------

def opcheck_samples():
    gen = torch.Generator().manual_seed(10)
    samples = []
    for packed in (False, True):
        for requires_grad in (False, True):
            q_lens, k_lens = ([9, 9], [9, 9]) if not packed else ([9, 4], [12, 4])
            b = random_batch(q_lens, k_lens, 4, 2, 8, 6, packed, dtype=torch.float32, generator=gen)
            b = b.to(torch.float32, requires_grad=requires_grad)
            idx = random_indices(q_lens, k_lens, 2, 2, 4, packed, gen, holes=0.2)
            seq = b.seqlens if packed else dict(cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=9, max_seqlen_k=9)
            samples.append((b.q, b.k, b.v, idx, 4, 0.3, seq["cu_seqlens_q"], seq["cu_seqlens_k"],
                            seq["max_seqlen_q"], seq["max_seqlen_k"]))
    return samples


def test_opcheck():
    check_opcheck(OPS.selection_attention_fwd, OPS.selection_attention_bwd, opcheck_samples(), tensors_before_out=1)


def test_backward_op_uses_dlse():
    # d lse / d s = softmax: the gradient through lse alone is dq = scale * sum_j p_j k_j, etc.
    gen = torch.Generator().manual_seed(22)
    b = random_batch([12], [12], 2, 1, 4, 4, packed=False, generator=gen).to(torch.float64, requires_grad=True)
    idx = random_indices([12], [12], 1, 2, 4, False, gen)
    out, lse = run(b, idx, 4)
    out_r, lse_r = run_reference(b, idx, 4)
    dlse = finite_cotangent(lse_r, gen)
    ours = torch.autograd.grad((lse.nan_to_num(neginf=0) * dlse).sum(), (b.q, b.k, b.v))
    expected = torch.autograd.grad((lse_r.nan_to_num(neginf=0) * dlse).sum(), (b.q, b.k))
    for a, e in zip(ours, expected):
        assert float(e.abs().max()) > 0.1 and max_error(a, e) < 1e-12
    assert torch.equal(ours[2], torch.zeros_like(ours[2]))  # lse does not depend on v


def test_compile_fullgraph_dynamic():
    gen = torch.Generator().manual_seed(11)
    # Two lengths (the second reuses the dynamic graph); block 0 in every row keeps lse finite.
    cases = [(random_batch([t], [t], 4, 2, 16, 8, packed=False, dtype=torch.float32, generator=gen),
              (nsa_like_indices(t, 2, 3, 8, gen),)) for t in (33, 47)]
    check_compiled_matches_eager(selection(8), cases)


def test_compile_packed_no_graph_break():
    gen = torch.Generator().manual_seed(12)
    b = random_batch([5, 0, 9], [5, 0, 9], 2, 1, 8, 8, packed=True, dtype=torch.float32, generator=gen)
    b = b.to(torch.float32, requires_grad=True)
    idx = random_indices([5, 0, 9], [5, 0, 9], 1, 2, 4, True, gen)

    def fn(q, k, v, idx, cu_q, cu_k):
        return nsa_ext.selection_attention(q, k, v, idx, select_block=4, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                           max_seqlen_q=9, max_seqlen_k=9)[0].sum()

    check_compiled_without_graph_break(fn, (b.q, b.k, b.v, idx, b.cu_seqlens_q, b.cu_seqlens_k))


def test_export():
    class Selection(torch.nn.Module):
        def forward(self, q, k, v, idx):
            return nsa_ext.selection_attention(q, k, v, idx, select_block=4)

    gen = torch.Generator().manual_seed(13)
    b = random_batch([21], [21], 4, 2, 8, 8, packed=False, dtype=torch.float32, generator=gen)
    check_export(Selection(), (b.q, b.k, b.v, random_indices([21], [21], 2, 3, 4, False, gen)),
                 "nsa.selection_attention_fwd")


def test_fake_outputs_match_real_shapes_and_strides():
    check_fake_matches_real(OPS.selection_attention_fwd, opcheck_samples())


# --- input validation: one test per check, each naming the argument -----------------------------

def _good():
    gen = torch.Generator().manual_seed(14)
    b = random_batch([8], [8], 4, 2, 16, 8, packed=False, dtype=torch.float32, generator=gen)
    return b, random_indices([8], [8], 2, 2, 4, False, gen)


def _packed():
    gen = torch.Generator().manual_seed(15)
    b = random_batch([3, 5], [3, 5], 4, 2, 16, 8, packed=True, dtype=torch.float32, generator=gen)
    return b, random_indices([3, 5], [3, 5], 2, 2, 4, True, gen)


BAD_INPUTS = {
    "indices int64": (lambda b, i: dict(indices=i.long()), "indices"),
    "indices float": (lambda b, i: dict(indices=i.float()), "indices"),
    "indices rank": (lambda b, i: dict(indices=i[0]), "indices"),
    "indices batch": (lambda b, i: dict(indices=torch.cat([i, i])), "indices"),
    "indices TQ": (lambda b, i: dict(indices=i[:, :7]), "indices"),
    "indices Hk": (lambda b, i: dict(indices=i[:, :, :1]), "indices"),
    "indices n = 0": (lambda b, i: dict(indices=i[..., :0]), "indices"),
    "select_block zero": (lambda b, i: dict(select_block=0), "select_block"),
    "select_block negative": (lambda b, i: dict(select_block=-64), "select_block"),
    "scale inf": (lambda b, i: dict(scale=float("inf")), "scale"),
    "q rank": (lambda b, i: dict(q=b.q[0]), "q"),
    "k dtype mismatch": (lambda b, i: dict(k=b.k.double()), "k"),
    "v heads differ from k": (lambda b, i: dict(v=b.v[:, :, :1]), "v"),
    "heads not divisible": (lambda b, i: dict(k=b.k[:, :, :1].expand(-1, -1, 3, -1).contiguous(),
                                              v=b.v[:, :, :1].expand(-1, -1, 3, -1).contiguous()), "k"),
    "max_seqlen_k wrong in padded layout": (lambda b, i: dict(max_seqlen_k=3), "max_seqlen_k"),
}

BAD_PACKED = {
    "indices rows": (lambda b, i: dict(indices=i[:7]), "indices"),
    "indices padded rank": (lambda b, i: dict(indices=i[None]), "indices"),
    "cu_seqlens int64": (lambda b, i: dict(cu_seqlens_q=b.cu_seqlens_q.long()), "cu_seqlens_q"),
    "cu_seqlens past the rows": (lambda b, i: dict(cu_seqlens_k=torch.tensor([0, 3, 9], dtype=torch.int32),
                                                   max_seqlen_k=6), "cu_seqlens_k"),
    "only cu_seqlens_q": (lambda b, i: dict(cu_seqlens_k=None), "cu_seqlens"),
}


def _call_with(batch, indices, overrides):
    args = dict(q=batch.q, k=batch.k, v=batch.v, indices=indices, select_block=4, scale=None, **batch.seqlens)
    args.update(overrides)
    q, k, v, idx = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("indices")
    return nsa_ext.selection_attention(q, k, v, idx, **args)


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_padded(case):
    make, name = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=f"'{name}"):
        _call_with(*_good(), make(*_good()))


@pytest.mark.parametrize("case", list(BAD_PACKED), ids=list(BAD_PACKED))
def test_bad_input_packed(case):
    make, name = BAD_PACKED[case]
    with pytest.raises(ValueError, match=f"'{name}"):
        _call_with(*_packed(), make(*_packed()))


def test_backward_op_checks_its_extra_inputs():
    b, idx = _good()
    args = (idx, 4, 0.25, None, None, 8, 8)
    out, lse = OPS.selection_attention_fwd(b.q, b.k, b.v, *args)
    bwd = OPS.selection_attention_bwd
    with pytest.raises(ValueError, match="'dout'"):
        bwd(out[..., :4], None, b.q, b.k, b.v, idx, out, lse, *args[1:])
    with pytest.raises(ValueError, match="'lse'"):
        bwd(out, None, b.q, b.k, b.v, idx, out, lse.double(), *args[1:])
    with pytest.raises(ValueError, match="'dlse'"):
        bwd(out, lse[:, :3], b.q, b.k, b.v, idx, out, lse, *args[1:])
    with pytest.raises(ValueError, match="'out'"):
        bwd(out, None, b.q, b.k, b.v, idx, out.double(), lse, *args[1:])
    with pytest.raises(ValueError, match="'indices'"):
        bwd(out, None, b.q, b.k, b.v, idx.long(), out, lse, *args[1:])


# --- validate_block_indices ----------------------------------------------------------------------

def test_validate_accepts_nsa_like_and_random_indices():
    gen = torch.Generator().manual_seed(16)
    nsa_ext.validate_block_indices(nsa_like_indices(300, 2, 8, 16, gen), select_block=16)
    lengths = [0, 1, 40, 77]
    idx = random_indices(lengths, lengths, 2, 4, 16, True, gen, holes=0.3)
    nsa_ext.validate_block_indices(idx, select_block=16, cu_seqlens_q=cu_seqlens(lengths),
                                   cu_seqlens_k=cu_seqlens(lengths))
    idx = random_indices([20, 20], [50, 50], 2, 3, 8, False, gen)  # TQ < TK: TK from max_seqlen_k
    nsa_ext.validate_block_indices(idx, select_block=8, max_seqlen_k=50)
    with pytest.raises(ValueError, match="'indices'.*(out of range|future block)"):
        nsa_ext.validate_block_indices(idx, select_block=8)  # TK defaults to TQ = 20: blocks 3.. do not exist


@pytest.mark.parametrize("bad, why", [(5, "out of range"), (-3, "out of range"), (INT32_MAX, "out of range"),
                                      (1, "appears more than once"), (4, "future block")])
def test_validate_names_the_first_bad_row_and_why(bad, why):
    idx = torch.full((2, 40, 3, 4), -1, dtype=torch.int32)
    idx[..., 0] = 0
    idx[..., 1] = 1
    idx[1, 30, 2, 2] = bad        # the first bad row in (sequence, query, kv head) order ...
    idx[1, 35, 0, 3] = bad        # ... not this one
    if bad == 4:                  # block 4 starts at key 64; TK = 72 puts query 30 at position 62
        expected = r"sequence 1, query 30 \(position 62\), kv head 2: block 4 starts at key 64"
    else:
        expected = r"sequence 1, query 30 \(position 62\), kv head 2: "
    with pytest.raises(ValueError, match=expected) as info:
        nsa_ext.validate_block_indices(idx, select_block=16, max_seqlen_k=72)
    assert why in str(info.value) and "'indices'" in str(info.value)


def test_validate_packed_names_the_sequence():
    lengths = [3, 10]
    idx = torch.zeros(13, 1, 2, dtype=torch.int32)
    idx[:, :, 1] = -1
    idx[3 + 9, 0, 1] = 3  # sequence 1 has 10 keys: blocks 0..2 of 4 keys
    with pytest.raises(ValueError, match=r"sequence 1, query 9 \(position 9\), kv head 0: block id 3 is out of range"):
        nsa_ext.validate_block_indices(idx, select_block=4, cu_seqlens_q=cu_seqlens(lengths),
                                       cu_seqlens_k=cu_seqlens(lengths))


def test_validate_checks_its_arguments():
    idx = torch.zeros(1, 4, 1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="'indices'"):
        nsa_ext.validate_block_indices(idx.long(), select_block=4)
    with pytest.raises(ValueError, match="'indices'"):
        nsa_ext.validate_block_indices(idx[0], select_block=4)
    with pytest.raises(ValueError, match="'select_block'"):
        nsa_ext.validate_block_indices(idx, select_block=0)
    with pytest.raises(ValueError, match="'cu_seqlens_k'"):
        nsa_ext.validate_block_indices(idx[0], select_block=4, cu_seqlens_q=cu_seqlens([4]))
