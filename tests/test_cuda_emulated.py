"""The CUDA kernels run on the CPU: scripts/emulate.sh builds the extension with the CUDA sources
compiled as C++ against csrc/emulation/simt.h (every op then takes its CUDA path with CPU tensors), and
a child process runs the CUDA tests against that build (NSA_TEST_EMULATED_CUDA=1: tests/utils.GPU is
"cpu"). The emulator checks warp collectives, barriers, shared-memory addresses, launch shapes and
wgmma's asynchronous rules (fences, waits) and poisons shared memory and in-flight accumulators, so
these tests find wrong fragment layouts, missing barriers, fences or waits and bad index math where
no GPU is. All tiled head dims are built, as in the normal build. The child takes
~7 minutes on 2 cores, the first build ~6 minutes (incremental afterwards).

The tests at the bottom run inside that child only."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nsa_ext

from test_cuda_selection import batch_and_indices
from test_decode_attention import fused, make_cache
from utils import EMULATED_CUDA, GPU

ROOT = Path(__file__).resolve().parent.parent
CONFIG = nsa_ext.NSAConfig(compress_block=16, compress_stride=8, select_block=32, select_count=4, init_blocks=1,
                           local_blocks=1, window=40)

# Every CUDA test that needs no real device, but the bitwise-determinism reruns: emulated threads run
# in a fixed order, so reruns agree by construction (test_results_do_not_depend_on_thread_order below
# is the emulator's race check), and those tests' large problems would take most of the time.
CHILD_TESTS = [
    "tests/test_cuda_emulated.py",
    "tests/test_cuda_dense.py",
    "tests/test_cuda_selection.py",
    "tests/test_cuda_select_blocks.py",
    "tests/test_decode_attention.py",
    "tests/test_cuda_long_offsets.py",
    "tests/test_cuda_device_seqlens.py",
    "-k", "not test_bitwise_deterministic",
]


def build_emulation(**env) -> str:
    """Runs scripts/emulate.sh with `env` added (NSA_EMULATE_SANITIZE, NSA_CUDA_HEAD_DIMS) and returns
    the site folder it installed the emulation build into."""
    build = subprocess.run([str(ROOT / "scripts" / "emulate.sh")], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHON": sys.executable, **env})
    assert build.returncode == 0, build.stderr[-5000:]
    return build.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def emulated_site():
    return build_emulation()


@pytest.mark.skipif(EMULATED_CUDA, reason="runs the child")
def test_cuda_tests_pass_under_emulation(emulated_site):
    env = dict(os.environ, NSA_TEST_EMULATED_CUDA="1",
               PYTHONPATH=os.pathsep.join([emulated_site, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CHILD_TESTS],
                           capture_output=True, text=True, env=env, cwd=ROOT)
    assert child.returncode == 0, child.stdout[-8000:] + child.stderr[-3000:]
    assert " passed" in child.stdout


# --- inside the child -------------------------------------------------------------------------------

child_only = pytest.mark.skipif(not EMULATED_CUDA, reason="runs in the child of test_cuda_tests_pass_under_emulation")


@child_only
def test_emulation_build_is_loaded():
    info = nsa_ext.build_info()
    assert info["emulated_cuda"] and info["cuda_kernels"], "emulation build is loaded: " + str(info)
    assert nsa_ext.__file__.startswith(str(ROOT / "build" / "emulate"))


def _layer_and_decoding(dtype, head_dim):
    """Every kernel once: the NSA layer forward and backward (compressed, select_blocks, selection and
    window attention), one decoding step over a ragged cache, and selection's forward and dq by blocks."""
    torch.manual_seed(0)
    layer = nsa_ext.NativeSparseAttention(256, num_heads=8, num_kv_heads=2, head_dim=head_dim, config=CONFIG)
    layer = layer.to(dtype)
    x = torch.randn(2, 100, 256, dtype=dtype, requires_grad=True)
    out = layer(x)
    grads = torch.autograd.grad(out.float().square().sum(), [x, *layer.parameters()])
    c = make_cache([3, 40, 131], 2, 8, 2, head_dim, head_dim, CONFIG, own_window=True, dtype=dtype, seed=1)
    decoded, indices = fused(c, CONFIG)
    # Random ids leave key rows whose dk / dv see no query; Dk = 24 and Dv = 40 are no multiples of 32
    # (the baseline kernels' lanes): a missing barrier there once gave dv elements another lane zeroed.
    gen = torch.Generator().manual_seed(3)
    b, idx = batch_and_indices([0, 1, 70, 33], [0, 1, 90, 33], 8, 2, 24, 40, 16, 5, True, gen)
    b = b.to(dtype, GPU, requires_grad=True)
    selected, _ = nsa_ext.selection_attention(b.q, b.k, b.v, idx, select_block=16, **b.seqlens)
    selected_grads = torch.autograd.grad(selected.float().square().sum(), (b.q, b.k, b.v))
    # The forward and dq by blocks, in three chunks of index rows (tiled dtypes only; the baseline
    # ignores it).
    b, idx = batch_and_indices([0, 1, 70, 33], [0, 1, 90, 33], 8, 2, head_dim, head_dim, 16, 5, True, gen)
    b = b.to(dtype, GPU, requires_grad=True)
    budget = 40 * 8 * 5 * (head_dim + 1) * 4  # 40 rows of Hq = 8, n = 5
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NSA_SELECTION_SCHEDULE", "blocks")
        env.setenv("NSA_SELECTION_PARTIAL_BYTES", str(budget))
        by_blocks = nsa_ext.selection_attention(b.q, b.k, b.v, idx, select_block=16, **b.seqlens)
        by_blocks_grads = torch.autograd.grad(by_blocks[0].float().square().sum(), (b.q, b.k, b.v))
    return [out, *grads, decoded, indices, selected, *selected_grads, *by_blocks, *by_blocks_grads]


@child_only
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.float32, 48)], ids=["tiled", "baseline"])
def test_results_do_not_depend_on_thread_order(dtype, head_dim, monkeypatch):
    # Descending block and thread order: a read that a barrier should order after another thread's
    # write (or before its overwrite) sees the other value, and the results change. Head dim 48 is
    # not a multiple of the baseline kernels' 32 lanes.
    forward = _layer_and_decoding(dtype, head_dim)
    monkeypatch.setenv("NSA_EMULATE_ORDER", "reverse")
    for a, c in zip(_layer_and_decoding(dtype, head_dim), forward, strict=True):
        assert torch.equal(a, c) and not a.isnan().any()


# Each rule-breaking kernel of csrc/emulation/selftest.cpp and what the emulator must say about it.
SELFTEST = {
    "clean": None,  # follows every rule
    "divergent_collective": r"divergent warp: this lane calls (__ballot_sync|__shfl_xor_sync) with mask 0xffffffff "
                            r"while lanes 0x(ffff|ffff0000) wait in (__shfl_xor_sync|__ballot_sync)",
    "lane_outside_mask": r"__shfl_xor_sync: lane (1[6-9]|2\d|3[01]) is not in its mask",
    "lane_skips_collective": r"deadlock: 31 threads left, 0 of them at __syncthreads; warp 0: lanes 0x7fffffff "
                             r"of mask 0xffffffff in __syncwarp",
    "barrier_call_sites": r"__syncthreads at .*selftest\.cpp:(\d+) while 32 threads wait at the one at "
                          r".*selftest\.cpp:(?!\1)\d+",
    "barrier_deadlock": r"deadlock: 32 threads left, 1 of them at __syncthreads; warp 0: lanes 0xfffffffe "
                        r"of mask 0xffffffff in __syncwarp",
    "ldmatrix_out_of_range": r"ldmatrix: address outside the block's dynamic shared memory",
    "ldmatrix_misaligned": r"ldmatrix.trans: shared address not 16-byte aligned",
    "cp_async_misaligned_global": r"cp.async: global address not 16-byte aligned",
    "smem_read_before_write": r"read -?nan\b",
    "cp_async_read_before_wait": r"before the wait -?nan, after 1\b",
    "block_too_large": r"invalid block \(1025, 1, 1\)",
    "grid_too_large": r"invalid grid \(1, 65536, 1\)",
    "smem_too_large": r"232449 bytes of dynamic shared memory, more than a block may have",
    # Races: no emulator error (test_cuda_racecheck.py sees each reported), and __syncwarp ordering.
    "race_shared_store": None,
    "race_cp_async_ldmatrix": None,
    "race_between_blocks": None,
    "syncwarp_orders": None,
    # wgmma's asynchrony (the Hopper kernels' products).
    "wgmma_clean": None,
    "wgmma_without_fence": r"wgmma.mma_async without a wgmma.fence since the thread started or last waited",
    "wgmma_unfenced_cp_async": r"wgmma reads shared memory \(byte \d+\) that thread \d+ wrote by cp.async "
                               r"without a fence.proxy.async since",
    "wgmma_read_before_wait": r"before the wait -?nan, after 16\b",
    "wgmma_accumulator_written": r"wgmma: accumulator registers written while the wgmma was in flight",
    "wgmma_a_registers_changed": r"wgmma: A registers changed while the wgmma was in flight",
    "wgmma_shared_changed": r"wgmma: shared memory at byte 2048 changed while a wgmma read it",
    "wgmma_warpgroup_mismatch": r"warp 3 issued 0 wgmma, warp 0 of its warpgroup 1 \(a warpgroup's warps must "
                                r"issue the same ones\)",
    "wgmma_in_flight_at_exit": r"thread ended with a wgmma in flight",
}


@child_only
def test_selftest_covers_every_case():
    assert sorted(nsa_ext._C._emulation_selftest_cases()) == sorted(SELFTEST)


@child_only
@pytest.mark.parametrize("case", sorted(SELFTEST))
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_emulator_checks_fire(case, order, monkeypatch):
    # A check that never fires cannot be told from a kernel that keeps the rule: each rule is broken
    # once here, and the launch must fail with the emulator's message (the clean kernel must pass).
    if order == "reverse":
        monkeypatch.setenv("NSA_EMULATE_ORDER", "reverse")
    message = nsa_ext._C._emulation_selftest(case)
    if SELFTEST[case] is None:
        assert message == ""
    else:
        assert re.search(SELFTEST[case], message), message


@child_only
def test_bench_reports_tensor_core_use():
    # The tensor-core kernels issue at least the FLOPs the masks require (use <= 1), and some (> 0).
    from nsa_ext import bench
    case = bench.Case(200, 8, 2, 64, 64, torch.bfloat16, "cpu", CONFIG)
    rows = bench.run_benchmarks([case], ["window", "compressed", "selection"], ["fwd", "fwd+bwd"], [], 0, 1, 1)
    assert len(rows) == 6
    for r in rows:
        assert r.mma_use is not None and 0.05 < r.mma_use <= 1, (r.op, r.mode, r.mma_use)
    assert "mma use" in bench.format_table(rows, [])
