"""The timing loop shared by bench_ops.py and bench_train.py.

Peers are timed interleaved: each calls its statement in blocks of `number` calls (`number` chosen so
a block lasts about `block_time`), and the peers take turns block by block, the order reversed every
cycle (A B B A A B ...), until every peer has run at least `min_run_time` seconds and `min_blocks`
blocks. A drift in machine load (another process, frequency, the allocator) thus hits every peer
alike. Each block gives one time per call; the statistics are over blocks, as in
torch.utils.benchmark's blocked_autorange (which this replaces: it imports torch.utils.cpp_extension,
which prints "No CUDA runtime is found" on CPU-only machines, and its Compare table rounds 1.351 s to
"1400").
"""
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional


def make_clock(kind, gpu, threads):
    """() -> seconds. wall: time.perf_counter (the GPU synchronised around every block by the loop).
    thread-cpu: CPU time of the calling thread, exact for one-thread CPU work (torch, fastconv, OpenBLAS
    and CPU autograd all run on the calling thread then) and blind to other processes taking the core;
    with more threads it would miss the workers' time, so it is refused."""
    if kind == "wall":
        return time.perf_counter
    if gpu or threads != 1:
        raise SystemExit("--timer thread-cpu needs --device cpu and --threads 1")
    return time.thread_time


@dataclass
class Contender:
    name: str
    fn: Callable
    context: Callable = contextlib.nullcontext   # entered around every block
    number: int = 1
    block_times: list = field(default_factory=list)   # seconds per call, one entry per block
    spent: float = 0.0
    error: Optional[str] = None


def _sync(gpu):
    if gpu:
        import torch

        torch.cuda.synchronize()


def _block(c, clock, gpu):
    with c.context():
        _sync(gpu)
        t0 = clock()
        for _ in range(c.number):
            c.fn()
        _sync(gpu)
        dt = clock() - t0
    return dt


def interleaved(fns, min_run_time, clock, gpu=False, block_time=None, min_blocks=3, warmup=1):
    """Time {name: fn or (fn, context)} interleaved; {name: Contender} with per-call block times or
    an error."""
    block_time = block_time or min(0.05, max(0.002, min_run_time / 20))
    cs = []
    for name, v in fns.items():
        fn, ctx = v if isinstance(v, tuple) else (v, contextlib.nullcontext)
        cs.append(Contender(name, fn, ctx))
    for c in cs:  # warm up and calibrate the block size
        try:
            t = None
            for _ in range(max(1, warmup)):
                t = _block(c, clock, gpu)
            if t < block_time:  # a fast statement: the warmup call may have been slow, measure again
                t = _block(c, clock, gpu)
            if t < block_time / 10:
                c.number = 10
                t = _block(c, clock, gpu) / 10
            c.number = max(1, int(block_time / max(t, 1e-9)))
        except Exception as exc:
            c.error = f"{type(exc).__name__}: {exc}"
    live = [c for c in cs if c.error is None]
    cycle = 0
    while live and any(c.spent < min_run_time or len(c.block_times) < min_blocks for c in live):
        for c in (live if cycle % 2 == 0 else reversed(live)):
            try:
                dt = _block(c, clock, gpu)
            except Exception as exc:
                c.error = f"{type(exc).__name__}: {exc}"
                continue
            c.block_times.append(dt / c.number)
            c.spent += dt
        live = [c for c in live if c.error is None]
        cycle += 1
    return {c.name: c for c in cs}


def stats(c):
    """Median, IQR, mean, min, 10th percentile of a Contender's per-call block times (seconds)."""
    ts = sorted(c.block_times)
    if not ts:
        return None

    def q(p):  # linear interpolation, as numpy.percentile's default
        i = p * (len(ts) - 1)
        lo = math.floor(i)
        return ts[lo] + (ts[min(lo + 1, len(ts) - 1)] - ts[lo]) * (i - lo)

    return {"median": q(0.5), "iqr": q(0.75) - q(0.25), "mean": sum(ts) / len(ts), "min": ts[0], "p10": q(0.1),
            "blocks": len(ts), "calls_per_block": c.number, "calls": c.number * len(ts)}


def fmt_time(s):
    """Four significant digits: 1.351 s, 12.34 ms, 874.6 us."""
    if s is None:
        return "-"
    for scale, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")):
        if s >= scale or unit == "ns":
            v = s / scale
            return f"{v:.{max(0, 3 - int(math.floor(math.log10(v))) if v > 0 else 3)}f} {unit}"
    return "-"


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None
