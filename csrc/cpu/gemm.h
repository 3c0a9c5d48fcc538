// The float32 AVX-512 register-blocked GEMM micro-kernel that every CPU conv pass runs on.
//
// One call computes a tile of MR (<= 8) rows x NV (<= 3) vectors of 16 columns: 24 zmm accumulators,
// three vector loads of B and eight broadcasts of A per step of the reduction (11 loads per 24 FMAs).
// The columns are the contiguous dimension of the output (pixels of an NCHW plane in the forward
// pass, output channels in backward-weight), so results are stored straight into the tensor,
// without a transpose pass. A is read through two strides (packed weights: 8 consecutive floats per
// step; raw column rows: one float per step); B is a packed panel whose rows are `ldb` floats apart.
// The blocking around it (what sits in L1, what streams from L2) is in conv2d_avx512.h.
//
// Why not at::mm: on AMD Zen MKL takes its AVX2 path (half of the AVX-512 peak on Zen 5) and each
// at::mm call costs microseconds of dispatch, which dominates many small per-tile products.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTCONV_HAVE_AVX512_KERNELS 1
#else
#define FASTCONV_HAVE_AVX512_KERNELS 0
#endif

namespace fastconv {
namespace cpu {

// An environment switch, read per call: 1 where `name` is `on`, 0 where it is `off`, else -1 (the rules
// decide).
inline int forced(const char* name, char off, char on) {
  const char* e = std::getenv(name);
  if (!e || (e[0] != off && e[0] != on) || e[1] != 0) return -1;
  return e[0] == on;
}

// FASTCONV_CPU_GEMM=aten (or =avx2, cpu/gemm_avx2.h) turns every AVX-512 kernel off (the conv engine and
// the stride-2 max-pool), to compare against or to test the portable paths.
inline bool has_avx512() {
#if FASTCONV_HAVE_AVX512_KERNELS
  static const bool yes = [] {
    const char* env = std::getenv("FASTCONV_CPU_GEMM");
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2") &&
           !(env && (std::string(env) == "aten" || std::string(env) == "avx2"));
  }();
  return yes;
#else
  return false;
#endif
}

// Intel CPUs with AVX-512 (Xeon Skylake-SP and later: two 512-bit FMA units per core), where the
// GEMM's FMAs take half the cycles they take on AMD Zen 4, and the work around them weighs more;
// the algorithm rules that differ by host key on this (cpu/conv2d.cpp, winograd_wanted).
inline bool intel_avx512() {
#if FASTCONV_HAVE_AVX512_KERNELS
  static const bool yes = has_avx512() && __builtin_cpu_is("intel");
  return yes;
#else
  return false;
#endif
}

#if FASTCONV_HAVE_AVX512_KERNELS
#define FASTCONV_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma,bmi2")))

// `p` held in one register, for a run of loads from it. Intel cores split a load folded into an FMA
// whose address has an index register (base + index*scale: the compiler's choice for p = base +
// offset[k]) into two uops at rename, where base + displacement stays one: on an Emerald Rapids core
// the grouped kernel's loop (14 broadcast-FMAs a step, data in L1) ran at 64 GFLOP/s with the index
// folded into every load and 104 with the pointer held, alternated in one process. The empty asm makes
// the compiler materialise the pointer (no instruction is emitted). (AMD Zen cores keep both forms one
// macro-op; not measured here.)
template <typename T>
inline T* in_register(T* p) {
  __asm__("" : "+r"(p));
  return p;
}

constexpr int kTileRows = 8;     // MR: rows of A broadcast per step
constexpr int kTileVectors = 3;  // NV: zmm vectors of B per step
constexpr int kTileCols = 16 * kTileVectors;

inline __mmask16 lane_mask(int64_t lo, int64_t hi) {  // lanes [lo, hi) of 16, clamped
  lo = std::clamp<int64_t>(lo, 0, 16);
  hi = std::clamp<int64_t>(hi, lo, 16);
  return __mmask16(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

// One output vector under mask m: non-temporal (no read of its line first) where `stream` and the vector
// is whole and 64-byte aligned; the caller fences (_mm_sfence) before its results are read elsewhere.
FASTCONV_AVX512 __attribute__((always_inline)) inline void store_vector(float* out, __mmask16 m, __m512 v,
                                                                        bool stream) {
  if (stream && m == __mmask16(0xFFFF) && (reinterpret_cast<uintptr_t>(out) & 63) == 0) {
    _mm512_stream_ps(out, v);
  } else {
    _mm512_mask_storeu_ps(out, m, v);
  }
}

// Per vector of `vectors` 16-lane vectors, the mask of the lanes that keep(i) picks (i the flat lane
// index over all vectors).
template <typename Keep>
inline std::vector<__mmask16> lane_masks(int64_t vectors, Keep keep) {
  std::vector<__mmask16> masks(vectors);
  for (int64_t j = 0; j < vectors; ++j) {
    uint32_t m = 0;
    for (int l = 0; l < 16; ++l) {
      if (keep(16 * j + l)) m |= 1u << l;
    }
    masks[j] = __mmask16(m);
  }
  return masks;
}

// permutex2var(a, ., b) indices interleaving lanes 0-7 (lo) or 8-15 (hi) of a and b: a0 b0 a1 b1 ...
FASTCONV_AVX512 inline __m512i interleave_lo() {
  return _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
}
FASTCONV_AVX512 inline __m512i interleave_hi() {
  return _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
}

// Where a tile's results go: vector v of row i lands at ptr[v][s] + i*ldc under mask[v][s], for the
// (at most two) segments s a vector can straddle (two images of a flattened pixel range).
struct TileDest {
  float* ptr[kTileVectors][2];
  __mmask16 mask[kTileVectors][2];
  int64_t ldc;
};

enum class Init { kZero, kBias, kAccumulate };

// Where the micro-kernel reads B. PanelB: a packed panel, row k at b + k*ldb (64-byte aligned when
// ldb is a multiple of 16). OffsetB: straight from a zero-padded input image, vector v of row k at
// base[v] + koff[k] (each vector a run of one output row; stride-1 convolutions, no packing at all).
struct PanelB {
  const float* b;
  int64_t ldb;
  FASTCONV_AVX512 __m512 load(int64_t k, int v) const { return _mm512_loadu_ps(b + k * ldb + 16 * v); }
};
struct OffsetB {
  const float* base[kTileVectors];
  const int64_t* koff;
  FASTCONV_AVX512 __m512 load(int64_t k, int v) const { return _mm512_loadu_ps(base[v] + koff[k]); }
};
// OffsetB for rows of at most 8 pixels: lanes 0-7 of vector v from base[v], lanes 8-15 from second[v]
// (two output rows per vector, so short rows do not leave half the lanes idle).
struct TwoRowOffsetB {
  const float* base[kTileVectors];
  const float* second[kTileVectors];
  const int64_t* koff;
  FASTCONV_AVX512 __m512 load(int64_t k, int v) const {
    return _mm512_mask_loadu_ps(_mm512_loadu_ps(base[v] + koff[k]), __mmask16(0xFF00), second[v] + koff[k]);
  }
};

// The reduction a micro-kernel call runs over: every k in [0, K) (WholeK), or the k of a list of runs
// [begin, end) (KRuns: taps that read only zero padding skipped, forward_padded_direct).
struct WholeK {
  int64_t K;
  int64_t count() const { return 1; }
  int64_t begin(int64_t) const { return 0; }
  int64_t end(int64_t) const { return K; }
};
struct KRun {
  int64_t begin, end;
};
struct KRuns {
  const KRun* runs;
  int64_t n;
  int64_t count() const { return n; }
  int64_t begin(int64_t r) const { return runs[r].begin; }
  int64_t end(int64_t r) const { return runs[r].end; }
};

// acc = init + sum_k A(i, k) * B(k, 16v + lane) over the k of `red`; A(i, k) = a[i*a_rs + k*a_cs]. Only
// lanes under the masks of d are written (B's other lanes may hold anything).
template <int MR, int NV, typename BSrc, typename Red>
FASTCONV_AVX512 inline void micro_kernel(const Red& red, const float* a, int64_t a_rs, int64_t a_cs, const BSrc& bs,
                                         const TileDest& d, Init init, const float* bias, bool relu) {
  __m512 acc[MR][NV];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  const float* ar[MR];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) ar[i] = a + i * a_rs;
  for (int64_t r = 0; r < red.count(); ++r) {
    for (int64_t k = red.begin(r), k1 = red.end(r); k < k1; ++k) {
      __m512 bv[NV];
      _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) bv[v] = bs.load(k, v);
      _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
        const __m512 av = _mm512_set1_ps(ar[i][k * a_cs]);
        _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
      }
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    const __m512 bias_v = init == Init::kBias ? _mm512_set1_ps(bias[i]) : _mm512_setzero_ps();
    _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) {
      __m512 r = acc[i][v];
      float* p0 = d.ptr[v][0] + i * d.ldc;
      float* p1 = d.ptr[v][1] + i * d.ldc;
      const __mmask16 m0 = d.mask[v][0], m1 = d.mask[v][1];
      if (init == Init::kAccumulate) {
        __m512 c = _mm512_maskz_loadu_ps(m0, p0);
        if (m1) c = _mm512_mask_loadu_ps(c, m1, p1);
        r = _mm512_add_ps(r, c);
      } else {
        r = _mm512_add_ps(r, bias_v);
      }
      if (relu) r = _mm512_max_ps(_mm512_setzero_ps(), r);  // NaN (the second operand) stays NaN, as torch.relu
      _mm512_mask_storeu_ps(p0, m0, r);
      if (m1) _mm512_mask_storeu_ps(p1, m1, r);
    }
  }
}

// The same for any mr in [1, 8] and nv in [1, 3] (the tails of a blocked loop); `red` is K (every k in
// [0, K)) or KRuns.
inline WholeK as_reduction(int64_t K) { return {K}; }
inline const KRuns& as_reduction(const KRuns& runs) { return runs; }

template <typename BSrc, typename Red>
FASTCONV_AVX512 inline void run_micro_kernel(int mr, int nv, const Red& red_or_k, const float* a, int64_t a_rs,
                                             int64_t a_cs, const BSrc& bs, const TileDest& d, Init init,
                                             const float* bias, bool relu = false) {
  const auto& red = as_reduction(red_or_k);
#define FASTCONV_MK_CASE(MR)                                            \
  case MR:                                                              \
    if (nv == 3)                                                        \
      micro_kernel<MR, 3>(red, a, a_rs, a_cs, bs, d, init, bias, relu); \
    else if (nv == 2)                                                   \
      micro_kernel<MR, 2>(red, a, a_rs, a_cs, bs, d, init, bias, relu); \
    else                                                                \
      micro_kernel<MR, 1>(red, a, a_rs, a_cs, bs, d, init, bias, relu); \
    break;
  switch (mr) {
    FASTCONV_MK_CASE(8)
    FASTCONV_MK_CASE(7)
    FASTCONV_MK_CASE(6)
    FASTCONV_MK_CASE(5)
    FASTCONV_MK_CASE(4)
    FASTCONV_MK_CASE(3)
    FASTCONV_MK_CASE(2)
    default:
      FASTCONV_MK_CASE(1)
  }
#undef FASTCONV_MK_CASE
}

#endif  // FASTCONV_HAVE_AVX512_KERNELS

}  // namespace cpu
}  // namespace fastconv
