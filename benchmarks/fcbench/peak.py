"""The machine's fp32 peak, measured at the start of a benchmark.

Preferred: a tiny C program compiled at run time (`cc`, cached under ~/.cache) that runs independent
FMA chains (24 of 512 bits, 12 of 256 bits: without AVX-512 only 16 ymm registers) on every thread the
benchmark uses, with 512-bit and with 256-bit vectors (Zen 4 reaches the same with both; Zen 5 and Intel server cores only with 512-bit), and
reports the best. Fallback when no compiler works or the CPU lacks AVX2+FMA: a large `torch.mm`,
which is a lower bound of the peak (~83% of it on Zen 4). The result says which it is.
"""
import hashlib
import os
import subprocess
import tempfile
import time

_SRC = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

/* 24 accumulators with distinct start values (equal ones would let the compiler merge the chains) */
#define DECL(T, SET) T a0 = SET(s + 0), a1 = SET(s + 1), a2 = SET(s + 2), a3 = SET(s + 3), a4 = SET(s + 4), \
  a5 = SET(s + 5), a6 = SET(s + 6), a7 = SET(s + 7), a8 = SET(s + 8), a9 = SET(s + 9), a10 = SET(s + 10), \
  a11 = SET(s + 11), a12 = SET(s + 12), a13 = SET(s + 13), a14 = SET(s + 14), a15 = SET(s + 15), \
  a16 = SET(s + 16), a17 = SET(s + 17), a18 = SET(s + 18), a19 = SET(s + 19), a20 = SET(s + 20), \
  a21 = SET(s + 21), a22 = SET(s + 22), a23 = SET(s + 23);
#define STEP(F) a0 = F(x, y, a0); a1 = F(x, y, a1); a2 = F(x, y, a2); a3 = F(x, y, a3); a4 = F(x, y, a4); \
  a5 = F(x, y, a5); a6 = F(x, y, a6); a7 = F(x, y, a7); a8 = F(x, y, a8); a9 = F(x, y, a9); a10 = F(x, y, a10); \
  a11 = F(x, y, a11); a12 = F(x, y, a12); a13 = F(x, y, a13); a14 = F(x, y, a14); a15 = F(x, y, a15); \
  a16 = F(x, y, a16); a17 = F(x, y, a17); a18 = F(x, y, a18); a19 = F(x, y, a19); a20 = F(x, y, a20); \
  a21 = F(x, y, a21); a22 = F(x, y, a22); a23 = F(x, y, a23);
#define SUM(ADD) ADD(ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7))), \
  ADD(ADD(ADD(ADD(a8, a9), ADD(a10, a11)), ADD(ADD(a12, a13), ADD(a14, a15))), \
  ADD(ADD(ADD(a16, a17), ADD(a18, a19)), ADD(ADD(a20, a21), ADD(a22, a23)))))

__attribute__((target("avx512f"))) static float run512(long n, float s) {
  __m512 x = _mm512_set1_ps(s), y = _mm512_set1_ps(1e-7f);
  DECL(__m512, _mm512_set1_ps)
  for (long i = 0; i < n; i++) { STEP(_mm512_fmadd_ps) }
  __m512 t = SUM(_mm512_add_ps);
  float out[16]; _mm512_storeu_ps(out, t); return out[0];
}
/* 12 chains for 256-bit: without AVX-512 there are only 16 ymm registers, and 24 accumulators would
   spill (measured on Zen 3: half the peak); 12 still cover two FMA pipes of latency 4-5 */
#define DECL12(T, SET) T a0 = SET(s + 0), a1 = SET(s + 1), a2 = SET(s + 2), a3 = SET(s + 3), a4 = SET(s + 4), \
  a5 = SET(s + 5), a6 = SET(s + 6), a7 = SET(s + 7), a8 = SET(s + 8), a9 = SET(s + 9), a10 = SET(s + 10), \
  a11 = SET(s + 11);
#define STEP12(F) a0 = F(x, y, a0); a1 = F(x, y, a1); a2 = F(x, y, a2); a3 = F(x, y, a3); a4 = F(x, y, a4); \
  a5 = F(x, y, a5); a6 = F(x, y, a6); a7 = F(x, y, a7); a8 = F(x, y, a8); a9 = F(x, y, a9); a10 = F(x, y, a10); \
  a11 = F(x, y, a11);
#define SUM12(ADD) ADD(ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7))), \
  ADD(ADD(a8, a9), ADD(a10, a11)))
__attribute__((target("avx2,fma"))) static float run256(long n, float s) {
  __m256 x = _mm256_set1_ps(s), y = _mm256_set1_ps(1e-7f);
  DECL12(__m256, _mm256_set1_ps)
  for (long i = 0; i < n; i++) { STEP12(_mm256_fmadd_ps) }
  __m256 t = SUM12(_mm256_add_ps);
  float out[8]; _mm256_storeu_ps(out, t); return out[0];
}

static int width; static long iters; static pthread_barrier_t bar; static volatile float sink;
static void *worker(void *arg) {
  float s = 1.0f + (float)(long)arg * 1e-3f;
  pthread_barrier_wait(&bar);
  float r = width == 512 ? run512(iters, s) : run256(iters, s);
  sink += r;
  pthread_barrier_wait(&bar);
  return NULL;
}
/* Seconds for `threads` threads each running n iterations, timed barrier to barrier. */
static double timed(int threads, long n) {
  pthread_t th[1024]; iters = n;
  pthread_barrier_init(&bar, NULL, threads + 1);
  for (long t = 0; t < threads; t++) pthread_create(&th[t], NULL, worker, (void *)t);
  pthread_barrier_wait(&bar);
  double t0 = now();
  pthread_barrier_wait(&bar);
  double dt = now() - t0;
  for (int t = 0; t < threads; t++) pthread_join(th[t], NULL);
  pthread_barrier_destroy(&bar);
  return dt;
}
/* usage: fma_peak WIDTH THREADS -> best GFLOP/s of 5 runs of ~50 ms */
int main(int argc, char **argv) {
  if (argc < 3) return 2;
  width = atoi(argv[1]); int threads = atoi(argv[2]);
  if (threads < 1 || threads > 1024 || (width != 512 && width != 256)) return 2;
  long n = 1000;
  while (timed(threads, n) < 0.05 && n < (1L << 40)) n *= 2;
  double best = 0;
  for (int r = 0; r < 5; r++) {
    double dt = timed(threads, n);
    double g = 2.0 * (width == 512 ? 24 : 12) * (width / 32) * (double)n * threads / dt / 1e9;
    if (g > best) best = g;
  }
  printf("%.3f\n", best);
  return 0;
}
"""


def _binary():
    """Compile the FMA loop once per source version and compiler; the path, or an error string."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha1((_SRC + cc).encode()).hexdigest()[:12]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastconv-bench")
    path = os.path.join(cache, f"fma_peak-{key}")
    if os.path.exists(path):
        return path, None
    try:
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "fma_peak.c")
            with open(src, "w") as f:
                f.write(_SRC)
            out = os.path.join(tmp, "fma_peak")
            proc = subprocess.run([cc, "-O2", "-pthread", "-o", out, src], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                return None, f"{cc} failed: {proc.stderr.strip()[-300:]}"
            os.replace(out, path)  # atomic: concurrent benchmarks may race here
        return path, None
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _fma_peak(simd, threads):
    if "avx2" not in simd or "fma" not in simd:
        return None, "the CPU lacks AVX2+FMA"
    exe, err = _binary()
    if exe is None:
        return None, err
    widths = [512, 256] if "avx512f" in simd else [256]
    per = {}
    for w in widths:
        try:
            proc = subprocess.run([exe, str(w), str(threads)], capture_output=True, text=True, timeout=60)
            per[w] = float(proc.stdout.strip())
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
    best = max(per, key=per.get)
    return {"gflops": per[best], "method": f"fma-loop: C, {best}-bit FMAs, {24 if best == 512 else 12} chains per thread, {threads} threads",
            "kind": "measured peak", "by_width": {f"{w}-bit": round(g, 2) for w, g in per.items()}}, None


def _mm_peak(threads, n=2048):
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return {"gflops": 2.0 * n ** 3 / best / 1e9, "method": f"torch.mm {n}x{n}x{n} fp32, {threads} threads",
            "kind": "lower bound (a GEMM, not the FMA peak)"}


def measure_peak(cpu, threads, method="auto"):
    """{"gflops", "method", "kind", ...}: fp32 FLOP/s of `threads` threads. method: auto (FMA loop,
    else torch.mm), fma, mm, or off (returns None)."""
    if method == "off":
        return None
    if method in ("auto", "fma"):
        res, err = _fma_peak(cpu.get("simd", []), threads)
        if res is not None:
            res["per_thread_gflops"] = res["gflops"] / threads
            return res
        if method == "fma":
            raise SystemExit(f"--peak fma: cannot run the FMA loop ({err})")
    res = _mm_peak(threads)
    res["per_thread_gflops"] = res["gflops"] / threads
    if method == "auto":
        res["note"] = f"FMA loop unavailable ({err})"
    return res


# Dense (no sparsity) GPU peaks from NVIDIA's datasheets, keyed by substrings of the CUDA device name.
# fp32 = CUDA-core FP32 (no tensor cores); tf32/fp16 = tensor-core dense; bw = HBM bandwidth.
GPU_PEAKS = [
    ("H200 NVL", {"name": "H200 NVL", "fp64": 30e12, "fp32": 60e12, "tf32": 417e12, "fp16": 835e12, "bw": 4.8e12}),
    ("H200", {"name": "H200 SXM", "fp64": 34e12, "fp32": 67e12, "tf32": 494.7e12, "fp16": 989.4e12, "bw": 4.8e12}),
    ("H100 NVL", {"name": "H100 NVL", "fp64": 30e12, "fp32": 60e12, "tf32": 417e12, "fp16": 835e12, "bw": 3.9e12}),
    ("H100 PCIe", {"name": "H100 PCIe", "fp64": 25.6e12, "fp32": 51.2e12, "tf32": 378e12, "fp16": 756e12,
                   "bw": 2.0e12}),
    ("H100 80GB HBM3", {"name": "H100 SXM", "fp64": 34e12, "fp32": 67e12, "tf32": 494.7e12, "fp16": 989.4e12,
                        "bw": 3.35e12}),
    ("H100 SXM", {"name": "H100 SXM", "fp64": 34e12, "fp32": 67e12, "tf32": 494.7e12, "fp16": 989.4e12, "bw": 3.35e12}),
]


def gpu_peaks(device_name):
    for key, peaks in GPU_PEAKS:
        if key.lower() in device_name.lower():
            return peaks
    return None


def gpu_peak_flops(peaks, dtype_name, tf32):
    if peaks is None:
        return None
    if dtype_name == "float64":
        return peaks["fp64"]
    if dtype_name == "float32":
        return peaks["tf32"] if tf32 else peaks["fp32"]
    return peaks["fp16"]


def cpu_peak_flops(peak, dtype_name):
    """FLOP/s of the measured fp32 peak for a dtype: half for float64; float16/bfloat16 run in float32
    on the CPU."""
    if not peak:
        return None
    return peak["gflops"] * 1e9 / (2 if dtype_name == "float64" else 1)
