"""Out-of-bounds check of the CUDA kernels without a GPU (compute-sanitizer memcheck's job): the CUDA
emulator built with AddressSanitizer + UBSan (`NSA_EMULATE_SANITIZE=1 scripts/emulate.sh`, build/emulate-asan,
head dims 64 and 128) runs the emulated kernels on CPU tensors, so a kernel that reads or writes past a
tensor (a bad index, a missing bound on a tile's last rows, a wrong partial-buffer offset) is reported.
A child runs every kernel once and the tests that stress bounds: bad / duplicate / future ids, partial
last blocks, TQ < TK, packed batches with empty and length-1 sequences, the forward and dq by blocks in
chunks, rows past the live cache length, malformed device offsets. It must pass and print no sanitizer
report (a partial-buffer offset one row too far in the forward by blocks is reported as a
heap-buffer-overflow in store_rows; unbounded cu_seqlens, as a heap report in the dense forward).
About 6 minutes on 2 cores, build included."""

import subprocess
import sys
from pathlib import Path

import pytest

from test_cuda_emulated import build_emulation
from test_sanitizers import REPORTS, _runtime, sanitizer_env
from utils import EMULATED_CUDA

ROOT = Path(__file__).resolve().parent.parent

SUBSET = [
    "tests/test_cuda_racecheck.py::test_every_kernel_once",
    "tests/test_cuda_selection.py::test_bad_ids_are_ignored",
    "tests/test_cuda_selection.py::test_rows_that_see_nothing",
    "tests/test_cuda_selection.py::test_by_blocks_matches_reference",
    "tests/test_cuda_selection.py::test_by_blocks_bad_ids_and_tq_below_tk",
    "tests/test_cuda_selection.py::test_select_blocks_and_tq_below_tk",
    "tests/test_cuda_selection.py::test_tiled_matches_reference",
    "tests/test_cuda_dense.py::test_window_tile_boundaries",
    "tests/test_cuda_dense.py::test_rows_that_see_nothing",
    "tests/test_cuda_dense.py::test_window_matches_reference",
    "tests/test_cuda_select_blocks.py::test_tiled_matches_reference",
    "tests/test_decode_attention.py::test_reads_no_cache_row_past_the_live_length",
    "tests/test_decode_attention.py::test_cuda_many_splits_match_reference",
    "tests/test_cuda_device_seqlens.py",
    # Head dims this build compiles (64 and 128 tiled kernels; the rest run the baseline kernels).
    "-k", "not 256 and not 192 and not bitwise",
]


@pytest.fixture(scope="module")
def memcheck_site():
    if EMULATED_CUDA:
        pytest.skip("runs its own child")
    if _runtime("libasan.so") is None or _runtime("libstdc++.so") is None:
        pytest.skip("gcc has no libasan.so or libstdc++.so (install the gcc sanitizer runtimes)")
    return build_emulation(NSA_EMULATE_SANITIZE="1", NSA_CUDA_HEAD_DIMS="64;128")


def test_emulated_kernels_are_instrumented(memcheck_site):
    # Guards the run below against vacuity: the module that runs the emulated kernels calls ASan's
    # checks (test_sanitizers shows that this environment turns a report into a failure).
    library = next(Path(memcheck_site, "nsa_ext").glob("_C*.so"))
    symbols = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True).stdout
    assert "__asan_report_load" in symbols and "__ubsan_handle" in symbols
    code = "import nsa_ext; info = nsa_ext.build_info(); assert info['emulated_cuda'], info; print(nsa_ext._C.__file__)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=sanitizer_env(memcheck_site))
    assert run.returncode == 0 and run.stdout.strip() == str(library), run.stdout + run.stderr[-3000:]


def test_kernels_stay_in_bounds(memcheck_site):
    # halt_on_error without abort_on_error: an abort inside an emulated thread's fiber loses the report.
    env = dict(sanitizer_env(memcheck_site), NSA_TEST_EMULATED_CUDA="1", ASAN_OPTIONS="detect_leaks=0:halt_on_error=1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    output = run.stdout + run.stderr
    reports = [line for line in output.splitlines() if any(r in line for r in REPORTS)]
    assert not reports, "\n".join(reports[:20]) + "\n" + output[-5000:]
    assert run.returncode == 0, output[-5000:]
    assert " passed" in output.splitlines()[-1] and "failed" not in output.splitlines()[-1], output[-2000:]
