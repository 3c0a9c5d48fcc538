"""fastconv's benchmark harness, shared by benchmarks/bench_ops.py and benchmarks/bench_train.py.

    machine   the CPU (vendor, family/model decoded to a microarchitecture, flags), the warm allocator,
              the measured fp32 peak, thread control, git commit, how busy the machine is
    cases     the op-benchmark rows: suites (core, full), layers, passes, FLOPs and bytes
    peers     the implementations compared: fastconv, torch (and variants), the NumPy im2col baseline;
              the correctness check and the timed statements
    timing    the interleaved timing loop (blocks of calls, peers alternating block by block)
    report    tables, per-pass summaries, geometric means, the JSON and the chart
    ops_cli   bench_ops.py's command line
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_DIR = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
if ROOT not in sys.path:
    sys.path.append(ROOT)  # an in-place build (setup.py build_ext --inplace / pip install -e .) of fastconv
