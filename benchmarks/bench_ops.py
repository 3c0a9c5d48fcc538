#!/usr/bin/env python
"""Op-level benchmark of fastconv's conv2d and max_pool2d against torch (and a NumPy im2col).

    python benchmarks/bench_ops.py --quick              # the core suite, short timing (< 1 min on 2 cores)
    python benchmarks/bench_ops.py --suite core         # the same rows, full timing
    python benchmarks/bench_ops.py                      # the full suite (see benchmarks/README.md)
    python benchmarks/bench_ops.py --filter 'alexnet.conv3/n8'   # only matching rows

At the start it measures the machine's fp32 peak (an FMA loop compiled at run time) and records the
CPU (vendor, family/model decoded, flags), threads and git commit. Every row is checked first
(fastconv vs torch: outputs and all gradients, and the NumPy baseline vs torch), then timed with the
peers interleaved block by block. glibc's allocator is held warm (the script re-executes itself with
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set) unless --cold is given. Results go to stdout, a
JSON file and a PNG chart of fastconv/peer time ratios; benchmarks/README.md explains the columns.
The code lives in benchmarks/fcbench/.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fcbench import machine  # noqa: E402  (imports no torch: the re-exec below must come first)

if __name__ == "__main__":
    machine.hold_allocator_warm(cold="--cold" in sys.argv[1:])
    from fcbench.ops_cli import main

    sys.exit(main())
