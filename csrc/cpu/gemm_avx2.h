// The float32 GEMM of the portable conv path on CPUs with AVX2 + FMA but without AVX-512 (AMD Zen 2/3,
// Intel client cores before Ice Lake: most laptops), in place of at::mm per column tile.
//
// BLIS-style: A (the operand whose rows are output rows: weights, or grad_output in backward-weight) is
// packed once into micro-panels of 6 rows (k-major, 6 floats per step of the reduction); B is packed per
// block of at most 256 reduction rows into micro-panels of 16 columns (64-byte aligned rows, so its two
// vector loads per step never split a cache line). The 6x16 micro-kernel holds its tile in 12 of the 16
// ymm registers and issues two loads of B and six broadcasts of A per 12 FMAs. Why not at::mm: the
// column tiles are small (a band of output rows: 13-200 columns), and MKL's per-call dispatch and its own
// packing of both operands on every call took 2.7x torch's time on AlexNet's conv2 forward (Zen 3).
//
// B comes from a row-major matrix (RowsB: im2col column tiles, grad_output planes) or from one stored
// transposed (ColsB: backward-weight reads the column tile as B(pixel, column row), so neither operand
// needs a transposed copy).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include <c10/util/Exception.h>

#include "cpu/gemm.h"

#if FASTCONV_HAVE_AVX512_KERNELS  // x86-64 with GCC/Clang: the intrinsics are there
#define FASTCONV_HAVE_AVX2_GEMM 1
#else
#define FASTCONV_HAVE_AVX2_GEMM 0
#endif

namespace fastconv {
namespace cpu {
namespace avx2 {

// Whether the portable path's float32 GEMMs run here: AVX2 + FMA without the AVX-512 engine.
// FASTCONV_CPU_GEMM=aten turns it off (at::mm everywhere); FASTCONV_CPU_GEMM=avx2 turns it on on
// AVX-512 CPUs too (the engine off), to measure or test it there.
inline bool available() {
#if FASTCONV_HAVE_AVX2_GEMM
  static const bool yes = [] {
    const char* env = std::getenv("FASTCONV_CPU_GEMM");
    if (env && std::string(env) == "aten") return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !has_avx512();
  }();
  return yes;
#else
  return false;
#endif
}

#if FASTCONV_HAVE_AVX2_GEMM
#define FASTCONV_AVX2 __attribute__((target("avx2,fma")))

constexpr int kMR = 6;         // rows of A per micro-tile
constexpr int kNR = 16;        // columns of B per micro-tile (two ymm)
constexpr int64_t kKC = 256;   // reduction rows per block: a 16 x 256 B micro-panel is 16 KiB (L1)
constexpr int64_t kMC = 96;    // rows of A per block: 96 x 256 floats = 96 KiB (L2)
constexpr int64_t kNC = 2048;  // columns of B packed at once (2 MiB at kKC)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Floats a packed A of M x K takes (the tail micro-panel is padded to 6 rows with zeros).
inline int64_t packed_a_floats(int64_t M, int64_t K) { return ceil_div(M, kMR) * kMR * K; }

// A(i, k) = a[i*a_rs + k*a_cs] into dst: micro-panel p holds rows [6p, 6p + 6), element (i, k) at
// dst[p*K*6 + k*6 + i - 6p]; rows past M are zero (their results are never stored).
inline void pack_a(int64_t M, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, float* dst) {
  for (int64_t p = 0; p < ceil_div(M, kMR); ++p) {
    float* panel = dst + p * K * kMR;
    const int64_t rows = std::min<int64_t>(kMR, M - p * kMR);
    for (int64_t i = 0; i < rows; ++i) {
      const float* src = a + (p * kMR + i) * a_rs;
      for (int64_t k = 0; k < K; ++k) panel[k * kMR + i] = src[k * a_cs];
    }
    for (int64_t i = rows; i < kMR; ++i) {
      for (int64_t k = 0; k < K; ++k) panel[k * kMR + i] = 0.0f;
    }
  }
}

// A packed by pack_a: M x K.
struct PackedA {
  const float* data;
  int64_t M, K;
};

// 64-byte aligned per-thread scratch, grown on demand (the packed B blocks).
struct Scratch {
  std::unique_ptr<float, decltype(&std::free)> mem{nullptr, &std::free};
  int64_t size = 0;
  float* get(int64_t n) {
    if (n > size) {
      const size_t bytes = ((static_cast<size_t>(n) * sizeof(float) + 63) / 64) * 64;
      mem.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      TORCH_CHECK(mem, "fastconv: out of memory allocating ", bytes, " bytes of scratch");
      size = n;
    }
    return mem.get();
  }
};

// B(k, n) = b[k*ldb + n]
struct RowsB {
  const float* b;
  int64_t ldb;
};
// B(k, n) = bt[n*ld + k]
struct ColsB {
  const float* bt;
  int64_t ld;
};

// B[k0, k0+kc) x [n0, n0+nc) into micro-panels of 16 columns: panel j, row k at dst[(j*kc + k)*16];
// columns past nc are zero.
FASTCONV_AVX2 inline void pack_b(const RowsB& s, int64_t k0, int64_t kc, int64_t n0, int64_t nc, float* dst) {
  for (int64_t j = 0; j * kNR < nc; ++j) {
    float* panel = dst + j * kc * kNR;
    const int64_t w = std::min<int64_t>(kNR, nc - j * kNR);
    const float* src = s.b + k0 * s.ldb + n0 + j * kNR;
    if (w == kNR) {
      for (int64_t k = 0; k < kc; ++k) {
        _mm256_store_ps(panel + k * kNR, _mm256_loadu_ps(src + k * s.ldb));
        _mm256_store_ps(panel + k * kNR + 8, _mm256_loadu_ps(src + k * s.ldb + 8));
      }
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        for (int64_t l = 0; l < w; ++l) panel[k * kNR + l] = src[k * s.ldb + l];
        for (int64_t l = w; l < kNR; ++l) panel[k * kNR + l] = 0.0f;
      }
    }
  }
}

// r[i] (row i of an 8 x 8 block) becomes column i.
FASTCONV_AVX2 inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

FASTCONV_AVX2 inline void pack_b(const ColsB& s, int64_t k0, int64_t kc, int64_t n0, int64_t nc, float* dst) {
  for (int64_t j = 0; j * kNR < nc; ++j) {
    float* panel = dst + j * kc * kNR;
    const int64_t w = std::min<int64_t>(kNR, nc - j * kNR);
    for (int64_t h = 0; h < kNR; h += 8) {  // columns [h, h + 8) of the panel: rows of bt
      const int64_t hw = std::clamp<int64_t>(w - h, 0, 8);
      const float* src = s.bt + (n0 + j * kNR + h) * s.ld + k0;
      int64_t k = 0;
      if (hw == 8) {
        for (; k + 8 <= kc; k += 8) {
          __m256 r[8];
          for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * s.ld + k);
          transpose8(r);
          for (int i = 0; i < 8; ++i) _mm256_store_ps(panel + (k + i) * kNR + h, r[i]);
        }
      }
      for (; k < kc; ++k) {
        for (int64_t l = 0; l < hw; ++l) panel[k * kNR + h + l] = src[l * s.ld + k];
        for (int64_t l = hw; l < 8; ++l) panel[k * kNR + h + l] = 0.0f;
      }
    }
  }
}

// Lanes [0, n) of 8 (n clamped to [0, 8]) as a maskload/maskstore mask.
FASTCONV_AVX2 inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::clamp<int64_t>(n, 0, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// c[i*ldc + l] (i < mr, l < nr) = init + sum_k a[k*6 + i] * b[k*16 + l]: init is C (kAccumulate), bias[i]
// (kBias) or 0.
FASTCONV_AVX2 inline void micro_kernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int mr,
                                       int nr, Init init, const float* bias) {
  __m256 acc[kMR][2];
  _Pragma("GCC unroll 6") for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  _Pragma("GCC unroll 2") for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * kNR), b1 = _mm256_load_ps(b + k * kNR + 8);
    _Pragma("GCC unroll 6") for (int i = 0; i < kMR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + k * kMR + i);
      acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
    }
  }
  if (mr == kMR && nr == kNR) {
    _Pragma("GCC unroll 6") for (int i = 0; i < kMR; ++i) {
      float* row = c + i * ldc;
      __m256 r0 = acc[i][0], r1 = acc[i][1];
      if (init == Init::kAccumulate) {
        r0 = _mm256_add_ps(r0, _mm256_loadu_ps(row));
        r1 = _mm256_add_ps(r1, _mm256_loadu_ps(row + 8));
      } else if (init == Init::kBias) {
        const __m256 bv = _mm256_broadcast_ss(bias + i);
        r0 = _mm256_add_ps(r0, bv);
        r1 = _mm256_add_ps(r1, bv);
      }
      _mm256_storeu_ps(row, r0);
      _mm256_storeu_ps(row + 8, r1);
    }
    return;
  }
  const __m256i m0 = first_lanes(nr), m1 = first_lanes(nr - 8);
  // (unrolled with constant indices: a runtime index into acc would keep the accumulators in memory)
  _Pragma("GCC unroll 6") for (int i = 0; i < kMR; ++i) {
    if (i >= mr) break;
    float* row = c + i * ldc;
    __m256 r0 = acc[i][0], r1 = acc[i][1];
    if (init == Init::kAccumulate) {
      r0 = _mm256_add_ps(r0, _mm256_maskload_ps(row, m0));
      r1 = _mm256_add_ps(r1, _mm256_maskload_ps(row + 8, m1));
    } else if (init == Init::kBias) {
      const __m256 bv = _mm256_broadcast_ss(bias + i);
      r0 = _mm256_add_ps(r0, bv);
      r1 = _mm256_add_ps(r1, bv);
    }
    _mm256_maskstore_ps(row, m0, r0);
    _mm256_maskstore_ps(row + 8, m1, r1);
  }
}

// C[M][N] (rows ldc apart) = init + A B: init is C when accumulate, else bias[m] (or 0 without bias).
// Single-threaded (the conv path runs one call per work item on each thread).
template <typename BSrc>
FASTCONV_AVX2 void gemm(const PackedA& A, int64_t N, const BSrc& b, float* c, int64_t ldc, const float* bias,
                        bool accumulate) {
  const int64_t M = A.M, K = A.K;
  const Init init = accumulate ? Init::kAccumulate : bias ? Init::kBias : Init::kZero;
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M && !accumulate; ++i) std::fill(c + i * ldc, c + i * ldc + N, bias ? bias[i] : 0.0f);
    return;
  }
  static thread_local Scratch scratch;
  const int64_t kblocks = ceil_div(K, kKC), kc_max = ceil_div(K, kblocks);
  float* packed_b = scratch.get(kc_max * ceil_div(std::min(N, kNC), kNR) * kNR);
  for (int64_t n0 = 0; n0 < N; n0 += kNC) {
    const int64_t nc = std::min(kNC, N - n0);
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const int64_t k0 = kb * K / kblocks, kc = (kb + 1) * K / kblocks - k0;
      pack_b(b, k0, kc, n0, nc, packed_b);
      const Init block_init = kb == 0 ? init : Init::kAccumulate;
      for (int64_t m0 = 0; m0 < M; m0 += kMC) {
        const int64_t m1 = std::min(M, m0 + kMC);
        for (int64_t j = 0; j * kNR < nc; ++j) {
          const float* bp = packed_b + j * kc * kNR;
          const int nr = int(std::min<int64_t>(kNR, nc - j * kNR));
          for (int64_t i = m0; i < m1; i += kMR) {
            micro_kernel(kc, A.data + (i / kMR) * K * kMR + k0 * kMR, bp, c + i * ldc + n0 + j * kNR, ldc,
                         int(std::min<int64_t>(kMR, m1 - i)), nr, block_init, bias ? bias + i : nullptr);
          }
        }
      }
    }
  }
}

#endif  // FASTCONV_HAVE_AVX2_GEMM

}  // namespace avx2
}  // namespace cpu
}  // namespace fastconv
