"""Times conv2d passes in a fresh process and in one whose heap first held a freed int64 tensor.

    python benchmarks/bench_recycled_memory.py                 # a few layers, every pass
    python benchmarks/bench_recycled_memory.py --layers alexnet.conv3/n1

Why: fastconv's scratch buffers are recycled heap memory. Freed int64 tensors (max-pool indices are
small integers) read as float denormals, and the junk lanes of partial vectors go through the FMAs
like the others, each denormal a microcode assist: before the scratch was zeroed on allocation,
AlexNet conv3's forward at batch 1 took ~19x its time after such a tensor had been freed. Each
(layer, pass, heap) runs in its own process (the allocator's history is the variable); the ratio
"polluted/clean" should be ~1. The allocator is held warm as in bench_ops.py.
"""

import argparse
import json
import os
import subprocess
import sys

LAYERS = {
    "alexnet.conv3/n1": ((1, 192, 13, 13), (384, 192, 3, 3), 1, 1),
    "alexnet.conv3/n8": ((8, 192, 13, 13), (384, 192, 3, 3), 1, 1),
    "mnist_cnn.conv2/n100": ((100, 32, 14, 14), (64, 32, 3, 3), 1, 1),
    "resnet18.layer2.0.conv1/n8": ((8, 64, 56, 56), (128, 64, 3, 3), 2, 1),
    "resnet18.conv1/n4": ((4, 3, 224, 224), (64, 3, 7, 7), 2, 3),
    "lenet.conv2/n100": ((100, 6, 12, 12), (16, 6, 5, 5), 1, 0),
}

CHILD = r"""
import json, sys, time, torch, fastconv
xs, ws, s, pd, ps, pollute, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
if pollute:
    t = torch.arange(40_000_000, dtype=torch.int64) % 97  # 320 MB of small ints, then freed
    del t
torch.manual_seed(0)
x, w, b = torch.randn(xs), torch.randn(ws), torch.randn(ws[0])
y = torch.ops.fastconv.conv2d(x, w, b, [s, s], [pd, pd], [1, 1], 1)
g = torch.randn_like(y)
if ps == "fwd":
    f = lambda: torch.ops.fastconv.conv2d(x, w, b, [s, s], [pd, pd], [1, 1], 1)
else:
    m = [ps == "bwd-input", ps == "bwd-weight", False]
    f = lambda: torch.ops.fastconv._conv2d_backward(g, x, w, [s, s], [pd, pd], [1, 1], 1, m)
for _ in range(3):
    f()
ts = []
for _ in range(15):
    t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
print(json.dumps(sorted(ts)[len(ts) // 2]))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated, of: " + ", ".join(LAYERS))
    ap.add_argument("--passes", default="fwd,bwd-input,bwd-weight")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="68719476736")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    print(f"{'layer':28s} {'pass':11s} {'clean':>10s} {'polluted':>10s} {'ratio':>6s}")
    for name in args.layers.split(","):
        xs, ws, s, pd = LAYERS[name]
        for ps in args.passes.split(","):
            t = []
            for pollute in (False, True):
                spec = json.dumps([xs, ws, s, pd, ps, pollute, args.threads])
                out = subprocess.run([sys.executable, "-c", CHILD, spec], env=env, capture_output=True, text=True,
                                     check=True)
                t.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{name:28s} {ps:11s} {t[0] * 1e3:8.3f}ms {t[1] * 1e3:8.3f}ms {t[1] / t[0]:6.2f}", flush=True)


if __name__ == "__main__":
    main()
