"""bench_ops.py's command line: check every row, time it against the peers, report."""
import argparse
import dataclasses
import re
import sys
import time

import torch

from . import cases, machine, peak, peers, report, timing


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench_ops.py", description=sys.modules["__main__"].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=cases.SUITES, default=None,
                   help="core: 7 fwd+bwd rows of the seed models; full: every layer and pass (default; core with "
                        "--quick)")
    p.add_argument("--quick", action="store_true", help="short timing (0.2 s per row and peer); implies --suite core")
    p.add_argument("--tiny", action="store_true", help="shrink batches and images (for tests; same row names)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(peers.DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch, fastconv and NumPy's BLAS (default: torch's)")
    p.add_argument("--cold", action="store_true",
                   help="glibc's default allocator settings instead of holding it warm (see benchmarks/README.md)")
    p.add_argument("--peak", choices=("auto", "fma", "mm", "off"), default="auto",
                   help="how to measure the CPU's fp32 peak: auto (an FMA loop compiled at run time, else a large "
                        "torch.mm as a lower bound), fma, mm, off")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in cuBLAS/cuDNN (off by default on both sides)")
    p.add_argument("--algorithm", choices=("auto", "gemm", "winograd", "benchmark"), default="auto",
                   help="fastconv's CPU algorithm setting (fastconv.set_conv_algorithm): auto (rules by shape, the "
                        "default), benchmark (each shape's passes timed once, the fastest kept, as "
                        "torch.backends.cudnn.benchmark, which the GPU runs set for torch)")
    p.add_argument("--peers", default=None,
                   help="comma-separated peers: torch, numpy (CPU, float32/64), torch-no-cudnn (GPU), "
                        "torch-no-onednn (CPU). Default: torch,numpy on CPU; torch,torch-no-cudnn on GPU")
    p.add_argument("--filter", default=None, help="regex; only rows whose id or name matches")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds of timing per row and peer (default 0.6; 0.2 with --quick)")
    p.add_argument("--min-blocks", type=int, default=3, help="at least this many timed blocks per row and peer")
    p.add_argument("--json", default=None, help="output JSON path (default: benchmarks/results/bench_ops[-suite]"
                                                "-<cpu|cuda>-<cpu or gpu>-<date>-<commit>.json)")
    p.add_argument("--png", default=None, help="output chart path (default: the JSON path with .png)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--timer", choices=("wall", "thread-cpu"), default="wall",
                   help="wall: wall-clock time (default; synchronises the GPU). thread-cpu: CPU time of the calling "
                        "thread, only with --device cpu --threads 1: immune to other processes preempting the "
                        "benchmark on a shared machine")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="statistic of the block times used for the tables, ratios, rates and geometric means "
                        "(default median; min estimates the unloaded time on a shared machine). All are in the JSON")
    p.add_argument("--channels-last", action="store_true",
                   help="inputs, weights and grad_outputs in channels_last memory format, for every peer "
                        "(as a model run with .to(memory_format=torch.channels_last))")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.suite is None:
        args.suite = "core" if args.quick else "full"
    if args.min_run_time is None:
        args.min_run_time = 0.2 if args.quick else 0.6
    return args


def output_tag(args, threads, gpu):
    tag = "" if args.suite == "full" else f"-{args.suite}"
    tag += ("-quick" if args.quick else "") + ("-tiny" if args.tiny else "") + ("-filtered" if args.filter else "")
    tag += f"-{threads}thread" if args.threads and not gpu else ""
    tag += "-cputime" if args.timer == "thread-cpu" else ""
    tag += "-min" if args.stat == "min" else ""
    tag += f"-{args.dtype}" if args.dtype != "float32" else ""
    tag += "-tf32" if args.tf32 else ""
    tag += "-cold" if args.cold else ""
    tag += "-channels-last" if args.channels_last else ""
    tag += f"-{args.algorithm}" if args.algorithm != "auto" else ""
    return tag


def main(argv=None):
    args = parse_args(argv)
    device = machine.pick_device(args.device, "bench_ops")
    gpu = device.type == "cuda"
    dtype = peers.DTYPES[args.dtype]
    threads = args.threads or torch.get_num_threads()
    blas = machine.set_threads(threads)
    clock = timing.make_clock(args.timer, gpu, threads)
    tf32 = machine.set_tf32(args.tf32)
    if gpu:
        torch.backends.cudnn.benchmark = True  # torch's best cuDNN algorithm per shape, chosen in warmup
    tol = peers.TOLERANCE[dtype] if not (args.tf32 and gpu and dtype == torch.float32) else peers.TOLERANCE_TF32

    fc, fc_info = peers.load_fastconv()
    if args.algorithm != "auto":
        import fastconv
        fastconv.set_conv_algorithm(args.algorithm)
    peer_names = args.peers.split(",") if args.peers else (["torch", "torch-no-cudnn"] if gpu else ["torch", "numpy"])
    impls, use_numpy = peers.make_peers(peer_names, gpu, dtype, args.tf32)
    peer_list = [p for p in peer_names if p in impls or (p == "numpy" and use_numpy)]

    rows = cases.build_rows(args.suite, args.tiny)
    if args.filter:
        rx = re.compile(args.filter)
        rows = [r for r in rows if rx.search(f"{r.id} {r.name}")]

    env = machine.env_info(device, threads)
    env["numpy_blas"] = blas
    if gpu:
        gpeaks = peak.gpu_peaks(env["device_name"])
        pk = {"gpu": gpeaks, "method": "datasheet"} if gpeaks else None
        pflops = peak.gpu_peak_flops(gpeaks, args.dtype, args.tf32)
    else:
        pk = peak.measure_peak(env["cpu"], threads, args.peak)
        pflops = peak.cpu_peak_flops(pk, args.dtype)
    settings = {"suite": args.suite, "quick": args.quick, "tiny": args.tiny, "dtype": args.dtype, "tf32": args.tf32,
                "tf32_flags": tf32, "min_run_time_s": args.min_run_time, "min_blocks": args.min_blocks,
                "seed": args.seed, "filter": args.filter, "allocator": env["allocator"]["mode"],
                "fastconv_algorithm_setting": args.algorithm,
                "memory_format": "channels_last" if args.channels_last else "contiguous",
                "cudnn_benchmark": torch.backends.cudnn.benchmark if gpu else None,
                "tolerance_max_rel_err": tol, "peers": peer_list, "timer": args.timer, "stat": args.stat,
                "interleaving": "peers alternate block by block, order reversed every cycle",
                "peer_notes": {k: v.note for k, v in impls.items()},
                "numpy_note": f"NumPy im2col+GEMM (tutorial algorithm) in {args.dtype}, BLAS: {machine.blas_label(blas)}",
                "fwd_rows": "inputs do not require grad (inference)",
                "bwd-input_rows": "fastconv._conv2d_backward / aten.convolution_backward on a precomputed grad_output, "
                                  "output_mask [True, False, False] (grad w.r.t. input only)",
                "bwd-weight_rows": "the same ops with output_mask [False, True, False] (grad w.r.t. weight only)",
                "bwd_rows": "fastconv._max_pool2d_backward / aten.max_pool2d_with_indices_backward",
                "fwd+bwd_rows": "F-style call + torch.autograd.grad w.r.t. input, weight and bias",
                "peak": pk, "peak_flops": pflops}

    print(f"bench_ops: suite={args.suite}{' (quick)' if args.quick else ''}{' (tiny)' if args.tiny else ''}, "
          f"{len(rows)} rows, peers: fastconv vs {', '.join(peer_list)}")
    for line in machine.header_lines(env):
        print(line)
    if pk and not gpu:
        print(f"fp32 peak: {pk['gflops']:.1f} GFLOP/s on {threads} threads ({pk['per_thread_gflops']:.1f} per thread; "
              f"{pk['kind']}: {pk['method']})" + (f"; {pk['note']}" if pk.get("note") else ""))
    elif pk:
        print(f"GPU peak (datasheet {pk['gpu']['name']}): {pflops / 1e12:.1f} TFLOP/s {args.dtype}, "
              f"{pk['gpu']['bw'] / 1e12:.2f} TB/s")
    print(f"dtype {args.dtype}; TF32 {'ON' if args.tf32 else 'off'}; {args.min_run_time}s timing per row and peer, "
          f"peers interleaved block by block, {args.timer} clock, {args.stat} of blocks; "
          f"check: max|a-b|/max|b| <= {tol:g}; fastconv algorithm setting: {args.algorithm}")
    if use_numpy:
        print(f"numpy peer: {settings['numpy_note']}")
    for k, v in impls.items():
        if v.note:
            print(f"{k}: {v.note}")
    sys.stdout.flush()

    records, failures, checked = [], [], {}
    inputs_key, inp, npin = None, None, None
    t_start = time.time()
    for i, row in enumerate(rows):
        case = row.case
        key = (case.op, case.geometry())
        if key != inputs_key:
            inputs_key, inp = key, peers.make_inputs(case, device, dtype, args.seed, args.channels_last)
            npin = peers.numpy_inputs(inp) if use_numpy and case.op == "conv2d" else None
        flops, nbytes = cases.work(row, inp["x"].element_size())
        rec = {"id": row.id, "name": row.name, "op": case.op, "pass": row.pass_, "layer": case.layer,
               "aliases": row.aliases, "shape": case.shape_str(), "geometry": dataclasses.asdict(case),
               "core": row.core, "issue8": row.issue8, "algorithm": None,
               "flops": flops, "bytes": nbytes, "times": {}, "ratios": {}, "check": {}, "errors": {}}

        # Correctness first (once per case, covering all of its passes).
        if key not in checked:
            status = checked[key] = peers.check_case(case, inp, fc, impls, npin, tol)
            if not status["ok"]:
                worst = {k: v for k, v in status["errors"].get("fastconv", {}).items() if v > tol}
                print(f"CHECK FAILED {case.layer} {case.shape_str()}: "
                      f"{status.get('exception') or f'mismatch vs torch: {worst}'}")
            for pname, msg in status["peer_errors"].items():
                print(f"note: peer {pname} skipped on {case.layer} {case.shape_str()}: {msg}")
        status = checked[key]
        rec["algorithm"] = peers.algorithm(case, inp)  # after the check ran it: "benchmark" has measured by then
        rec["check"] = {"ok": status["ok"], "max_rel_err": status["errors"], "tolerance": tol}
        if not status["ok"]:
            failures.append(row.id)
            rec["errors"]["fastconv"] = status.get("exception", "check failed")
            records.append(rec)
            continue

        # Timing: the same statement shape for every peer, interleaved block by block.
        fns = {"fastconv": (peers.timed_statements(fc, case, inp)[row.pass_], fc.context)}
        for pname, impl in impls.items():
            if pname in status["peer_errors"] or (case.op == "max_pool2d" and not impl.pools):
                continue
            fns[pname] = (peers.timed_statements(impl, case, inp)[row.pass_], impl.context)
        if npin is not None and "numpy" not in status["peer_errors"]:
            fns["numpy"] = peers.numpy_statements(case, npin)[row.pass_]
        timed = timing.interleaved(fns, args.min_run_time, clock, gpu, min_blocks=args.min_blocks)
        for pname, c in timed.items():
            if c.error:
                rec["errors"][pname] = c.error
                print(f"note: {pname} failed timing {row.name}: {c.error}")
                continue
            st = rec["times"][pname] = timing.stats(c)
            t = st[args.stat]
            if flops:
                rec.setdefault("gflops", {})[pname] = flops / t / 1e9
                if pflops and case.op == "conv2d":
                    rec.setdefault("peak_fraction", {})[pname] = flops / t / pflops
            rec.setdefault("gbps", {})[pname] = nbytes / t / 1e9
            if gpu and pk and case.op == "max_pool2d":
                rec.setdefault("peak_fraction", {})[pname] = nbytes / t / pk["gpu"]["bw"]
        fct = rec["times"].get("fastconv", {}).get(args.stat)
        for pname in peer_list:
            pt = rec["times"].get(pname, {}).get(args.stat)
            if fct and pt:
                rec["ratios"][pname] = fct / pt
        records.append(rec)
        ratio_s = "  ".join(f"fc/{p} {rec['ratios'][p]:.3f}" for p in peer_list if p in rec["ratios"])
        rate = ""
        if rec.get("gflops", {}).get("fastconv") and case.op == "conv2d":
            rate = f"  ({rec['gflops']['fastconv']:.1f} GFLOP/s"
            frac = rec.get("peak_fraction", {}).get("fastconv")
            rate += f", {100 * frac:.1f}% of peak)" if frac is not None else ")"
        print(f"[{i + 1}/{len(rows)}] {row.name} [{rec['algorithm']}]: fastconv {timing.fmt_time(fct)}  {ratio_s}{rate}",
              flush=True)

    elapsed = time.time() - t_start
    machine.finish_env(env, gpu)
    print()
    print(report.rows_table(records, peer_list, args.stat, "peak"))
    print()
    summary = report.pass_summary(records, peer_list)
    print("Per op and pass (time ratio fastconv/peer, < 1: fastconv faster):")
    print(report.summary_table(summary, peer_list))
    print()
    geo = {p: timing.geomean([r["ratios"].get(p) for r in records]) for p in peer_list}
    geo_core = {p: timing.geomean([r["ratios"].get(p) for r in records if r["core"]]) for p in peer_list}
    for p in peer_list:
        if geo[p] is not None:
            n = sum(1 for r in records if p in r["ratios"])
            print(f"GEOMEAN fastconv/{p} time ratio over {n} rows: {geo[p]:.3f}"
                  + ("  (< 1: fastconv faster)" if p == "torch" else ""))
    if args.suite != "core":
        for p in peer_list:
            if geo_core[p] is not None:
                print(f"GEOMEAN fastconv/{p} over the core suite's rows: {geo_core[p]:.3f}")
    if failures:
        print(f"CORRECTNESS FAILED on {len(failures)} rows (not timed): {', '.join(failures)}")
    print(f"allocator {env['allocator']['mode']}; elapsed {elapsed:.1f} s")

    out_json = args.json or machine.default_output("bench_ops", output_tag(args, threads, gpu), device, env)
    result = {"benchmark": "bench_ops", "argv": list(argv if argv is not None else sys.argv[1:]),
              "env": env, "fastconv": fc_info, "settings": settings, "elapsed_s": elapsed,
              "geomean": geo, "geomean_core": geo_core, "summary": summary, "failures": failures, "rows": records}
    report.write_json(out_json, result)
    print(f"wrote {out_json}")
    if not args.no_png:
        import os

        png = args.png or os.path.splitext(out_json)[0] + ".png"
        title = (f"fastconv {args.suite} suite, {args.dtype}, TF32 {'on' if args.tf32 else 'off'}, allocator "
                 f"{env['allocator']['mode']} - {env['cpu_label'] if not gpu else env['device_name']}, {threads} "
                 f"thread{'s' if threads > 1 else ''} - {env['date'][:10]} - {env['git_commit'][:12]}")
        if report.plot(records, peer_list, png, title, args.stat):
            print(f"wrote {png}")
    return 1 if failures else 0
