"""The machine a benchmark runs on: CPU identity, the allocator mode, threads, commit, how busy it is.

Nothing here imports torch at module level: `hold_allocator_warm` must run (and may re-exec the
process) before torch is loaded.
"""
import datetime
import os
import platform
import re
import subprocess
import sys
import time

from . import ROOT

# --------------------------------------------------------------------------------------------------
# The allocator. torch's CPU convolution allocates fresh reorder and output buffers on every call;
# under glibc's dynamic mmap threshold those page-fault on every call until some larger allocation
# raises the threshold, so the same torch call can take twice as long in a fresh process as after a
# bigger layer ran (shared/PERF.md, issue #8). Benchmarks therefore run with glibc's allocator held
# warm (no mmap for big blocks, no trimming), the mode a long training loop or jemalloc/tcmalloc
# gives. `--cold` measures glibc's defaults instead.
# --------------------------------------------------------------------------------------------------

WARM_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
_REEXEC_MARK = "FASTCONV_BENCH_REEXEC"
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")


def _glibc():
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _preloaded_allocator():
    pre = os.environ.get("LD_PRELOAD", "")
    return next((p for p in pre.replace(":", " ").split() if any(a in p for a in _PRELOADED)), None)


def hold_allocator_warm(cold=False):
    """Re-exec this process with glibc's allocator held warm (or, with cold=True, with glibc's
    defaults) unless it already runs that way. Call before importing torch; returns only when no
    re-exec is needed (or possible)."""
    if os.environ.get(_REEXEC_MARK) or not _glibc() or _preloaded_allocator():
        return
    have = all(os.environ.get(k) == v for k, v in WARM_ENV.items())
    none = not any(k in os.environ for k in WARM_ENV)
    if (have and not cold) or (none and cold):
        return
    env = dict(os.environ)
    for k, v in WARM_ENV.items():
        if cold:
            env.pop(k, None)
        else:
            env[k] = v
    env[_REEXEC_MARK] = "1"
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable] + argv[1:], env)
    except OSError as exc:  # cannot re-exec: carry on, allocator_info() reports the real mode
        print(f"note: could not re-exec with the allocator settings ({exc})", file=sys.stderr)


def allocator_info():
    """{"mode": "warm"|"cold", "how": ...}: what this process actually runs with."""
    pre = _preloaded_allocator()
    if pre:
        return {"mode": "warm", "how": f"LD_PRELOAD={pre}", "env": {}}
    env = {k: os.environ[k] for k in WARM_ENV if k in os.environ}
    if not _glibc():
        return {"mode": "unknown", "how": f"not glibc ({platform.libc_ver()[0] or platform.system()}); "
                                          "allocator not controlled", "env": env}
    if all(env.get(k) == v for k, v in WARM_ENV.items()):
        return {"mode": "warm", "how": "glibc, " + " ".join(f"{k}={v}" for k, v in env.items()), "env": env}
    if env:
        return {"mode": "custom", "how": "glibc, " + " ".join(f"{k}={v}" for k, v in env.items()), "env": env}
    return {"mode": "cold", "how": "glibc defaults (dynamic mmap threshold, trimming on)", "env": env}


# --------------------------------------------------------------------------------------------------
# CPU identity. The brand string is masked on the project's VMs ("AMD EPYC"); CPUID family/model
# tell Zen 4 from Zen 5, which differ 2x in fp32 FMA throughput per cycle.
# --------------------------------------------------------------------------------------------------

# (vendor, family, first model, last model, name); first match wins.
_UARCH = [
    ("AuthenticAMD", 23, 0x00, 0x2f, "Zen/Zen+ (Naples)"),
    ("AuthenticAMD", 23, 0x30, 0x3f, "Zen 2 (Rome)"),
    ("AuthenticAMD", 23, 0x40, 0xff, "Zen 2"),
    ("AuthenticAMD", 25, 0x00, 0x0f, "Zen 3 (Milan)"),
    ("AuthenticAMD", 25, 0x10, 0x1f, "Zen 4 (Genoa)"),
    ("AuthenticAMD", 25, 0x20, 0x5f, "Zen 3 (client)"),
    ("AuthenticAMD", 25, 0x60, 0x7f, "Zen 4 (client)"),
    ("AuthenticAMD", 25, 0xa0, 0xaf, "Zen 4c (Bergamo/Siena)"),
    ("AuthenticAMD", 26, 0x00, 0x1f, "Zen 5 (Turin)"),
    ("AuthenticAMD", 26, 0x20, 0xff, "Zen 5"),
    ("GenuineIntel", 6, 0x55, 0x55, "Skylake-SP/Cascade Lake"),
    ("GenuineIntel", 6, 0x6a, 0x6c, "Ice Lake-SP"),
    ("GenuineIntel", 6, 0x8f, 0x8f, "Sapphire Rapids"),
    ("GenuineIntel", 6, 0xcf, 0xcf, "Emerald Rapids"),
    ("GenuineIntel", 6, 0xad, 0xae, "Granite Rapids"),
    ("GenuineIntel", 6, 0xaf, 0xaf, "Sierra Forest"),
]

# The flags that decide which kernels run (ours, oneDNN's, MKL's, OpenBLAS's).
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_fp16", "asimd", "sve", "sve2")


def microarch(vendor, family, model, flags=()):
    """The microarchitecture for CPUID vendor/family/model. A model the table does not know is named
    by what its flags show where they tell a server generation apart: an Intel CPU with AMX tiles is
    Sapphire Rapids or later (a hypervisor may report another model number, e.g. 167 for one seen
    here, whose real model 167 is a client part without AMX)."""
    for v, f, lo, hi, name in _UARCH:
        if v == vendor and f == family and model is not None and lo <= model <= hi:
            return name
    if vendor is None or family is None:
        return None
    if vendor == "GenuineIntel" and "amx_tile" in flags:
        return f"Sapphire Rapids-class (AMX; reported model {model})"
    return f"{vendor} family {family} model {model}"


def cpu_info():
    """vendor, family, model, stepping, brand string, microarchitecture, flags (all and SIMD)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break  # the first processor is enough
                    continue
                k, _, v = line.partition(":")
                fields.setdefault(k.strip(), v.strip())
    except OSError:
        pass

    def num(key):
        try:
            return int(fields[key], 0)
        except (KeyError, ValueError):
            return None

    vendor = fields.get("vendor_id")
    family, model = num("cpu family"), num("model")
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    name = fields.get("model name") or platform.processor() or platform.machine()
    return {
        "vendor": vendor, "family": family, "model": model, "stepping": num("stepping"),
        "model_name": name, "microarch": microarch(vendor, family, model, flags) or name,
        "machine": platform.machine(), "logical_cpus": os.cpu_count(),
        "simd": [f for f in SIMD_FLAGS if f in flags], "flags": " ".join(flags),
    }


def cpu_label(cpu):
    """A one-line description, e.g. 'AMD EPYC, Zen 4 (Genoa), family 25 model 17'."""
    if cpu.get("family") is None:
        return cpu["model_name"]
    return f"{cpu['model_name']}, {cpu['microarch']}, family {cpu['family']} model {cpu['model']}"


def cpu_busy(interval=1.0):
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat), measured while this process
    sleeps: how much other processes are using the machine. None where /proc/stat does not exist."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (i1 - i0) / max(1, t1 - t0), 3)


def loadavg():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def git_commit():
    """HEAD's sha, with "-dirty" when the kernels or the package differ from it."""
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "csrc", "fastconv", "setup.py"], cwd=ROOT,
                               stderr=subprocess.DEVNULL).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def slug(s):
    return re.sub(r"[^a-z0-9]+", "-", str(s).lower()).strip("-")


# --------------------------------------------------------------------------------------------------
# Threads: torch (and fastconv, which runs on torch's pool) via torch.set_num_threads; NumPy's BLAS
# via threadpoolctl.
# --------------------------------------------------------------------------------------------------

_blas_limit = None


def set_threads(n):
    """Use n threads in torch, fastconv and NumPy's BLAS. Returns the BLAS libraries' info."""
    import torch

    global _blas_limit
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return {"note": "threadpoolctl is not installed: NumPy's BLAS threads are not controlled "
                        "(pip install threadpoolctl)"}
    import numpy  # noqa: F401  (loads the BLAS so threadpoolctl sees it)

    _blas_limit = threadpool_limits(limits=n, user_api="blas")  # kept alive: the limit holds until exit
    return blas_info()


def blas_info():
    """NumPy's BLAS as threadpoolctl sees it (library, version, threads, kernels chosen)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"note": "threadpoolctl is not installed"}
    import numpy  # noqa: F401

    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    np_libs = [i for i in libs if "numpy" in (i.get("filepath") or "")] or libs
    if not np_libs:
        return {"note": "no BLAS found by threadpoolctl"}
    i = np_libs[0]
    return {k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture", "threading_layer",
                                  "filepath")}


def blas_label(info):
    if "internal_api" not in info:
        return info.get("note", "unknown BLAS")
    s = f"{info['internal_api']} {info.get('version') or ''}".strip()
    if info.get("architecture"):
        s += f" ({info['architecture']} kernels)"
    return s + f", {info.get('num_threads')} threads"


# --------------------------------------------------------------------------------------------------
# The environment record every result file carries.
# --------------------------------------------------------------------------------------------------

def device_name(device):
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info()["model_name"]


def env_info(device, threads):
    import torch

    cpu = cpu_info()
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu,
        "cpu_label": cpu_label(cpu),
        "threads": threads,
        "allocator": allocator_info(),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "onednn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": loadavg(),
        "cpu_busy_start": cpu_busy(),  # other processes' share of the CPUs just before starting
    }
    m = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show() + torch.__config__.parallel_info())
    if m:
        info["onednn"] = m.group(1)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_sms"] = props.multi_processor_count
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def finish_env(env, gpu):
    env["loadavg_end"] = loadavg()
    env["cpu_busy_end"] = cpu_busy() if not gpu else None


def pick_device(requested, script):
    """--device (default: cuda when available) as a torch.device."""
    import torch

    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{script}: --device cuda but torch.cuda.is_available() is False")
    return torch.device(name, torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def set_tf32(enabled):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def header_lines(env):
    """The lines every script prints about the machine."""
    alloc = env["allocator"]
    lines = [(f"device: {env['device_name']} ({env['device']}); CPU {env['cpu_label']}; {env['threads']} threads; "
              f"git {env['git_commit'][:12]}"),
             f"torch {env['torch']}, oneDNN {env['onednn']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}",
             f"allocator: {alloc['mode'].upper()} ({alloc['how']})"
             + ("" if alloc["mode"] == "warm" else "; torch's CPU convolutions may page-fault on every call")]
    if env["device"] == "cpu" and env["cpu_busy_start"] is not None and env["cpu_busy_start"] > 0.1:
        lines.append(f"WARNING: other processes kept {100 * env['cpu_busy_start']:.0f}% of the CPUs busy just "
                     "before starting, so CPU timings will be noisy (cpu_busy_start and loadavg in the JSON)")
    return lines


def default_output(prefix, tag, device, env):
    """benchmarks/results/<prefix><tag>-<cpu|cuda>-<cpu or gpu>-<date>-<commit>.json"""
    from . import RESULTS_DIR

    date = datetime.date.today().strftime("%Y%m%d")
    if device.type == "cpu":
        what = "cpu-" + slug(env["cpu"]["microarch"] or env["device_name"])
    else:
        what = "cuda-" + slug(env["device_name"])
    commit = env["git_commit"][:7] + ("-dirty" if env["git_commit"].endswith("-dirty") else "")
    return os.path.join(RESULTS_DIR, f"{prefix}{tag}-{what}-{date}-{commit}.json")
