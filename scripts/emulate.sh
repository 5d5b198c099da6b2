#!/usr/bin/env bash
# Builds nsa_ext with its CUDA kernels compiled as C++ and run on the CPU under emulation (CMake option
# NSA_EMULATE_CUDA, csrc/emulation/simt.h) in its own build folder, build/emulate/cmake (ninja,
# incremental), and installs it into build/emulate/site, leaving the normal install alone. In that
# build every op takes its CUDA path with CPU tensors. Run it with the development environment's Python:
#   scripts/run.sh scripts/emulate.sh
# then run Python with that folder first on the path, as tests/test_cuda_emulated.py does:
#   NSA_TEST_EMULATED_CUDA=1 PYTHONPATH=build/emulate/site python -m pytest tests/test_cuda_dense.py
# NSA_CUDA_HEAD_DIMS picks the tiled kernels' head dims as in the normal build (default: all).
# NSA_EMULATE_SANITIZE=1 adds AddressSanitizer + UBSan (CMake option NSA_SANITIZE, in
# build/emulate-asan; run it as tests/test_sanitizers.py runs its build): the emulated kernels then read
# and write CPU tensors under ASan, which reports any access outside them. Prints the site folder on
# its last line. NSA_EMULATE_SANITIZE=thread builds the race check (CMake option NSA_SANITIZE_THREAD, in
# build/emulate-tsan; tests/test_cuda_racecheck.py runs it).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
folder="$root/build/emulate"
sanitize=OFF
sanitize_thread=OFF
strip=true  # sanitizer builds keep their symbols, for readable reports
case "${NSA_EMULATE_SANITIZE:-0}" in
  0) ;;
  1) folder="$root/build/emulate-asan"; sanitize=ON; strip=false ;;
  thread) folder="$root/build/emulate-tsan"; sanitize_thread=ON; strip=false ;;
  *) echo "NSA_EMULATE_SANITIZE: 1 (address) or thread" >&2; exit 2 ;;
esac
site="$folder/site"
NSA_ENABLE_CUDA=OFF "$python" -m pip install --quiet --no-build-isolation --no-deps --upgrade \
  --target "$site" -C build-dir="$folder/cmake" -C install.strip=$strip -C cmake.define.NSA_EMULATE_CUDA=ON \
  -C cmake.define.NSA_SANITIZE=$sanitize -C cmake.define.NSA_SANITIZE_THREAD=$sanitize_thread \
  -C cmake.define.NSA_CUDA_HEAD_DIMS="${NSA_CUDA_HEAD_DIMS:-64;128;192;256}" "$root" >&2
echo "$site"
