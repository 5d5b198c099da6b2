"""Fused decoding (nsa_ext.native_sparse_attention_with_kvcache, torch.ops.nsa.decode_attention) vs the
reference NSA layer attention per sequence: ragged cache lengths, TQ = 1 and a few (speculative
decoding), GQA groups, Dk != Dv, shared or own window keys, low precision, cache rows past the live
length never read, errors, opcheck and compile."""

import pytest
import torch

import nsa_ext
from nsa_ext import NSAConfig, reference

from utils import (EMULATED_CUDA, GPU, assert_close_fp32, assert_within_torch_error, poisoned_outputs, requires_device,
                   requires_gpu)

CONFIGS = {
    "small": NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_count=4, init_blocks=1,
                       local_blocks=1, window=12),
    "l=d=l'": NSAConfig(compress_block=8, compress_stride=8, select_block=8, select_count=5, init_blocks=1,
                        local_blocks=2, window=5),
    "no forced": NSAConfig(compress_block=16, compress_stride=8, select_block=32, select_count=3, init_blocks=0,
                           local_blocks=0, window=30),
}
# Live keys per sequence: shorter than one compressed token, exactly the new queries, several blocks.
LENGTHS = [3, 9, 40, 131]


def make_cache(lengths, tq, hq, hk, dk, dv, cfg, own_window, dtype=torch.float64, seed=0, poison=float("nan")):
    """Padded caches with a few rows of capacity to spare, filled with `poison` past each live length."""
    gen = torch.Generator().manual_seed(seed)
    batch, capacity = len(lengths), max(lengths) + 5
    tokens = [reference.num_compressed_tokens(n, cfg.compress_block, cfg.compress_stride) for n in lengths]
    token_capacity = max(tokens) + 2

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)

    def cache(rows, live, dim):
        t = randn(batch, rows, hk, dim)
        for b, n in enumerate(live):
            t[b, n:] = poison
        return t

    c = dict(q=randn(batch, tq, hq, dk), k=cache(capacity, lengths, dk), v=cache(capacity, lengths, dv),
             k_cmp=cache(token_capacity, tokens, dk), v_cmp=cache(token_capacity, tokens, dv),
             gates=torch.rand(batch, tq, hq, 3, dtype=torch.float64, generator=gen).to(dtype),
             seqlens=torch.tensor(lengths, dtype=torch.int32), k_swa=None, v_swa=None)
    if own_window:
        c["k_swa"], c["v_swa"] = cache(capacity, lengths, dk), cache(capacity, lengths, dv)
    return c


def fused(c, cfg, **kwargs):
    return nsa_ext.native_sparse_attention_with_kvcache(
        c["q"], c["k"], c["v"], c["k_cmp"], c["v_cmp"], c["gates"], c["seqlens"], config=cfg,
        k_swa_cache=c["k_swa"], v_swa_cache=c["v_swa"], return_indices=True, **kwargs)


def per_sequence(c, cfg, impl=reference, dtype=None):
    """The NSA layer attention of each sequence's live rows (B = 1, queries bottom-right aligned)."""
    outs, ids = [], []
    for b, n in enumerate(c["seqlens"].tolist()):
        tc = reference.num_compressed_tokens(n, cfg.compress_block, cfg.compress_stride)

        def live(t, rows):
            t = t[b:b + 1, :rows]
            return t if dtype is None else t.to(dtype)

        own = c["k_swa"] is not None
        out, idx = impl.native_sparse_attention(
            live(c["q"], None), live(c["k"], n), live(c["v"], n), live(c["k_cmp"], tc), live(c["v_cmp"], tc),
            *live(c["gates"], None).unbind(-1), config=cfg, k_swa=live(c["k_swa"], n) if own else None,
            v_swa=live(c["v_swa"], n) if own else None, max_seqlen_k=n, return_indices=True)
        outs.append(out)
        ids.append(idx)
    return torch.cat(outs), torch.cat(ids)


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("own_window", [False, True], ids=["shared-kv", "own-window-kv"])
@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("hq,hk", [(1, 1), (4, 2), (8, 1), (32, 2)])
def test_matches_reference_fp64(cfg_name, own_window, tq, hq, hk):
    cfg = CONFIGS[cfg_name]
    c = make_cache(LENGTHS, tq, hq, hk, 16, 8, cfg, own_window, seed=hq * 10 + tq)
    with poisoned_outputs():
        out, indices = fused(c, cfg)
    expected, expected_indices = per_sequence(c, cfg)
    assert torch.equal(indices, expected_indices)
    assert_close_fp32(out, expected, rel=1e-10, name="decode fp64")


def test_matches_the_operators_fp32():
    cfg = CONFIGS["small"]
    c = make_cache(LENGTHS, 2, 8, 2, 24, 40, cfg, True, dtype=torch.float32, seed=3)
    out, indices = fused(c, cfg)
    exact, _ = per_sequence({k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                             for k, v in c.items()}, cfg)
    ops_out, ops_indices = per_sequence(c, cfg, impl=nsa_ext)
    assert torch.equal(indices, ops_indices)
    assert_close_fp32(out, exact, rel=1e-5, name="decode fp32")
    assert_close_fp32(ops_out, exact, rel=1e-5, name="operators fp32")


def _with_indices(c, cfg, indices):
    """Plain PyTorch (the reference operators) in c's dtype for the given selection: the low-precision
    computation the 2x rule compares against."""
    outs = []
    for b, n in enumerate(c["seqlens"].tolist()):
        tc = reference.num_compressed_tokens(n, cfg.compress_block, cfg.compress_stride)
        q, gates = c["q"][b:b + 1], c["gates"][b:b + 1]
        k, v = c["k"][b:b + 1, :n], c["v"][b:b + 1, :n]
        o_cmp, _ = reference.compressed_attention(q, c["k_cmp"][b:b + 1, :tc], c["v_cmp"][b:b + 1, :tc],
                                                  compress_block=cfg.compress_block,
                                                  compress_stride=cfg.compress_stride, max_seqlen_k=n)
        o_slc, _ = reference.selection_attention(q, k, v, indices[b:b + 1], select_block=cfg.select_block)
        if c["k_swa"] is not None:
            k, v = c["k_swa"][b:b + 1, :n], c["v_swa"][b:b + 1, :n]
        o_swa, _ = reference.sliding_window_attention(q, k, v, window=cfg.window)
        g_cmp, g_slc, g_swa = (g.unsqueeze(-1) for g in gates.unbind(-1))
        outs.append(g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa)
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_torch_error(dtype):
    cfg = CONFIGS["small"]
    c = make_cache(LENGTHS, 1, 8, 2, 32, 32, cfg, False, dtype=dtype, seed=4)
    out, indices = fused(c, cfg)
    as64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in c.items()}
    exact, exact_indices = per_sequence(as64, cfg)
    assert torch.equal(indices, exact_indices)  # fp32 scores of these inputs pick what fp64 picks
    assert_within_torch_error(out, _with_indices(c, cfg, exact_indices), exact, name=f"decode {dtype}")


def test_reads_no_cache_row_past_the_live_length():
    cfg = CONFIGS["small"]
    clean = make_cache(LENGTHS, 2, 4, 2, 16, 16, cfg, True, poison=0.0, seed=5)
    poisoned = make_cache(LENGTHS, 2, 4, 2, 16, 16, cfg, True, poison=float("nan"), seed=5)
    out_clean, _ = fused(clean, cfg)
    out_poisoned, _ = fused(poisoned, cfg)
    assert torch.isfinite(out_poisoned).all()
    assert torch.equal(out_clean, out_poisoned)


def test_deterministic_across_thread_counts():
    cfg = CONFIGS["small"]
    c = make_cache([200, 77, 150], 4, 16, 4, 32, 16, cfg, True, dtype=torch.float32, seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(c, cfg)
        torch.set_num_threads(max(2, threads))
        many = fused(c, cfg)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def _errors_case():
    return make_cache([10, 20], 1, 4, 2, 8, 8, CONFIGS["small"], False, dtype=torch.float32)


@pytest.mark.parametrize("change,argument", [
    (lambda c: c.update(seqlens=torch.tensor([10, 99], dtype=torch.int32)), "cache_seqlens"),
    (lambda c: c.update(seqlens=torch.tensor([0, 20], dtype=torch.int32)), "cache_seqlens"),
    (lambda c: c.update(seqlens=torch.tensor([10, 20])), "cache_seqlens"),
    (lambda c: c.update(seqlens=torch.tensor([10], dtype=torch.int32)), "cache_seqlens"),
    (lambda c: c.update(gates=c["gates"][..., :2]), "gates"),
    (lambda c: c.update(gates=c["gates"].double()), "gates"),
    (lambda c: c.update(k=c["k"][..., :4]), "k_cache"),
    (lambda c: c.update(v=c["v"].double()), "v_cache"),
    (lambda c: c.update(v=c["v"][:, :-1]), "v_cache"),
    (lambda c: c.update(k_cmp=c["k_cmp"][:, :1], v_cmp=c["v_cmp"][:, :1]), "k_cmp_cache"),
    (lambda c: c.update(v_cmp=c["v_cmp"][..., :4]), "v_cmp_cache"),
    (lambda c: c.update(k_swa=c["k"]), "v_swa_cache"),
    (lambda c: c.update(q=c["q"][0]), "q"),
    (lambda c: c.update(q=c["q"].transpose(-1, -2).contiguous().transpose(-1, -2)), "q"),
])
def test_bad_inputs_name_the_argument(change, argument):
    c = _errors_case()
    change(c)
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        fused(c, CONFIGS["small"])


def test_bad_config_names_the_argument():
    c = _errors_case()
    with pytest.raises(ValueError, match="argument 'window'"):
        torch.ops.nsa.decode_attention(c["q"], c["k"], c["v"], c["k_cmp"], c["v_cmp"], None, None, c["gates"],
                                       c["seqlens"], 8, 4, 16, 4, 1, 1, 0, 0.5)


def _op_args(c, cfg):
    return (c["q"], c["k"], c["v"], c["k_cmp"], c["v_cmp"], c["k_swa"], c["v_swa"], c["gates"], c["seqlens"],
            cfg.compress_block, cfg.compress_stride, cfg.select_block, cfg.select_count, cfg.init_blocks,
            cfg.local_blocks, cfg.window, 0.3)


def test_opcheck():
    cfg = CONFIGS["small"]
    for own_window in (False, True):
        c = make_cache(LENGTHS, 2, 4, 2, 8, 16, cfg, own_window, dtype=torch.float32, poison=0.0)
        torch.library.opcheck(torch.ops.nsa.decode_attention.default, _op_args(c, cfg))


def test_compile_fullgraph():
    cfg = CONFIGS["small"]
    c = make_cache(LENGTHS, 1, 4, 2, 8, 16, cfg, False, dtype=torch.float32, poison=0.0)
    compiled = torch.compile(lambda *a: fused(dict(zip(c, a)), cfg)[0], fullgraph=True)
    assert torch.equal(compiled(*c.values()), fused(c, cfg)[0])


# --- CUDA (skipped without a GPU or the emulation build): the kernels against the reference --------

cuda = requires_gpu


def _to(c, device, dtype=None):
    return {k: (None if v is None else v.to(device, dtype if (dtype and v.is_floating_point()) else v.dtype))
            for k, v in c.items()}


def _check_cuda_matches_reference_fp64(c, cfg):
    with poisoned_outputs():
        out, indices = fused(_to(c, GPU), cfg)
    expected, expected_indices = per_sequence(c, cfg)
    assert torch.equal(indices.cpu(), expected_indices)
    assert_close_fp32(out.cpu(), expected, rel=1e-10, name="decode cuda fp64")


@cuda
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("hq,hk,dk,dv", [(4, 2, 16, 8), (16, 1, 128, 128), (8, 8, 192, 128), (32, 4, 64, 256)])
def test_cuda_matches_reference_fp64(cfg_name, hq, hk, dk, dv):
    cfg = CONFIGS[cfg_name]
    _check_cuda_matches_reference_fp64(make_cache(LENGTHS, 3, hq, hk, dk, dv, cfg, own_window=hq > 8, seed=hq + dk), cfg)


@cuda
@pytest.mark.parametrize("tq", [1, 4])
def test_cuda_many_splits_match_reference(tq):
    # Paper blocks over long, ragged caches: several compressed, selected and window splits per task
    # (at least 128 rows each), so blocks' tokens straddle chunks and splits, and empty splits occur.
    cfg = NSAConfig(compress_block=32, compress_stride=16, select_block=64, select_count=16, init_blocks=1,
                    local_blocks=2, window=512)
    _check_cuda_matches_reference_fp64(make_cache([8192, 3001, 700, 20], tq, 8, 2, 64, 32, cfg, own_window=True, seed=21),
                                 cfg)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_low_precision(dtype):
    cfg = CONFIGS["small"]
    c = make_cache(LENGTHS, 1, 16, 2, 128, 128, cfg, False, dtype=dtype, seed=8)
    out, indices = fused(_to(c, GPU), cfg)
    as64 = _to(c, "cpu", torch.float64)
    exact, exact_indices = per_sequence(as64, cfg)
    assert torch.equal(indices.cpu(), exact_indices)
    if dtype == torch.float32:
        assert_close_fp32(out.cpu(), exact, rel=1e-5, name="decode cuda fp32")
    else:
        assert_within_torch_error(out.cpu(), _with_indices(c, cfg, exact_indices), exact, name=f"decode cuda {dtype}")


def _ran_tensor_cores(step) -> bool:
    """Whether step() ran the tensor-core attend kernel (MmaMath): emulated mma instructions under
    emulation, the kernel's name in the profiler on a GPU."""
    if EMULATED_CUDA:
        nsa_ext._C._emulation_counters()  # resets them
        step()
        return nsa_ext._C._emulation_counters()["mma"] > 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return any("MmaMath" in e.name for e in prof.events())


PAPER = NSAConfig(compress_block=32, compress_stride=16, select_block=64, select_count=16, init_blocks=1,
                  local_blocks=2, window=512)


@cuda
@pytest.mark.parametrize("hq,hk,dk,dv,dtype", [
    (2, 2, 64, 64, torch.bfloat16),     # G = 1
    (4, 2, 128, 128, torch.float16),    # G = 2
    (16, 4, 192, 128, torch.bfloat16),  # G = 4
    (8, 1, 256, 256, torch.float16),    # G = 8
    (32, 2, 64, 64, torch.bfloat16),    # G = 16: one full mma tile of heads
    (48, 2, 128, 128, torch.float16),   # G = 24: a full and a partial head slice
    (64, 2, 192, 128, torch.bfloat16),  # G = 32: two slices
])
@pytest.mark.parametrize("tq", [1, 3])
def test_cuda_tensor_cores_within_torch_error(hq, hk, dk, dv, dtype, tq):
    # The tensor-core attend kernel: every tiled head-dim pair, groups below, at and above one mma
    # tile, paper blocks over ragged caches (several splits per branch, chunks cut mid-block, a
    # sequence shorter than a compressed token), own window keys.
    c = make_cache([4100, 1500, 333, 20], tq, hq, hk, dk, dv, PAPER, True, dtype=dtype, seed=hq + dk + tq)
    result = []
    tiled = dk in nsa_ext.build_info()["tiled_head_dims"]  # else (NSA_CUDA_HEAD_DIMS) the SIMT kernel
    with poisoned_outputs():  # outputs and the split workspace start as NaN
        assert _ran_tensor_cores(lambda: result.extend(fused(_to(c, GPU), PAPER))) == tiled
    out, indices = result
    exact, exact_indices = per_sequence(_to(c, "cpu", torch.float64), PAPER)
    assert torch.equal(indices.cpu(), exact_indices)
    assert torch.isfinite(out).all()  # NaN rows past the live lengths were never read
    assert_within_torch_error(out.cpu(), _with_indices(c, PAPER, exact_indices), exact, name=f"decode {dtype}")


@cuda
def test_cuda_unaligned_rows_take_the_simt_kernel():
    # cp.async needs 16-byte aligned rows: caches one element off alignment run the SIMT attend kernel.
    cfg = CONFIGS["small"]
    c = make_cache(LENGTHS, 2, 8, 2, 64, 64, cfg, False, dtype=torch.bfloat16, seed=12)
    on_device = _to(c, GPU)
    for name in ("k", "v"):
        t = on_device[name]
        shifted = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
        on_device[name] = shifted.copy_(t)
    result = []
    with poisoned_outputs():
        assert not _ran_tensor_cores(lambda: result.extend(fused(on_device, cfg)))
    out, indices = result
    exact, exact_indices = per_sequence(_to(c, "cpu", torch.float64), cfg)
    assert torch.equal(indices.cpu(), exact_indices)
    assert_within_torch_error(out.cpu(), _with_indices(c, cfg, exact_indices), exact, name="decode unaligned")


@cuda
@requires_device
def test_cuda_deterministic_and_graph_capturable():
    cfg = CONFIGS["small"]
    c = _to(make_cache([500, 64, 1000], 2, 16, 2, 128, 128, cfg, True, dtype=torch.bfloat16, seed=9,
                       poison=float("nan")), GPU)
    first, second = fused(c, cfg), fused(c, cfg)
    assert torch.isfinite(first[0]).all()  # NaN rows past the live lengths were never read
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    graph = torch.cuda.CUDAGraph()
    fused(c, cfg)  # warm-up outside the capture
    with torch.cuda.graph(graph):
        captured = fused(c, cfg)
    c["q"].copy_(torch.randn_like(c["q"]))
    graph.replay()
    assert torch.equal(captured[0], fused(c, cfg)[0])


@cuda
def test_cuda_opcheck():
    cfg = CONFIGS["small"]
    c = _to(make_cache(LENGTHS, 2, 4, 2, 8, 16, cfg, True, dtype=torch.float32, poison=0.0), GPU)
    torch.library.opcheck(torch.ops.nsa.decode_attention.default, _op_args(c, cfg))
