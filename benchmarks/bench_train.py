#!/usr/bin/env python
"""One training step (forward, cross-entropy, backward, Adam) of the seed models, fastconv vs torch.nn.

    python benchmarks/bench_train.py --quick     # short timing
    python benchmarks/bench_train.py             # MNIST CNN at batch 100, AlexNet 224x224 at batch 32

Both sides are the same model from fastconv.models.build_model (impl="fastconv" or "torch"), with
the same weights, input batch and optimiser. Before timing, one forward+backward of the two (in eval
mode, so dropout does not differ) is compared: logits, loss and every parameter's gradient. On a GPU
the step is also captured whole in a CUDA graph (torch.cuda.graph, Adam(capturable=True)) and the
replay is timed, for both sides. The two sides are timed interleaved block by block (fcbench.timing,
as in bench_ops.py), with glibc's allocator held warm unless --cold is given (the script re-executes
itself with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set); the output and JSON record the CPU,
threads, allocator mode and git commit.
"""
import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fcbench import machine  # noqa: E402  (imports no torch: the re-exec in __main__ must come first)

if __name__ == "__main__":
    machine.hold_allocator_warm(cold="--cold" in sys.argv[1:])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fcbench import peers, report, timing  # noqa: E402

# name -> (batch, in_channels, image size, build_model kwargs); --tiny shrinks batch and image.
MODELS = {
    "mnist_cnn": {"batch": 100, "in_channels": 1, "size": 28, "tiny": (4, 28)},
    "alexnet": {"batch": 32, "in_channels": 3, "size": 224, "tiny": (2, 63)},  # 63: AlexNet.MIN_SIZE
}
NUM_CLASSES = 10
# Against the float64 run of the torch model; see check_pair.
TOLERANCE = {torch.float32: {"output": 1e-4, "grad": 1e-2}, torch.float64: {"output": 1e-10, "grad": 1e-8}}
TOLERANCE_TF32 = {"output": 1e-2, "grad": 5e-2}


def load_builders():
    """fastconv.models.build_model (both impls come from it) and a record of the build."""
    try:
        import fastconv
        from fastconv.models import build_model
    except Exception as exc:
        raise SystemExit(f"bench_train: cannot use fastconv.models ({type(exc).__name__}: {exc}).\n"
                         "Build it first: pip install --no-build-isolation -e .  "
                         "(or python setup.py build_ext --inplace)")
    return build_model, {"available": True, "file": fastconv.__file__,
                         "version": getattr(fastconv, "__version__", None)}


def build_pair(build_model, name, in_channels, seed, device, dtype, fuse=False):
    """Twin models: fastconv's gets the torch model's exact weights (and fastconv.fuse() with fuse)."""
    torch.manual_seed(seed)
    ref = build_model(name, impl="torch", num_classes=NUM_CLASSES, in_channels=in_channels)
    torch.manual_seed(seed)
    fc = build_model(name, impl="fastconv", num_classes=NUM_CLASSES, in_channels=in_channels)
    fc.load_state_dict(ref.state_dict())
    if fuse:
        import fastconv
        fastconv.fuse(fc)
    return fc.to(device=device, dtype=dtype), ref.to(device=device, dtype=dtype)


rel_err = peers.rel_err


def _fwd_bwd(m, x, y):
    m.eval()
    m.zero_grad(set_to_none=True)
    logits = m(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    out = {"logits": logits.detach(), "loss": loss.detach()}
    out.update({f"grad.{k}": p.grad.detach().clone() for k, p in m.named_parameters()})
    m.zero_grad(set_to_none=True)
    m.train()
    return out


def norm_err(a, b):
    if a is None:
        return float("inf")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_pair(fc, ref, x, y, tol):
    """Forward + backward of both in eval mode (no dropout), each measured against the torch model
    run in float64: logits and loss by max|a-b|/max|b| <= tol["output"], every parameter gradient
    by ||a-b||/||b|| <= tol["grad"].

    Gradients get a norm-wise and looser test on purpose: in a deep float32 network a rounding-level
    difference in a conv output flips the argmax of the odd max-pool window with a near-tie, which
    moves that window's gradient to another input element. In AlexNet at batch 32 this happens a few
    times per run for torch's float32 path and for fastconv's alike and leaves max-relative gradient
    errors of ~1e-3 (norm-wise ~1e-3 or below); a wrong gradient would be off by O(1).
    """
    got = _fwd_bwd(fc, x, y)
    mine = _fwd_bwd(ref, x, y)
    if x.dtype == torch.float64:
        exact = mine
    else:
        ref64 = copy.deepcopy(ref).double()
        exact = _fwd_bwd(ref64, x.double(), y)
        del ref64
    errs, bad = {}, {}
    for k, e in exact.items():
        grad = k.startswith("grad.")
        fn, limit = (norm_err, tol["grad"]) if grad else (rel_err, tol["output"])
        errs[k] = {"fastconv": fn(got.get(k), e), "torch": fn(mine[k], e), "metric": "normwise" if grad else "max_rel",
                   "tolerance": limit}
        if not errs[k]["fastconv"] <= limit:
            bad[k] = errs[k]
    return not bad, errs, bad


def eager_step(model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


def graphed_step(model, x, y, lr, warmup=3):
    """Capture forward, backward and Adam in one CUDA graph (the recipe of the CUDA-graphs docs,
    "whole network capture"); returns the replay callable."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, capturable=True)
    step = eager_step(model, opt, x, y)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return g.replay


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short timing (0.2 s per row and side instead of 2 s)")
    p.add_argument("--tiny", action="store_true", help="batch 4 / 2 and AlexNet at 63x63 (for tests; same row names)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--cold", action="store_true", help="glibc's default allocator settings instead of holding it warm")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in cuBLAS/cuDNN (off by default on both sides)")
    p.add_argument("--no-graph", action="store_true", help="on GPU, skip the CUDA-graph rows")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds of timing per row and side (default 2.0; 0.2 with --quick)")
    p.add_argument("--min-blocks", type=int, default=3, help="at least this many timed blocks per row and side")
    p.add_argument("--json", default=None, help="output JSON (default benchmarks/results/bench_train[-quick]"
                                                "-<cpu|cuda>-<cpu or gpu>-<date>-<commit>.json)")
    p.add_argument("--timer", choices=("wall", "thread-cpu"), default="wall",
                   help="thread-cpu: CPU time of the calling thread, only with --device cpu --threads 1 "
                        "(see bench_ops.py)")
    p.add_argument("--stat", choices=("median", "min"), default="median", help="statistic of the block times reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fuse", action="store_true", help="time fastconv.fuse(model) (Conv2d-ReLU[-MaxPool2d] fused)")
    args = p.parse_args(argv)
    if args.min_run_time is None:
        args.min_run_time = 0.2 if args.quick else 2.0
    return args


def main(argv=None):
    args = parse_args(argv)
    device = machine.pick_device(args.device, "bench_train")
    gpu = device.type == "cuda"
    dtype = peers.DTYPES[args.dtype]
    threads = args.threads or torch.get_num_threads()
    machine.set_threads(threads)
    clock = timing.make_clock(args.timer, gpu, threads)
    tf32 = machine.set_tf32(args.tf32)
    if gpu:
        torch.backends.cudnn.benchmark = True
    tol = TOLERANCE_TF32 if (args.tf32 and gpu and dtype == torch.float32) else TOLERANCE[dtype]
    build_model, fc_info = load_builders()

    names = [n for n in args.models.split(",") if n]
    for n in names:
        if n not in MODELS:
            raise SystemExit(f"bench_train: unknown model {n!r}; choose from {','.join(MODELS)}")
    modes = ["eager"] + (["cuda-graph"] if gpu and not args.no_graph else [])

    env = machine.env_info(device, threads)
    settings = {"quick": args.quick, "tiny": args.tiny, "dtype": args.dtype, "tf32": args.tf32, "tf32_flags": tf32,
                "optimizer": f"Adam(lr={args.lr})", "fused": args.fuse, "loss": "cross_entropy", "num_classes": NUM_CLASSES,
                "min_run_time_s": args.min_run_time, "min_blocks": args.min_blocks, "timer": args.timer,
                "stat": args.stat, "seed": args.seed, "tolerance": tol, "allocator": env["allocator"]["mode"],
                "interleaving": "the two sides alternate block by block, order reversed every cycle",
                "cudnn_benchmark": torch.backends.cudnn.benchmark if gpu else None, "modes": modes,
                "step": "zero_grad(set_to_none) + forward + cross_entropy + backward + Adam.step",
                "cuda_graph": "torch.cuda.graph capture of the whole step, Adam(capturable=True), static input"}
    print(f"bench_train: {', '.join(names)}; modes {', '.join(modes)}{' (quick)' if args.quick else ''}"
          f"{' (tiny)' if args.tiny else ''}")
    for line in machine.header_lines(env):
        print(line)
    print(f"dtype {args.dtype}; TF32 {'ON' if args.tf32 else 'off'}; Adam lr {args.lr}; {args.min_run_time}s timing "
          f"per row and side, interleaved block by block, {args.timer} clock, {args.stat} of blocks")
    sys.stdout.flush()

    records, failures = [], []
    t0 = time.time()
    for name in names:
        spec = MODELS[name]
        batch, size = spec["tiny"] if args.tiny else (spec["batch"], spec["size"])
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(batch, spec["in_channels"], size, size, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
        fc_model, t_model = build_pair(build_model, name, spec["in_channels"], args.seed, device, dtype, args.fuse)
        nparams = sum(p.numel() for p in t_model.parameters())
        ok, errs, bad = check_pair(fc_model, t_model, x, y, tol)
        shape = f"({batch},{spec['in_channels']},{size},{size})"
        if not ok:
            print(f"CHECK FAILED {name} {shape}: {bad}")
        for mode in modes:
            rec = {"id": f"{name}/{mode}", "name": f"{name} {shape} {mode}", "model": name, "mode": mode,
                   "batch": batch, "input_shape": [batch, spec["in_channels"], size, size], "params": nparams,
                   "check": {"ok": ok, "errors": errs, "tolerance": tol}, "times": {}, "errors": {}}
            if not ok:
                failures.append(rec["id"])
                records.append(rec)
                continue
            fns = {}
            for impl, base in (("fastconv", fc_model), ("torch", t_model)):
                model = copy.deepcopy(base)  # every mode starts from the same weights
                model.train()
                try:
                    if mode == "eager":
                        fns[impl] = eager_step(model, torch.optim.Adam(model.parameters(), lr=args.lr), x, y)
                    else:
                        fns[impl] = graphed_step(model, x, y, args.lr)
                except Exception as exc:
                    rec["errors"][impl] = f"{type(exc).__name__}: {exc}"
                    print(f"note: {impl} {mode} failed on {name}: {rec['errors'][impl]}")
            # The warmup call of the timing loop builds Adam's state, oneDNN primitives, cuDNN's choice.
            timed = timing.interleaved(fns, args.min_run_time, clock, gpu, min_blocks=args.min_blocks)
            for impl, c in timed.items():
                if c.error:
                    rec["errors"][impl] = c.error
                    print(f"note: {impl} {mode} failed on {name}: {c.error}")
                    continue
                st = rec["times"][impl] = timing.stats(c)
                st["images_per_s"] = batch / st[args.stat]
            f_t = rec["times"].get("fastconv", {}).get(args.stat)
            t_t = rec["times"].get("torch", {}).get(args.stat)
            if f_t and t_t:
                rec["ratio"] = f_t / t_t
            records.append(rec)
            print(f"{rec['name']}: fastconv {timing.fmt_time(f_t)}  torch {timing.fmt_time(t_t)}"
                  + (f"  fc/torch {rec['ratio']:.3f}" if "ratio" in rec else ""), flush=True)
        del fc_model, t_model

    elapsed = time.time() - t0
    machine.finish_env(env, gpu)
    print()
    lines = []
    for r in records:
        f, t = r["times"].get("fastconv", {}), r["times"].get("torch", {})
        lines.append([r["name"], timing.fmt_time(f.get(args.stat)), timing.fmt_time(t.get(args.stat)),
                      f"{r['ratio']:.3f}" if "ratio" in r else "-",
                      f"{f['images_per_s']:.1f}" if f else "-", f"{t['images_per_s']:.1f}" if t else "-"])
    print(report.table(["row", "fastconv", "torch", "fc/torch", "fc img/s", "torch img/s"], lines))
    geo = timing.geomean([r.get("ratio") for r in records])
    if geo is not None:
        n = sum("ratio" in r for r in records)
        print(f"\nGEOMEAN fastconv/torch training-step time ratio over {n} rows: {geo:.3f}")
    if failures:
        print(f"CORRECTNESS FAILED (not timed): {', '.join(failures)}")
    print(f"allocator {env['allocator']['mode']}; elapsed {elapsed:.1f} s")

    tag = ("-quick" if args.quick else "") + ("-tiny" if args.tiny else "")
    tag += f"-{threads}thread" if args.threads and not gpu else ""
    tag += "-cputime" if args.timer == "thread-cpu" else ""
    tag += "-min" if args.stat == "min" else ""
    tag += "-cold" if args.cold else ""
    tag += "-fused" if args.fuse else ""
    tag += "-" + args.models.replace(",", "-").replace("_", "-") if args.models != ",".join(MODELS) else ""
    out_json = args.json or machine.default_output("bench_train", tag, device, env)
    report.write_json(out_json, {"benchmark": "bench_train", "argv": list(argv if argv is not None else sys.argv[1:]),
                                 "env": env, "fastconv": fc_info, "settings": settings, "elapsed_s": elapsed,
                                 "geomean": geo, "failures": failures, "rows": records})
    print(f"wrote {out_json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
