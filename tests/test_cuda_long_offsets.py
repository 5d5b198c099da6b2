"""The CUDA kernels at element offsets past 2^31, which only 64-bit offsets reach (the CPU kernels'
counterpart is test_long_sequences.py). Runs on a GPU and under emulation (test_cuda_emulated.py).

Padded layout, batch of 2, key tensors [2, ROWS, Hk, D] with ROWS * Hk * D > 2^31: every row of the
second sequence lies past element 2^31. The tensors come from torch.empty and only the rows a kernel
can read are written (random), so on the CPU the untouched gigabytes stay virtual. The queries see
few rows: bottom-right aligned at the end of ROWS keys (window, selected blocks), or with a short
max_seqlen_k over the first compressed-token rows (compressed, select_blocks), or a short live length
in a cache of ROWS rows (decoding). Each result is checked against the reference on the rows it sees.
The backward of the window and selection branches runs on a GPU only: its dk and dv are as large as
the keys, and their kernels' grids span every key row.
"""

import pytest
import torch

import nsa_ext
from nsa_ext import NSAConfig, reference

from test_decode_attention import _with_indices, make_cache, per_sequence
from test_select_blocks import Config, Inputs, check_selection
from utils import (GPU, assert_close_fp32, assert_within_torch_error, finite_cotangent, grads, poisoned_outputs,
                   requires_device, requires_gpu)

pytestmark = requires_gpu

HEADS_Q, HEADS_K, DIM = 4, 2, 64
ROWS = 2**24 + 64      # key rows per sequence: sequence 1 starts at element ROWS * 2 * 64 = 2^31 + 8192
END = 256              # rows at the end of each sequence that the window and the selected blocks use
TQ = 5
DTYPES = [torch.bfloat16, torch.float32]  # tensor-core (tiled) and baseline kernels


def sparse_tensor(rows, heads, dim, dtype, written, gen):
    """[2, rows, heads, dim], uninitialised but for the row ranges in `written` (random)."""
    t = torch.empty(2, rows, heads, dim, dtype=dtype, device=GPU)
    assert t[1].storage_offset() > 2**31  # the second sequence lies past element 2^31
    for r in written:
        t[:, r] = torch.randn(2, r.stop - r.start, heads, dim, generator=gen).to(dtype)
    return t


def queries(dtype, gen):
    return torch.randn(2, TQ, HEADS_Q, DIM, generator=gen).to(dtype)


def check(name, dtype, ours, run):
    """ours vs the reference on the rows it sees: fp32 within 1e-5, low precision by the 2x rule."""
    exact, low = run(torch.float64), run(dtype)
    for i, (a, lo, e) in enumerate(zip(ours, low, exact, strict=True)):
        if dtype == torch.float32:
            assert_close_fp32(a.cpu(), e, rel=1e-5, name=f"{name}[{i}]")
        else:
            assert_within_torch_error(a.cpu(), lo, e, name=f"{name}[{i}]")


def window_and_selection(dtype, backward):
    """(name, ours, run) of sliding_window_attention and selection_attention over keys at the end of
    ROWS rows; ours: out and lse, and with `backward` dq and the visible rows' dk and dv; run(dtype):
    the same from the reference on those rows."""
    gen = torch.Generator().manual_seed(0)
    end = slice(ROWS - END, ROWS)
    k = sparse_tensor(ROWS, HEADS_K, DIM, dtype, [end], gen).requires_grad_(backward)
    v = sparse_tensor(ROWS, HEADS_K, DIM, dtype, [end], gen).requires_grad_(backward)
    q = queries(dtype, gen)
    # Blocks of 32 among the last END rows, with -1 and ids past the last block.
    first = (ROWS - END) // 32
    ids = torch.randint(first, ROWS // 32 + 3, (2, TQ, HEADS_K, 4), generator=gen, dtype=torch.int32)
    ids[:, ::2, :, 0] = -1
    local = torch.where(ids >= 0, ids - first, ids)
    ops = {"window": lambda q, k, v, ids: nsa_ext.sliding_window_attention(q, k, v, window=48),
           "selection": lambda q, k, v, ids: nsa_ext.selection_attention(q, k, v, ids, select_block=32)}
    refs = {"window": lambda q, k, v, ids: reference.sliding_window_attention(q, k, v, window=48),
            "selection": lambda q, k, v, ids: reference.selection_attention(q, k, v, ids, select_block=32)}
    for name, op in ops.items():
        q_gpu = q.to(GPU).requires_grad_(backward)
        with poisoned_outputs():
            ours = op(q_gpu, k, v, ids.to(GPU))
        dout = torch.randn(ours[0].shape, generator=gen).to(dtype)
        dlse = finite_cotangent(ours[1].cpu(), gen).float()
        if backward:
            with poisoned_outputs():
                dq, dk, dv = torch.autograd.grad(ours, (q_gpu, k, v), (dout.to(GPU), dlse.to(GPU)))
            # Rows before the end get zero gradient (a sample: reading all of them would take long).
            assert not dk[:, :ROWS - END:4099].any() and not dv[:, :ROWS - END:4099].any()
            ours = (*ours, dq, dk[:, end], dv[:, end])

        def run(to, name=name):  # the reference on the rows the queries see, as sequences of END keys
            ins = [t.detach()[:, rows].cpu().to(to).requires_grad_(backward)
                   for t, rows in ((q, slice(None)), (k, end), (v, end))]
            out = refs[name](*ins, local)
            return (*out, *grads(out, ins, (dout, dlse))) if backward else out
        yield name, ours, run


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliding_window_and_selection_forward(dtype):
    for name, ours, run in window_and_selection(dtype, backward=False):
        check(name, dtype, ours, run)


@requires_device  # under emulation the dk / dv kernels' grids over every key row would take too long
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliding_window_and_selection_backward(dtype):
    for name, ours, run in window_and_selection(dtype, backward=True):
        check(name, dtype, ours, run)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compressed_attention_and_select_blocks(dtype):
    gen = torch.Generator().manual_seed(1)
    keys, cfg = 200, Config(16, 8, 32, 4, init_blocks=1, local_blocks=1)
    tokens = reference.num_compressed_tokens(keys, cfg.compress_block, cfg.compress_stride)
    k_cmp = sparse_tensor(ROWS, HEADS_K, DIM, dtype, [slice(0, tokens)], gen)
    v_cmp = sparse_tensor(ROWS, HEADS_K, DIM, dtype, [slice(0, tokens)], gen)
    q = queries(dtype, gen)
    head = lambda t, to: t[:, :tokens].cpu().to(to)  # noqa: E731
    kwargs = dict(compress_block=cfg.compress_block, compress_stride=cfg.compress_stride, max_seqlen_k=keys)

    with poisoned_outputs():
        out, lse = nsa_ext.compressed_attention(q.to(GPU), k_cmp, v_cmp, **kwargs)
    check("compressed", dtype, (out, lse),
          lambda to: reference.compressed_attention(q.to(to), head(k_cmp, to), head(v_cmp, to), **kwargs))

    with poisoned_outputs():
        ids = nsa_ext.select_blocks(q.to(GPU), k_cmp, lse, **cfg.kwargs, max_seqlen_k=keys)
    check_selection(ids.cpu(), Inputs(q, head(k_cmp, dtype), lse.cpu(), [keys, keys], max_seqlen_k=keys), cfg,
                    rel=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoding(dtype):
    # A cache of `capacity` rows of 8 kv heads x 128 (sequence 1 past element 2^31); the selection kernel
    # keeps a score per block of 64 in shared memory, which bounds the capacity to about 2.9M rows.
    capacity, heads_k, dim = 2**21 + 64, 8, 128
    cfg = NSAConfig(compress_block=32, compress_stride=16, select_block=64, select_count=4, init_blocks=1,
                    local_blocks=1, window=64)
    small = make_cache([300, 131], 1, 2 * heads_k, heads_k, dim, dim, cfg, own_window=False, dtype=dtype, seed=2,
                       poison=0.0)
    c = {name: (t.to(GPU) if torch.is_tensor(t) else t) for name, t in small.items()}
    gen = torch.Generator().manual_seed(3)
    for name in ("k", "v"):
        c[name] = sparse_tensor(capacity, heads_k, dim, dtype, [], gen)
        c[name][:, :small[name].shape[1]] = small[name].to(GPU)
    with poisoned_outputs():
        out, indices = nsa_ext.native_sparse_attention_with_kvcache(
            c["q"], c["k"], c["v"], c["k_cmp"], c["v_cmp"], c["gates"], c["seqlens"], config=cfg,
            return_indices=True)
    as64 = {name: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t) for name, t in small.items()}
    exact, exact_indices = per_sequence(as64, cfg)
    assert torch.equal(indices.cpu(), exact_indices)
    if dtype == torch.float32:
        assert_close_fp32(out.cpu(), exact, rel=1e-5, name="decode fp32")
    else:
        assert_within_torch_error(out.cpu(), _with_indices(small, cfg, exact_indices), exact, name="decode bf16")
