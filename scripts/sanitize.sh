#!/usr/bin/env bash
# Builds nsa_ext with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option NSA_SANITIZE: CPU
# sources only, -O1, no CUDA) in its own build folder, build/sanitize/cmake (ninja, incremental), and
# installs it into build/sanitize/site, leaving the normal install alone. Run it with the development
# environment's Python:
#   scripts/run.sh scripts/sanitize.sh
# then run Python with that folder first on the path and the sanitizer runtime preloaded (Python itself
# is not instrumented; libstdc++ with it, see tests/test_sanitizers.py), as that test does:
#   LD_PRELOAD="$(gcc -print-file-name=libasan.so) libstdc++.so.6" ASAN_OPTIONS=detect_leaks=0 \
#   PYTHONPATH=build/sanitize/site python -m pytest tests/test_sliding_window.py
# Prints the site folder on its last line.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
site="$root/build/sanitize/site"
NSA_ENABLE_CUDA=OFF "$python" -m pip install --quiet --no-build-isolation --no-deps --upgrade \
  --target "$site" -C build-dir="$root/build/sanitize/cmake" -C install.strip=false -C cmake.define.NSA_SANITIZE=ON \
  "$root" >&2
echo "$site"
