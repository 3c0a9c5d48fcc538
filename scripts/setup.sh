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

echo "== installing the build's Python dependencies (requirements.txt)"
python -m pip install -q --disable-pip-version-check -r requirements.txt

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "warning: could not install dataset-fashion-mnist; pass --data-dir to the training CLI" >&2
  else
    echo "note: no Fashion-MNIST under /usr/share/datasets; training will download Fashion-MNIST into ./data or use --data-dir" >&2
  fi
fi

# The build is skipped when the extension is there, imports, no source is newer than it, and the
# extras fastconv[train,test] (setup.py) are installed.
so=$(ls fastconv/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -type f | head -n 1)" ] \
   && python -c "import fastconv" >/dev/null 2>&1 && python -m pip show -q fastconv >/dev/null 2>&1 \
   && { [ "${FASTCONV_EMULATED:-1}" = 0 ] || python -c "import fastconv._C_emulated" >/dev/null 2>&1; } \
   && python -c "import tqdm, matplotlib, pytest, hypothesis, onnx, onnxscript, onnxruntime" >/dev/null 2>&1 \
   && command -v ruff >/dev/null 2>&1; then
  echo "== fastconv is built and up to date ($so)"
else
  echo "== building fastconv (pip install --no-build-isolation -e '.[train,test]'; the CUDA kernels take several minutes)"
  # --no-build-isolation: compile against the torch installed above, not a fresh one in an isolated env
  python -m pip install --disable-pip-version-check --no-build-isolation -v -e ".[train,test]" > build.log 2>&1 \
    || { tail -n 60 build.log; echo "build failed; full log in build.log" >&2; exit 1; }
  grep -A8 "^fastconv build configuration" build.log || true
fi
python -c "import fastconv, torch; print('fastconv', fastconv.__version__, '| torch', torch.__version__, \
'| CUDA kernels:', 'yes (CUDA %d.%d)' % fastconv.cuda_version() if fastconv.has_cuda_kernels() else 'no')"
