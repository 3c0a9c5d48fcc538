#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs fastconv's main job: the MNIST CNN trained on
# Fashion-MNIST with fastconv and with torch.nn side by side (a short run), then the quick
# benchmark table. Extra arguments go to the training CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m fastconv.train "$@"
python benchmarks/bench_ops.py --quick --json runs/bench_ops_quick.json --png runs/bench_ops_quick.png
