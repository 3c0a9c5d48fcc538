// Small float32 GEMM micro-kernels for the conv tiles, AVX-512, chosen at run time.
//
// Why not at::mm: on the CPUs this project is tuned on (AMD Zen 5) MKL takes its AVX2 path and
// reaches about half of the core's AVX-512 FMA peak, and each at::mm call costs several
// microseconds of dispatch, which dominates the many small per-tile products of a small conv
// (LeNet's 16x150x64). These kernels run straight on the raw tile pointers. Other dtypes and CPUs
// without AVX-512 use at::mm_out (see conv2d.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTCONV_HAVE_AVX512_KERNELS 1
#else
#define FASTCONV_HAVE_AVX512_KERNELS 0
#endif

namespace fastconv {
namespace cpu {

// FASTCONV_CPU_GEMM=aten turns every AVX-512 kernel off (these GEMMs and the stride-2 max-pool), to
// compare against or to test the portable paths.
inline bool has_avx512() {
#if FASTCONV_HAVE_AVX512_KERNELS
  static const bool yes = [] {
    const char* env = std::getenv("FASTCONV_CPU_GEMM");
    return __builtin_cpu_supports("avx512f") && !(env && std::string(env) == "aten");
  }();
  return yes;
#else
  return false;
#endif
}

#if FASTCONV_HAVE_AVX512_KERNELS
#define FASTCONV_AVX512 __attribute__((target("avx512f")))

namespace detail {

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// MR rows x NR (32 or 16) columns of C = init + sum_k A(m, k) * B[k][n]; A(m, k) = a[m*a_rs + k*a_cs].
template <int MR, int NR>
FASTCONV_AVX512 inline void nn_tile(int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                                    int64_t ldb, float* c, int64_t ldc, __mmask16 m0, __mmask16 m1,
                                    const float* bias, bool load_c) {
  __m512 acc0[MR], acc1[MR];
  _Pragma("GCC unroll 16")
  for (int i = 0; i < MR; ++i) {
    if (load_c) {
      acc0[i] = _mm512_maskz_loadu_ps(m0, c + i * ldc);
      if constexpr (NR == 32) acc1[i] = _mm512_maskz_loadu_ps(m1, c + i * ldc + 16);
    } else {
      acc0[i] = bias ? _mm512_set1_ps(bias[i]) : _mm512_setzero_ps();
      if constexpr (NR == 32) acc1[i] = acc0[i];
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + k * ldb);
    __m512 b1;
    if constexpr (NR == 32) b1 = _mm512_maskz_loadu_ps(m1, b + k * ldb + 16);
    const float* ak = a + k * a_cs;
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(ak[i * a_rs]);
      acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
      if constexpr (NR == 32) acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
    }
  }
  _Pragma("GCC unroll 16")
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(c + i * ldc, m0, acc0[i]);
    if constexpr (NR == 32) _mm512_mask_storeu_ps(c + i * ldc + 16, m1, acc1[i]);
  }
}

template <int NR>
FASTCONV_AVX512 inline void nn_rows(int64_t mr, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                                    int64_t ldb, float* c, int64_t ldc, __mmask16 m0, __mmask16 m1, const float* bias,
                                    bool load_c) {
  switch (mr) {
    case 8: nn_tile<8, NR>(K, a, a_rs, a_cs, b, ldb, c, ldc, m0, m1, bias, load_c); break;
    case 7: nn_tile<7, NR>(K, a, a_rs, a_cs, b, ldb, c, ldc, m0, m1, bias, load_c); break;
    case 6: nn_tile<6, NR>(K, a, a_rs, a_cs, b, ldb, c, ldc, m0, m1, bias, load_c); break;
    case 5: nn_tile<5, NR>(K, a, a_rs, a_cs, b, ldb, c, ldc, m0, m1, bias, load_c); break;
    case 4: nn_tile<4, NR>(K, a, a_rs, a_cs, b, ldb, c, ldc, m0, m1, bias, load_c); break;
    case 3: nn_tile<3, NR>(K, a, a_rs, a_cs, b, ldb, c, ldc, m0, m1, bias, load_c); break;
    case 2: nn_tile<2, NR>(K, a, a_rs, a_cs, b, ldb, c, ldc, m0, m1, bias, load_c); break;
    default: nn_tile<1, NR>(K, a, a_rs, a_cs, b, ldb, c, ldc, m0, m1, bias, load_c); break;
  }
}

}  // namespace detail

// C[M][N] (rows ldc apart) = init + sum_k A(m, k) * B[k][n], with A(m, k) = a[m*a_rs + k*a_cs] and
// B row-major (rows ldb apart). init is C itself when accumulate, else bias[m] (or 0 without bias).
FASTCONV_AVX512 inline void gemm_nn_avx512(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs,
                                           int64_t a_cs, const float* b, int64_t ldb, float* c, int64_t ldc,
                                           const float* bias, bool accumulate) {
  // k-blocks of at most 320 rows: a 320 x 32 panel of B (40 KiB) stays in L1 across the rows of A
  const int64_t k_blocks = std::max<int64_t>(1, (K + 319) / 320);
  const int64_t block_k = std::max<int64_t>(1, (K + k_blocks - 1) / k_blocks);
  for (int64_t k0 = 0; k0 < std::max<int64_t>(K, 1); k0 += block_k) {
    const int64_t kc = std::min(block_k, K - k0);
    const bool load_c = accumulate || k0 > 0;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      const __mmask16 m0 = detail::tail_mask(N - n0);
      const __mmask16 m1 = N - n0 > 16 ? detail::tail_mask(N - n0 - 16) : __mmask16(0);
      const float* bp = b + k0 * ldb + n0;
      for (int64_t i0 = 0; i0 < M; i0 += 8) {
        const float* ap = a + i0 * a_rs + k0 * a_cs;
        float* cp = c + i0 * ldc + n0;
        const float* bi = bias ? bias + i0 : nullptr;
        if (N - n0 > 16) {
          detail::nn_rows<32>(std::min<int64_t>(8, M - i0), kc, ap, a_rs, a_cs, bp, ldb, cp, ldc, m0, m1, bi, load_c);
        } else {  // a tail of at most 16 columns: half the FMAs
          detail::nn_rows<16>(std::min<int64_t>(8, M - i0), kc, ap, a_rs, a_cs, bp, ldb, cp, ldc, m0, m1, bi, load_c);
        }
      }
    }
    if (K == 0) break;
  }
}

#undef FASTCONV_AVX512
#endif  // FASTCONV_HAVE_AVX512_KERNELS

}  // namespace cpu
}  // namespace fastconv
