"""AddressSanitizer + UndefinedBehaviorSanitizer: builds the CPU kernels with -fsanitize=address,undefined
(scripts/sanitize.sh: CMake option NSA_SANITIZE, -O1, its own build folder, incremental) and runs a
chosen subset of the tests against that build in a child process: the property tests of all four
operators, the malformed-input catalogue, the numerical-stability tests and the existing tests of
layouts, edge cases and index handling. The child must pass and print no sanitizer report.

Python and torch are not instrumented, so the ASan runtime is preloaded (with libstdc++); leak
detection is off (the interpreter keeps its allocations to exit). UBSan errors abort (-fno-sanitize-recover, and
halt_on_error for the runtime). Takes ~3 minutes on 2 cores after a first build of ~4 minutes.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Chosen for coverage of the kernels' code paths (both layouts, every G, empty and length-1
# sequences, partial blocks, strided inputs, bad ids, masked rows, backward) at a few minutes' cost.
SUBSET = [
    "tests/test_properties.py",
    "tests/test_malformed.py",
    "tests/test_numerical_stability.py",
    "tests/test_sliding_window.py::test_matches_reference",
    "tests/test_sliding_window.py::test_packed_rows_outside_every_sequence_are_defined",
    "tests/test_sliding_window.py::test_non_contiguous_inputs",
    "tests/test_sliding_window.py::test_backward_op_checks_its_extra_inputs",
    "tests/test_compressed_attention.py::test_matches_reference",
    "tests/test_compressed_attention.py::test_packed_with_empty_and_short_sequences_equals_padded",
    "tests/test_compressed_attention.py::test_extra_token_rows_are_ignored_with_zero_gradient",
    "tests/test_select_blocks.py::test_matches_reference",
    "tests/test_select_blocks.py::test_nan_inputs_do_not_crash",
    "tests/test_select_blocks.py::test_packed_rows_outside_every_sequence_are_minus_one",
    "tests/test_selection_attention.py::test_matches_reference",
    "tests/test_selection_attention.py::test_large_tiles_and_long_block_lists_match_reference",
    "tests/test_selection_attention.py::test_out_of_range_ids_are_ignored",
    "tests/test_selection_attention.py::test_keys_past_the_end_of_a_partial_last_block_are_never_read",
    "tests/test_selection_attention.py::test_all_rows_empty",
    "tests/test_selection_attention.py::test_packed_rows_outside_every_sequence_are_defined",
    "tests/test_decode_attention.py::test_matches_reference_fp64",
    "tests/test_decode_attention.py::test_reads_no_cache_row_past_the_live_length",
    "tests/test_decode_attention.py::test_bad_inputs_name_the_argument",
]

REPORTS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "SUMMARY: UndefinedBehaviorSanitizer")


def _runtime(name: str):
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def sanitized_site():
    if _runtime("libasan.so") is None or _runtime("libstdc++.so") is None:
        pytest.skip("gcc has no libasan.so or libstdc++.so (install the gcc sanitizer runtimes)")
    build = subprocess.run([str(ROOT / "scripts" / "sanitize.sh")], capture_output=True, text=True,
                           env={**os.environ, "PYTHON": sys.executable}, cwd=ROOT)
    assert build.returncode == 0, build.stderr[-5000:]
    return build.stdout.strip().splitlines()[-1]


def sanitizer_env(site: str) -> dict:
    env = dict(os.environ)
    env.update(
        # libstdc++ too: Python does not link it, and ASan's C++ exception interceptor must find the
        # real __cxa_throw when it starts ("CHECK failed: ... real___cxa_throw" on torch's first throw).
        LD_PRELOAD=" ".join([_runtime("libasan.so"), os.path.realpath(_runtime("libstdc++.so"))]),
        # Leaks: Python frees little at exit. The rest are ASan's defaults, spelled out.
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        PYTHONPATH=os.pathsep.join([site, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def test_sanitized_build_is_what_the_child_imports(sanitized_site):
    code = "import nsa_ext; print(nsa_ext._C.__file__)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=sanitizer_env(sanitized_site))
    assert run.returncode == 0, run.stderr[-3000:]
    library = run.stdout.strip().splitlines()[-1]
    assert library.startswith(sanitized_site), library
    # The library is instrumented: it needs the ASan runtime and calls its checks.
    symbols = subprocess.run(["nm", "-D", "--undefined-only", library], capture_output=True, text=True).stdout
    assert "__asan_report_load" in symbols and "__ubsan_handle" in symbols


def test_sanitizer_reports_are_caught(sanitized_site):
    # Guards the checks below against vacuity: under this environment a use after free (here through
    # the memmove interceptor) aborts the child with a report that REPORTS recognises.
    code = ("import ctypes; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; "
            "p = libc.malloc(64); libc.free(ctypes.c_void_p(p)); buf = ctypes.create_string_buffer(64); "
            "ctypes.memmove(buf, p, 64)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=sanitizer_env(sanitized_site))
    assert run.returncode != 0 and "heap-use-after-free" in run.stderr, run.stderr[-3000:]
    assert any(r in run.stderr for r in REPORTS)


def test_subset_under_asan_and_ubsan(sanitized_site):
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET],
                         capture_output=True, text=True, cwd=ROOT, env=sanitizer_env(sanitized_site))
    output = run.stdout + run.stderr
    reports = [line for line in output.splitlines() if any(r in line for r in REPORTS)]
    assert not reports, "\n".join(reports[:20]) + "\n" + output[-5000:]
    assert run.returncode == 0, output[-5000:]
    assert " passed" in output.splitlines()[-1] and "failed" not in output.splitlines()[-1], output[-2000:]
