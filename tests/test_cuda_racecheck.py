"""Race check of the CUDA kernels where no GPU is: ThreadSanitizer over the CUDA emulator (CMake option
NSA_SANITIZE_THREAD; `NSA_EMULATE_SANITIZE=thread scripts/emulate.sh` builds it in build/emulate-tsan).

Every emulated GPU thread is a TSan fiber, and switching between fibers orders nothing. The only
orderings the emulator tells TSan about are the GPU's: __syncthreads, __syncwarp, and a launch's end
for the host; blocks are not ordered at all (each starts with fresh shared memory and stacks). The
emulator also announces the accesses it makes for a thread: a cp.async writes its 16 bytes from issue
to wait, an ldmatrix reads each lane's row, a wgmma reads its operands from issue to wait. Any access
of shared or global memory that nothing orders against another thread's write is then reported,
whichever order the emulator happened to run the threads in: compute-sanitizer's racecheck, plus
global memory and races between blocks (those within a few thousand threads of each other in the
emulator's order).

Shuffles order no memory (the CUDA guide says so of every *_sync intrinsic but __syncwarp): a lane
that writes what other lanes read before a shuffle needs a __syncwarp first. Removing the forward's
end-of-tile barrier is reported (a cp.async into a stage another warp's ldmatrix may still read).

Built with head dims 64 and 128 (128/128 has the wgmma forward's three-stage pipeline); the first
build takes ~4 minutes, the children ~3 minutes. Python and torch are not instrumented: the TSan
runtime is preloaded, and the CPU kernels (OpenMP) are not instrumented either."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cuda_emulated import _layer_and_decoding, build_emulation
from test_sanitizers import _runtime
from utils import EMULATED_CUDA

ROOT = Path(__file__).resolve().parent.parent
REPORT = "WARNING: ThreadSanitizer:"

# Self-test kernels (csrc/emulation/selftest.cpp) with a race, and clean ones that must stay silent.
RACY = ["race_shared_store", "race_cp_async_ldmatrix", "race_between_blocks"]
CLEAN = ["clean", "syncwarp_orders", "wgmma_clean"]

# The kernels: every one of them once (below: the layer forward and backward, decoding, selection
# with unchosen key rows and its forward and dq by blocks; tiled bf16 and the fp32 baseline), and the Hopper
# path (forward and dq on wgmma; at 128/128 the three-stage forward).
KERNEL_TESTS = [
    "tests/test_cuda_racecheck.py::test_every_kernel_once",
    "tests/test_cuda_dense.py::test_wgmma_forward_matches_reference[128-128]",
]


@pytest.fixture(scope="module")
def racecheck_env():
    if EMULATED_CUDA:
        pytest.skip("runs its own child")
    runtime = _runtime("libtsan.so")
    if runtime is None:
        pytest.skip("gcc has no libtsan.so (install the gcc sanitizer runtimes)")
    site = build_emulation(NSA_EMULATE_SANITIZE="thread", NSA_CUDA_HEAD_DIMS="64;128")
    return dict(os.environ, LD_PRELOAD=runtime, NSA_TEST_EMULATED_CUDA="1", OMP_NUM_THREADS="1",
                # Every report, even of an address or stack already reported (the self-tests reuse both).
                TSAN_OPTIONS="exitcode=0 suppress_equal_addresses=0 suppress_equal_stacks=0 allow_addr2line=1",
                PYTHONPATH=os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


def test_race_check_reports_each_race_and_nothing_else(racecheck_env):
    # A checker that reports nothing cannot be told from race-free kernels: each racy self-test must be
    # reported, and the clean ones (barriers, __syncwarp, cp.async + wgmma with their waits) must not.
    script = ("import sys, nsa_ext\n"
              "for name in sys.argv[1:]:\n"
              "    print('@@ ' + name, file=sys.stderr, flush=True)\n"
              "    assert nsa_ext._C._emulation_selftest(name) == '', name\n")
    child = subprocess.run([sys.executable, "-c", script, *RACY, *CLEAN], capture_output=True, text=True,
                           env=racecheck_env, cwd=ROOT)
    assert child.returncode == 0, child.stderr[-5000:]
    reports = {m.group(1): m.group(2).count(REPORT)
               for m in re.finditer(r"^@@ (\w+)\n(.*?)(?=^@@ |\Z)", child.stderr, re.S | re.M)}
    assert reports == {**{name: reports.get(name, 0) for name in RACY}, **{name: 0 for name in CLEAN}}, reports
    assert all(reports[name] >= 1 for name in RACY), reports


def test_kernels_have_no_races(racecheck_env):
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS],
                           capture_output=True, text=True, env=racecheck_env, cwd=ROOT)
    assert child.returncode == 0, child.stdout[-5000:] + child.stderr[-3000:]
    assert " passed" in child.stdout
    output = child.stdout + child.stderr
    first = output.find(REPORT)
    assert first < 0, f"{output.count(REPORT)} race reports; the first:\n" + output[first:first + 6000]


@pytest.mark.skipif(not EMULATED_CUDA, reason="runs in the child of test_kernels_have_no_races")
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.float32, 48)], ids=["tiled", "baseline"])
def test_every_kernel_once(dtype, head_dim):
    for result in _layer_and_decoding(dtype, head_dim):
        assert not result.isnan().any()
