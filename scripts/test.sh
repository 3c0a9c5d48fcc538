#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), lints the Python (ruff, configured in pyproject.toml), checks
# the C++/CUDA layout (clang-format, configured in .clang-format) and
# runs the whole test suite, then the emulated CUDA tests again over an ASan + UBSan build of the
# emulated backend (scripts/test_emulated_asan.sh, a few minutes; FASTCONV_ASAN=0 skips it). Extra
# arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
echo "== ruff check"
ruff check .
echo "== clang-format --dry-run --Werror csrc/"
clang-format --dry-run --Werror csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/* csrc/emulated/*
python -m pytest -q tests "$@"
if [ "${FASTCONV_ASAN:-1}" != 0 ]; then
  bash scripts/test_emulated_asan.sh
fi
