#!/usr/bin/env bash
# Sets up a fresh machine for fastconv: a virtual environment with torch and the build tools, the
# Fashion-MNIST data package (Debian, when apt-get is available), and the extension built in place.
# Idempotent: a second run reuses the venv and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

echo "== installing Python dependencies (requirements.txt)"
python -m pip install -q --disable-pip-version-check -r requirements.txt

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "warning: could not install dataset-fashion-mnist; pass --data-dir to the training CLI" >&2
  else
    echo "note: no Fashion-MNIST under /usr/share/datasets; training will download MNIST or use --data-dir" >&2
  fi
fi

echo "== building fastconv (pip install --no-build-isolation -e .)"
# --no-build-isolation: compile against the torch installed above, not a fresh one in an isolated env
python -m pip install -q --disable-pip-version-check --no-build-isolation -e . 2>&1 | tail -n 20
python -c "import fastconv, torch; print('fastconv', fastconv.__version__, '| torch', torch.__version__, \
'| CUDA kernels:', 'yes (CUDA %d.%d)' % fastconv.cuda_version() if fastconv.has_cuda_kernels() else 'no')"
