#!/usr/bin/env bash
# For a machine with an NVIDIA GPU: everything that CI (no GPU) cannot check, in one run.
#  1. builds fastconv with the CUDA kernels (FASTCONV_FORCE_CUDA=1; TORCH_CUDA_ARCH_LIST as setup.py
#     defaults, or set it for your GPU),
#  2. runs the CUDA tests, large ones included (FASTCONV_RUN_LARGE=1; ~32 GiB of GPU memory),
#  3. runs compute-sanitizer memcheck and racecheck over conv2d and max_pool2d forward and backward
#     (scripts/gpu_check.py, which also checks the results against torch),
#  4. runs the GPU benchmarks (benchmarks/bench_ops.py and bench_train.py with --device cuda),
# and writes one results file, benchmarks/results/gpu_check-<gpu>-<date>-<commit>.json (GPU, driver,
# torch, CUDA, commit, and each step's command, exit status, seconds and output tail), plus the
# benchmarks' own JSON files beside it. Steps go on after a failure; the exit status is 1 if any failed.
# Usage: bash scripts/gpu_check.sh [--quick]   (--quick: quick benchmark suites)
set -uo pipefail
cd "$(dirname "$0")/.."
quick=""
[ "${1:-}" = "--quick" ] && quick="--quick"
command -v nvidia-smi >/dev/null 2>&1 || { echo "gpu_check: no nvidia-smi; this script needs an NVIDIA GPU" >&2; exit 2; }
export FASTCONV_FORCE_CUDA=1
bash scripts/setup.sh || { echo "gpu_check: the build failed" >&2; exit 1; }
# shellcheck disable=SC1091
. .venv/bin/activate
python -c "import torch, fastconv, sys; sys.exit(0 if torch.cuda.is_available() and fastconv.has_cuda_kernels() else 1)" \
  || { echo "gpu_check: torch sees no GPU, or fastconv was built without CUDA kernels" >&2; exit 1; }

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
slug=$(echo "$gpu" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
stamp=$(date -u +%Y%m%d)
res=benchmarks/results
mkdir -p "$res" build/gpu_check
tag="$slug-$stamp-$commit"
sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")

steps=()
failed=0
run_step() {  # name, command...
  local name=$1; shift
  local log="build/gpu_check/$name.log" t0 rc
  echo "== $name: $*"
  t0=$(date +%s)
  "$@" > "$log" 2>&1; rc=$?
  tail -n 5 "$log"
  [ "$rc" = 0 ] || failed=1
  steps+=("$name|$rc|$(( $(date +%s) - t0 ))|$*")
}

run_step cuda_tests env FASTCONV_RUN_LARGE=1 python -m pytest -q -m "cuda or large" tests
run_step memcheck "$sanitizer" --tool memcheck --error-exitcode 1 --leak-check no python scripts/gpu_check.py
run_step racecheck "$sanitizer" --tool racecheck --error-exitcode 1 python scripts/gpu_check.py
run_step bench_ops python benchmarks/bench_ops.py --device cuda $quick --json "$res/bench_ops-$tag.json"
run_step bench_train python benchmarks/bench_train.py --device cuda $quick --json "$res/bench_train-$tag.json"

out="$res/gpu_check-$tag.json"
printf '%s\n' "${steps[@]}" | GPU="$gpu" COMMIT="$commit" python - "$out" <<'PY'
import json, os, platform, subprocess, sys
import torch
def q(field):
    return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip().splitlines()[0]
steps = []
for line in sys.stdin.read().splitlines():
    name, rc, secs, cmd = line.split("|", 3)
    with open(f"build/gpu_check/{name}.log", errors="replace") as f:
        tail = f.read()[-4000:]
    steps.append({"step": name, "command": cmd, "exit_status": int(rc), "seconds": int(secs), "output_tail": tail})
doc = {"gpu": os.environ["GPU"], "driver": q("driver_version"), "memory": q("memory.total"),
       "torch": torch.__version__, "torch_cuda": torch.version.cuda, "commit": os.environ["COMMIT"],
       "host": platform.node(), "steps": steps, "passed": all(s["exit_status"] == 0 for s in steps)}
with open(sys.argv[1], "w") as f:
    json.dump(doc, f, indent=1)
print(f"gpu_check: {'all steps passed' if doc['passed'] else 'FAILED: ' + ', '.join(s['step'] for s in steps if s['exit_status'])}"
      f"; results in {sys.argv[1]}")
PY
exit $failed
