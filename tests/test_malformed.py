"""A catalogue of malformed inputs to every public function and operator: wrong rank, dtype, device
mix (meta with CPU tensors), shape mismatch, non-contiguous, zero-size, negative, huge and duplicate
block ids, bad cu_seqlens, inconsistent max_seqlen, bad configurations. Each must raise exactly the
listed exception type with a message that names the offending argument ("argument 'x'").

The whole catalogue runs in one child process (this file run as a script), which reports each case
as a JSON line before the next starts: a case that crashes the process (segfault, abort) or hangs
fails its own test here, with the child's output, instead of taking the test run down.
"""

import json
import subprocess
import sys

import pytest
import torch

import nsa_ext
from nsa_ext import NativeSparseAttention, NSACache, NSAConfig

OPS = torch.ops.nsa
INT32_MAX, INT32_MIN = 2**31 - 1, -2**31


def cu(*offsets):
    return torch.tensor(offsets, dtype=torch.int32)


# Well-formed inputs that each case spoils in one place. Padded: B=2, T=8, Hq=4, Hk=2 (G=2), Dk=16,
# Dv=8; packed: sequences of 3 and 5 rows. Compressed tokens for l=4, d=2: TC(8) = 3 per sequence,
# TC(3) + TC(5) = 0 + 1 packed. Selection blocks of 4 keys.
torch.manual_seed(0)
Q, K, V = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 8)
QP, KP, VP = torch.randn(8, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 8)
PACKED = dict(cu_seqlens_q=cu(0, 3, 8), cu_seqlens_k=cu(0, 3, 8), max_seqlen_q=5, max_seqlen_k=5)
KC, VC = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 8)
KCP, VCP = torch.randn(1, 2, 16), torch.randn(1, 2, 8)
CMP = dict(compress_block=4, compress_stride=2)
_, LSE = nsa_ext.compressed_attention(Q, KC, VC, **CMP)
SELECT = dict(CMP, select_block=4, select_count=2, init_blocks=1, local_blocks=1)
IDX = torch.zeros(2, 8, 2, 3, dtype=torch.int32)
CONFIG = NSAConfig(compress_block=4, compress_stride=2, select_block=4, select_count=2, init_blocks=1,
                   local_blocks=1, window=4)
GATES = [torch.rand(2, 8, 4) for _ in range(3)]
OUT, OUT_LSE = OPS.sliding_window_attention_fwd(Q, K, V, 4, 0.25, None, None, 8, 8)


def swa(**changes):
    args = dict(q=Q, k=K, v=V, window=4)
    args.update(changes)
    return lambda: nsa_ext.sliding_window_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def swa_packed(**changes):
    args = dict(q=QP, k=KP, v=VP, window=4, **PACKED)
    args.update(changes)
    return lambda: nsa_ext.sliding_window_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def swa_bwd(**changes):
    """The backward op, positional as in its schema."""
    args = dict(dout=torch.ones_like(OUT), dlse=None, q=Q, k=K, v=V, out=OUT, lse=OUT_LSE, window=4, scale=0.25,
                cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=8, max_seqlen_k=8)
    args.update(changes)
    return lambda: OPS.sliding_window_attention_bwd(*args.values())


def compressed(packed=False, **changes):
    args = dict(q=QP, k_cmp=KCP, v_cmp=VCP, **CMP, **PACKED) if packed else dict(q=Q, k_cmp=KC, v_cmp=VC, **CMP)
    args.update(changes)
    return lambda: nsa_ext.compressed_attention(args.pop("q"), args.pop("k_cmp"), args.pop("v_cmp"), **args)


def select(packed=False, **changes):
    if packed:
        args = dict(q=QP, k_cmp=KCP, lse=torch.zeros(8, 4), **SELECT, **PACKED)
    else:
        args = dict(q=Q, k_cmp=KC, lse=LSE, **SELECT)
    args.update(changes)
    return lambda: nsa_ext.select_blocks(args.pop("q"), args.pop("k_cmp"), args.pop("lse"), **args)


def selection(**changes):
    args = dict(q=Q, k=K, v=V, indices=IDX, select_block=4)
    args.update(changes)
    return lambda: nsa_ext.selection_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("indices"),
                                               **args)


def validate(ids=None, **changes):
    """validate_block_indices on padded ids (one id per row, block 0 by default), or packed with cu_seqlens."""
    args = dict(indices=IDX[..., :1] if ids is None else ids, select_block=4)
    args.update(changes)
    return lambda: nsa_ext.validate_block_indices(args.pop("indices"), **args)


def with_id(value, slot=0):
    """Padded ids [block 0, -1] in every row, but `value` in one slot of one row."""
    ids = torch.stack([IDX[..., 0], torch.full_like(IDX[..., 0], -1)], dim=-1)
    ids[1, 5, 1, slot] = value
    return ids


def nsa(**changes):
    args = dict(q=Q, k=K, v=V, k_cmp=KC, v_cmp=VC, g_cmp=GATES[0], g_slc=GATES[1], g_swa=GATES[2], config=CONFIG)
    args.update(changes)
    tensors = [args.pop(n) for n in ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_swa")]
    return lambda: nsa_ext.native_sparse_attention(*tensors, **args)


def decode(**changes):
    """native_sparse_attention_with_kvcache: one new query per sequence, caches of 8 keys (3 tokens)."""
    args = dict(q=Q[:, :1], k_cache=K, v_cache=V, k_cmp_cache=KC, v_cmp_cache=VC, gates=torch.rand(2, 1, 4, 3),
                cache_seqlens=cu(8, 5), config=CONFIG)
    args.update(changes)
    tensors = [args.pop(n) for n in ("q", "k_cache", "v_cache", "k_cmp_cache", "v_cmp_cache", "gates",
                                     "cache_seqlens")]
    return lambda: nsa_ext.native_sparse_attention_with_kvcache(*tensors, **args)


def layer(**kwargs):
    return NativeSparseAttention(32, num_heads=4, num_kv_heads=2, config=CONFIG, compression="mean", **kwargs)


def strided_last_dim(t):
    return torch.cat([t, t], dim=-1)[..., ::2]


# case -> (thunk, exception type, argument the message must name)
CASES = {
    # sliding_window_attention (the attention checks all three attention ops share)
    "swa q rank 5": (swa(q=Q[None]), ValueError, "q"),
    "swa q 0-d": (swa(q=torch.tensor(1.0)), ValueError, "q"),
    "swa q bool": (swa(q=Q.bool()), ValueError, "q"),
    "swa k float64 with float32 q": (swa(k=K.double()), ValueError, "k"),
    "swa v on meta, q on cpu": (swa(v=V.to("meta")), ValueError, "v"),
    "swa q on meta, k and v on cpu": (swa(q=Q.to("meta")), ValueError, "k"),
    "swa q last dim strided": (swa(q=strided_last_dim(Q)), ValueError, "q"),
    "swa v batch differs": (swa(v=torch.cat([V, V[:1]])), ValueError, "v"),
    "swa Dk = 0": (swa(q=Q[..., :0], k=K[..., :0]), ValueError, "q"),
    "swa Hk = 0": (swa(k=K[:, :, :0], v=V[:, :, :0]), ValueError, "k"),
    "swa window negative": (swa(window=-3), ValueError, "window"),
    "swa window past int64": (swa(window=2**64), ValueError, "window"),
    "swa scale inf": (swa(scale=float("inf")), ValueError, "scale"),
    "swa padded max_seqlen_k differs from TK": (swa(max_seqlen_k=7), ValueError, "max_seqlen_k"),
    "swa packed cu_seqlens_q on meta": (swa_packed(cu_seqlens_q=cu(0, 3, 8).to("meta")), ValueError,
                                        "cu_seqlens_q"),
    "swa packed cu_seqlens_q not contiguous": (swa_packed(cu_seqlens_q=cu(0, 0, 3, 3, 8, 8)[::2]), ValueError,
                                               "cu_seqlens_q"),
    "swa packed cu_seqlens_k empty": (swa_packed(cu_seqlens_k=cu()), ValueError, "cu_seqlens_k"),
    "swa packed cu_seqlens_q negative entry": (swa_packed(cu_seqlens_q=cu(0, -3, 8)), ValueError, "cu_seqlens_q"),
    "swa packed cu_seqlens_k to int32 max": (swa_packed(cu_seqlens_k=cu(0, 3, INT32_MAX)), ValueError,
                                             "max_seqlen_k"),
    "swa packed only cu_seqlens_k": (swa_packed(cu_seqlens_q=None), ValueError, "cu_seqlens_q"),
    "swa packed max_seqlen_q negative": (swa_packed(max_seqlen_q=-1), ValueError, "max_seqlen_q"),
    # Used to loop over 2^34 empty query tiles (a hang) before max_seqlen was bounded by the rows.
    "swa packed max_seqlen_q 2^40": (swa_packed(max_seqlen_q=2**40), ValueError, "max_seqlen_q"),
    "swa packed max_seqlen_k past int64": (swa_packed(max_seqlen_k=-2**70), ValueError, "max_seqlen_k"),
    "swa_bwd dout on meta": (swa_bwd(dout=torch.ones_like(OUT, device="meta")), ValueError, "dout"),
    "swa_bwd dlse on meta": (swa_bwd(dlse=torch.ones_like(OUT_LSE, device="meta")), ValueError, "dlse"),
    "swa_bwd out last dim strided": (swa_bwd(out=strided_last_dim(OUT)), ValueError, "out"),
    "swa_bwd lse float64 for float32 q": (swa_bwd(lse=OUT_LSE.double()), ValueError, "lse"),
    "swa_bwd packed max_seqlen_k 2^40": (swa_bwd(q=QP, k=KP, v=VP, dout=torch.ones(8, 4, 8), out=torch.ones(8, 4, 8),
                                                 lse=torch.zeros(8, 4), cu_seqlens_q=cu(0, 3, 8),
                                                 cu_seqlens_k=cu(0, 3, 8), max_seqlen_q=5, max_seqlen_k=2**40),
                                         ValueError, "max_seqlen_k"),
    # compressed_attention
    "cmp compress_stride 0": (compressed(compress_stride=0), ValueError, "compress_stride"),
    "cmp block not a multiple of the stride": (compressed(compress_block=5), ValueError, "compress_block"),
    "cmp k_cmp head dim differs": (compressed(k_cmp=KC[..., :8]), ValueError, "k_cmp"),
    "cmp v_cmp tokens differ": (compressed(v_cmp=VC[:, :2]), ValueError, "v_cmp"),
    "cmp k_cmp on meta": (compressed(k_cmp=KC.to("meta")), ValueError, "k_cmp"),
    "cmp padded max_seqlen_k negative": (compressed(max_seqlen_k=-8), ValueError, "max_seqlen_k"),
    "cmp padded max_seqlen_k needs more tokens": (compressed(max_seqlen_k=12), ValueError, "k_cmp"),
    "cmp packed k_cmp short of tokens": (compressed(packed=True, k_cmp=KCP[:0], v_cmp=VCP[:0]), ValueError,
                                         "k_cmp"),
    "cmp packed max_seqlen_k past int32": (compressed(packed=True, max_seqlen_k=2**40), ValueError, "max_seqlen_k"),
    # select_blocks
    "select lse float64 for float32 q": (select(lse=LSE.double()), ValueError, "lse"),
    "select lse missing a head": (select(lse=LSE[..., :3]), ValueError, "lse"),
    "select lse on meta": (select(lse=LSE.to("meta")), ValueError, "lse"),
    "select q with no heads": (select(q=Q[:, :, :0], lse=LSE[..., :0]), ValueError, "q"),
    "select k_cmp heads do not divide q's": (select(k_cmp=torch.randn(2, 3, 3, 16)), ValueError, "k_cmp"),
    "select select_count 0": (select(select_count=0, init_blocks=0, local_blocks=0), ValueError, "select_count"),
    "select select_count below forced blocks": (select(select_count=1), ValueError, "select_count"),
    "select select_count past int32": (select(select_count=2**31), ValueError, "select_count"),
    "select select_count a bool": (select(select_count=True, local_blocks=0), ValueError, "select_count"),
    "select select_block a float": (select(select_block=4.5), ValueError, "select_block"),
    "select init_blocks negative": (select(init_blocks=-1), ValueError, "init_blocks"),
    "select stride does not divide select_block": (select(select_block=5), ValueError, "compress_stride"),
    "select packed max_seqlen_q 2^40": (select(packed=True, max_seqlen_q=2**40), ValueError, "max_seqlen_q"),
    # selection_attention
    "selection indices int64": (selection(indices=IDX.long()), ValueError, "indices"),
    "selection indices rank 3 in padded layout": (selection(indices=IDX[0]), ValueError, "indices"),
    "selection indices heads differ from k's": (selection(indices=IDX[:, :, :1]), ValueError, "indices"),
    "selection indices TQ differs": (selection(indices=IDX[:, :7]), ValueError, "indices"),
    "selection indices n = 0": (selection(indices=IDX[..., :0]), ValueError, "indices"),
    "selection indices on meta": (selection(indices=IDX.to("meta")), ValueError, "indices"),
    "selection select_block 0": (selection(select_block=0), ValueError, "select_block"),
    # validate_block_indices (selection_attention itself ignores such ids: test_selection_attention)
    "validate id -2": (validate(with_id(-2)), ValueError, "indices"),
    "validate id int32 max": (validate(with_id(INT32_MAX)), ValueError, "indices"),
    "validate id int32 min": (validate(with_id(INT32_MIN)), ValueError, "indices"),
    "validate duplicate id": (validate(with_id(0, slot=1)), ValueError, "indices"),
    "validate cu_seqlens_q int64": (validate(IDX[0, ..., :1], cu_seqlens_q=cu(0, 3, 8).long(),
                                             cu_seqlens_k=cu(0, 3, 8)), ValueError, "cu_seqlens_q"),
    "validate cu_seqlens_q past the rows": (validate(IDX[0, ..., :1], cu_seqlens_q=cu(0, 3, 80),
                                                     cu_seqlens_k=cu(0, 3, 8)), ValueError, "cu_seqlens_q"),
    "validate cu_seqlens_k decreasing": (validate(IDX[0, ..., :1], cu_seqlens_q=cu(0, 3, 8),
                                                  cu_seqlens_k=cu(0, 5, 3)),
                                         ValueError, "cu_seqlens_k"),
    "validate max_seqlen_k negative": (validate(max_seqlen_k=-3), ValueError, "max_seqlen_k"),
    # native_sparse_attention
    "nsa config a dict": (nsa(config={}), ValueError, "config"),
    "nsa g_cmp [B, TQ, 1] would broadcast": (nsa(g_cmp=GATES[0][..., :1]), ValueError, "g_cmp"),
    "nsa g_swa one row short": (nsa(g_swa=GATES[2][:, :7]), ValueError, "g_swa"),
    "nsa g_slc on meta": (nsa(g_slc=GATES[1].to("meta")), ValueError, "g_slc"),
    "nsa k_swa head dim differs": (nsa(k_swa=K[..., :8]), ValueError, "k_swa"),
    "nsa k_cmp rank 3 in padded layout": (nsa(k_cmp=KC[0]), ValueError, "k_cmp"),
    # native_sparse_attention_with_kvcache (the fused decoding op)
    "decode config a dict": (decode(config={}), ValueError, "config"),
    "decode cache_seqlens int64": (decode(cache_seqlens=cu(8, 5).long()), ValueError, "cache_seqlens"),
    "decode cache_seqlens past the capacity": (decode(cache_seqlens=cu(9, 5)), ValueError, "cache_seqlens"),
    "decode gates without the branch axis": (decode(gates=torch.rand(2, 1, 4)), ValueError, "gates"),
    "decode gates on meta": (decode(gates=torch.rand(2, 1, 4, 3, device="meta")), ValueError, "gates"),
    "decode k_cache on meta": (decode(k_cache=K.to("meta")), ValueError, "k_cache"),
    "decode only k_swa_cache": (decode(k_swa_cache=K), ValueError, "v_swa_cache"),
    # NSAConfig, NativeSparseAttention, RotaryEmbedding, NSACache
    "NSAConfig window a string": (lambda: NSAConfig(window="512"), ValueError, "window"),
    "NSAConfig stride does not divide select_block": (lambda: NSAConfig(select_block=40), ValueError,
                                                      "compress_stride"),
    "NSAConfig local_blocks negative": (lambda: NSAConfig(local_blocks=-1), ValueError, "local_blocks"),
    "layer num_kv_heads 0": (lambda: NativeSparseAttention(32, num_heads=4, num_kv_heads=0), ValueError,
                             "num_kv_heads"),
    "layer compression unknown": (lambda: NativeSparseAttention(32, num_heads=4, compression="max"), ValueError,
                                  "compression"),
    "layer x hidden size differs": (lambda: layer()(torch.randn(2, 8, 16)), ValueError, "x"),
    "layer packed x of rank 3": (lambda: layer()(torch.randn(2, 8, 32), cu_seqlens=cu(0, 8, 16)), ValueError, "x"),
    "layer cu_seqlens int64": (lambda: layer()(torch.randn(8, 32), cu_seqlens=cu(0, 3, 8).long()), ValueError,
                               "cu_seqlens"),
    "layer cu_seqlens past the rows": (lambda: layer()(torch.randn(8, 32), cu_seqlens=cu(0, 3, 9)), ValueError,
                                       "cu_seqlens"),
    "rotary odd dim": (lambda: nsa_ext.RotaryEmbedding(7), ValueError, "dim"),
    "cache batch_size 0": (lambda: NSACache(batch_size=0), ValueError, "batch_size"),
    "cache x batch differs from the cache's": (lambda: layer()(torch.randn(3, 8, 32), cache=NSACache(2)),
                                               ValueError, "x"),
    "cache cu_seqlens of another batch": (lambda: layer()(torch.randn(8, 32), cu_seqlens=cu(0, 3, 5, 8),
                                                          cache=NSACache(2)), ValueError, "cu_seqlens"),
    # compression: make_compression, the modules, compressed_seqlens
    "make_compression linear without heads": (lambda: nsa_ext.make_compression("linear", **CMP), ValueError,
                                              "num_heads"),
    "MLPCompression hidden_dim 0": (lambda: nsa_ext.MLPCompression(2, 16, 4, 2, hidden_dim=0), ValueError,
                                    "hidden_dim"),
    "compression cu_seqlens_k decreasing": (lambda: nsa_ext.MeanCompression(4, 2)(KP, cu(0, 6, 5)), ValueError,
                                            "cu_seqlens_k"),
    "compression cu_seqlens_k not from 0": (lambda: nsa_ext.MeanCompression(4, 2)(KP, cu(-4, 6)), ValueError,
                                            "cu_seqlens_k"),
    "compression k head dim differs from the module's": (
        lambda: nsa_ext.make_compression("linear", num_heads=2, head_dim=8, **CMP)(K), ValueError, "k"),
    "compressed_seqlens stride 0": (lambda: nsa_ext.compressed_seqlens(cu(0, 3, 8), 4, 0), ValueError,
                                    "compress_stride"),
}


def _child() -> None:
    for name, (thunk, _, _) in CASES.items():
        print(json.dumps({"case": name}), flush=True)  # the running case, should the process die
        try:
            thunk()
            result = {"case": name, "raised": None}
        except Exception as error:  # noqa: BLE001 (every type is reported, the parent judges)
            result = {"case": name, "raised": f"{type(error).__module__}.{type(error).__qualname__}",
                      "message": str(error)}
        print(json.dumps(result), flush=True)


@pytest.fixture(scope="module")
def child_results():
    """Runs the catalogue in a child process: {case: result} plus the child's exit status and output."""
    try:
        run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300)
        stdout, stderr, status = run.stdout, run.stderr, run.returncode
    except subprocess.TimeoutExpired as timeout:
        stdout, stderr, status = timeout.stdout or "", timeout.stderr or "", "timeout"
        stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
    results = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            results[entry["case"]] = entry
    return results, status, stderr


def test_catalogue_is_large_and_covers_every_public_function():
    assert len(CASES) >= 40
    text = json.dumps([name for name in CASES])
    for prefix in ("swa ", "swa_bwd", "cmp ", "select ", "selection ", "validate ", "nsa ", "decode ", "NSAConfig",
                   "layer ", "rotary", "cache ", "make_compression", "MLPCompression", "compression ",
                   "compressed_seqlens"):
        assert f'"{prefix}' in text, prefix


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input(case, child_results):
    results, status, stderr = child_results
    _, expected_type, argument = CASES[case]
    result = results.get(case)
    assert result is not None and "raised" in result, (
        f"the child process died or hung (status {status}) during or before this case:\n{stderr[-3000:]}")
    expected = f"{expected_type.__module__}.{expected_type.__qualname__}"
    assert result["raised"] == expected, f"raised {result['raised']}: {result.get('message', '')[:500]}"
    assert f"argument '{argument}'" in result["message"], result["message"][:500]


if __name__ == "__main__":
    _child()
