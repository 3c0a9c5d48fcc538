"""max_pool2d forward+backward on real activations vs random data of the same shape.

The op benchmarks (bench_ops.py) draw random inputs. Pooling speed depends on the data: a
branchy running max (torch's) predicts its branches well on real images with flat backgrounds and
badly on random values, while fastconv's branch-free one costs the same on both. This script
measures both on the MNIST CNN's post-ReLU activations of a real Fashion-MNIST batch (from the
Debian package, or --data-dir) and on random ReLU'd data of the same shape.

    python benchmarks/bench_real_vs_random.py [--data-dir DIR] [--threads N] [--cold]

Timed with fcbench's interleaved loop, glibc's allocator held warm unless --cold (as bench_ops.py).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fcbench import machine  # noqa: E402  (imports no torch: the re-exec in __main__ must come first)

if __name__ == "__main__":
    machine.hold_allocator_warm(cold="--cold" in sys.argv[1:])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastconv  # noqa: E402
from fastconv.data import load_split, normalize  # noqa: E402
from fastconv.models import build_model  # noqa: E402

from fcbench import timing  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--cold", action="store_true", help="glibc's default allocator settings")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split = load_split("fashion-mnist", True, data_dir=args.data_dir)
    x = normalize(split.images[: args.batch], "fashion-mnist")
    torch.manual_seed(0)
    model = build_model("mnist_cnn", impl="torch")
    with torch.no_grad():
        act1 = torch.relu(model.layer1[0](x))
        act2 = torch.relu(model.layer2[0](F.max_pool2d(act1, 2)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU {machine.cpu_label(machine.cpu_info())}; "
          f"allocator {machine.allocator_info()['mode']}; max_pool2d 2x2 fwd+bwd, median of interleaved blocks")
    clock = timing.make_clock("wall", False, torch.get_num_threads())
    print(f"{'input':<28} {'fastconv':>10} {'torch':>10} {'fc/torch':>9}")
    for name, real in (("pool1 " + str(tuple(act1.shape)), act1), ("pool2 " + str(tuple(act2.shape)), act2)):
        for kind, inp in (("real", real), ("random", torch.relu(torch.randn_like(real)))):
            xi = inp.clone().requires_grad_()
            go = torch.randn(F.max_pool2d(inp, 2).shape)
            fns = {impl: (lambda pool=pool, xi=xi, go=go: torch.autograd.grad(pool(xi, 2), xi, go))
                   for impl, pool in (("fastconv", fastconv.functional.max_pool2d), ("torch", F.max_pool2d))}
            timed = timing.interleaved(fns, args.min_run_time, clock)
            for impl, c in timed.items():
                if c.error:
                    raise SystemExit(f"{impl} failed on {name} {kind}: {c.error}")
            times = {impl: timing.stats(c)["median"] for impl, c in timed.items()}
            ga = torch.autograd.grad(fastconv.functional.max_pool2d(xi, 2), xi, go)[0]
            gb = torch.autograd.grad(F.max_pool2d(xi, 2), xi, go)[0]
            assert torch.equal(ga, gb), "gradients differ"
            print(f"{name + ' ' + kind:<28} {times['fastconv'] * 1e3:8.2f} ms {times['torch'] * 1e3:7.2f} ms "
                  f"{times['fastconv'] / times['torch']:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
