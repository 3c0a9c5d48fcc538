#!/usr/bin/env bash
# The emulated CUDA backend (csrc/cuda/*.cu compiled for the CPU, torch.ops.fastconv_emulated) built
# with AddressSanitizer + UndefinedBehaviorSanitizer, and the emulated tests run over it: an
# out-of-bounds read or write, or undefined behaviour (signed overflow, a division by zero, a bad
# shift) in any CUDA kernel fails the run. Needs scripts/setup.sh first (scripts/test.sh runs both).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
out=build/emulated-asan
mkdir -p build
echo "== building the emulated CUDA backend with ASan + UBSan ($out)"
FASTCONV_EMULATED_SANITIZE=1 python setup.py -q build_ext --build-lib "$out/lib" --build-temp "$out/tmp" \
  > "$out.log" 2>&1 || { tail -n 40 "$out.log"; echo "ASan build failed; full log in $out.log" >&2; exit 1; }
lib=$(ls "$out"/lib/fastconv/_C_emulated*.so)
preload="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libubsan.so)"
echo "== emulated CUDA tests under ASan + UBSan ($lib)"
# detect_leaks=0: CPython and torch keep allocations until exit by design, which is not a kernel bug.
LD_PRELOAD="$preload" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:alloc_dealloc_mismatch=0" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
FASTCONV_EMULATED_LIB="$PWD/$lib" FASTCONV_REQUIRE_EMULATED=1 \
  python -m pytest -q -p no:cacheprovider -m emulated_cuda tests/test_cuda.py tests/test_emulated_cuda.py "$@"
