#!/usr/bin/env bash
# Runs a command inside nsa_ext's development environment, creating it first when needed:
#   scripts/run.sh python -m nsa_ext.bench
#   scripts/run.sh python -m pytest tests -q
# The virtual environment lives outside the checkout, keyed by the pins in requirements-dev.txt and
# the Python version, so reruns and other checkouts reuse it instead of reinstalling ~5 GB of torch.
# NSA_VENV overrides its location; NSA_ENABLE_CUDA=OFF forces a CPU-only build; TORCH_CUDA_ARCH_LIST
# picks the GPU architectures (default "8.0+PTX;9.0a").
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
pins=$(cat "$root/requirements-dev.txt"; "$python" -c 'import sys; print(sys.version)')
key=$(printf '%s' "$pins" | sha256sum | cut -c1-12)
venv=${NSA_VENV:-$HOME/.cache/nsa_ext/venv-$key}

if [ ! -f "$venv/.complete" ]; then
  echo "scripts/run.sh: creating $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet -r "$root/requirements-dev.txt"
  touch "$venv/.complete"
fi

# (Re)build and install the package from this checkout; ninja rebuilds only what changed.
echo "scripts/run.sh: building nsa_ext in $root" >&2
(cd "$root" && "$venv/bin/pip" install --quiet --no-build-isolation --no-deps .)

cd "$root"
export PATH="$venv/bin:$PATH"
exec "$@"
