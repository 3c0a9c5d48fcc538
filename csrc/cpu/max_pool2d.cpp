// max_pool2d on the CPU, forward (values + int64 indices) and backward, one (n, c) plane per task.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "conv_params.h"
#include "cpu/gemm.h"       // has_avx512
#include "cpu/gemm_avx2.h"  // avx2::available
#include "cpu/im2col.h"     // valid_range

namespace fastconv {
namespace {

// take ? a : b through bit masks: the compiler must not turn it into a branch (random data
// mispredicts it half the time, which made this kernel twice as slow).
template <typename V>
inline V select_bits(bool take, V a, V b) {
  using U = std::conditional_t<
      sizeof(V) == 8, uint64_t,
      std::conditional_t<sizeof(V) == 4, uint32_t, std::conditional_t<sizeof(V) == 2, uint16_t, uint8_t>>>;
  static_assert(sizeof(V) == sizeof(U), "1-, 2-, 4- or 8-byte values only");
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(V));
  std::memcpy(&ub, &b, sizeof(V));
  const U mask = U(0) - static_cast<U>(take);
  const U r = (ua & mask) | (ub & ~mask);
  V out;
  std::memcpy(&out, &r, sizeof(V));
  return out;
}

// Below every value of type V: -inf for floating types (a window of only -inf still reports its first
// tap), the lowest value for integers (a window of only that value too: ties keep the first).
template <typename V>
constexpr V below_all() {
  return std::numeric_limits<V>::has_infinity ? -std::numeric_limits<V>::infinity() : std::numeric_limits<V>::lowest();
}

// One output row at a time, window offset (kh, kw) outer and output column inner: the inner loop
// is a branch-free running max over contiguous (or strided) input, which the compiler vectorises;
// a data-dependent branch here mispredicts on every other element of random data. Each window
// still visits its elements in torch's order (row by row), so ties (first wins), NaN (last NaN
// wins) and all -inf windows (first in-range element) give torch's exact indices.
#if FASTCONV_HAVE_AVX512_KERNELS
// 2x2 windows, stride 2, inside the input (no padding or dilation), float32: 16 outputs per step. The
// even and odd input columns are split with two-source permutes and the 4 candidates compared in
// torch's visiting order (row by row, column by column) with "greater, or NaN" masks, so ties, NaN
// and -inf give torch's indices exactly. The MNIST CNN, LeNet and SimpleConvNet pool 2x2/2.
// Returns K, or 0 where neither vector kernel applies; `padded`: run max_pool2d_stride2_padded_planes
// below, for windows that reach outside the input (padding, or the ceil mode's clipped last window) and
// for every 3x3 (measured, 2 threads, Zen 4, against the kernel above: AlexNet's 3x3/2 pools 0.64-0.91x
// the time; 2x2 on 8x8 planes 1.3x, so 2x2 windows inside the input stay there).
int max_pool2d_vector_kernel(const Pool2dParams& p, bool& padded) {
  const bool shape = p.kernel_h == p.kernel_w && (p.kernel_h == 2 || p.kernel_h == 3) && p.stride_h == 2 &&
                     p.stride_w == 2 && p.dilation_h == 1 && p.dilation_w == 1 &&
                     p.in_w + 64 < std::numeric_limits<int32_t>::max();  // (columns in int32 lanes)
  if (!shape || !cpu::has_avx512()) return 0;
  const int64_t k = p.kernel_h;
  // every 3x3, and 2x2 windows that reach outside the input (floor mode without padding: none do)
  padded = k == 3 || p.pad_h != 0 || p.pad_w != 0 || 2 * (p.out_h - 1) + k > p.in_h || 2 * (p.out_w - 1) + k > p.in_w;
  return static_cast<int>(k);
}

__attribute__((target("avx512f"))) void max_pool2d_stride2_planes(const float* in, float* out, int64_t* idx,
                                                                  const Pool2dParams& p, int64_t begin, int64_t end) {
  constexpr int K = 2;
  const int64_t W = p.in_w, OW = p.out_w, in_plane = p.in_h * p.in_w, out_plane = p.out_h * p.out_w;
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512i lane2 = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);  // 2 * lane, lanes 0-7
  constexpr int kCand = K * K;
  for (int64_t pl = begin; pl < end; ++pl) {
    const float* src = in + pl * in_plane;
    for (int64_t oh = 0; oh < p.out_h; ++oh) {
      float* dst = out + pl * out_plane + oh * OW;
      int64_t* ind = idx + pl * out_plane + oh * OW;
      for (int64_t ow = 0; ow < OW; ow += 16) {
        const int64_t n = std::min<int64_t>(16, OW - ow);
        // input columns 2*ow .. 2*ow + 2n - 1
        const int64_t cols = 2 * n;
        const __mmask16 lo = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1u);
        const __mmask16 hi = cols > 16 ? __mmask16((1u << (cols - 16)) - 1u) : __mmask16(0);
        __m512 v[kCand];
        int64_t offset[kCand];
        for (int r = 0; r < K; ++r) {
          const float* row = src + (2 * oh + r) * W + 2 * ow;
          const __m512 a0 = _mm512_maskz_loadu_ps(lo, row), a1 = _mm512_maskz_loadu_ps(hi, row + 16);
          v[r * K + 0] = _mm512_permutex2var_ps(a0, even, a1);
          v[r * K + 1] = _mm512_permutex2var_ps(a0, odd, a1);
          offset[r * K + 0] = r * W;
          offset[r * K + 1] = r * W + 1;
        }
        __m512 best = v[0];
        __mmask16 pick[kCand];  // which candidate each lane holds, as masks
        pick[0] = 0xFFFF;
        for (int c = 1; c < kCand; ++c) {
          const __mmask16 take =
              _mm512_cmp_ps_mask(v[c], best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v[c], v[c], _CMP_UNORD_Q);
          best = _mm512_mask_blend_ps(take, best, v[c]);
          for (int d = 0; d < c; ++d) pick[d] &= static_cast<__mmask16>(~take);
          pick[c] = take;
        }
        _mm512_mask_storeu_ps(dst + ow, static_cast<__mmask16>((1u << n) - 1u), best);
        // index = (2*oh)*W + 2*(ow + lane) + offset of the candidate picked
        const int64_t base = 2 * oh * W + 2 * ow;
        for (int half = 0; half < 2; ++half) {
          const int64_t m = std::min<int64_t>(8, n - 8 * half);
          if (m <= 0) break;
          __m512i id = _mm512_add_epi64(_mm512_set1_epi64(base + 16 * half), lane2);
          for (int c = 1; c < kCand; ++c) {
            const __mmask8 sel = static_cast<__mmask8>(pick[c] >> (8 * half));
            id = _mm512_mask_add_epi64(id, sel, id, _mm512_set1_epi64(offset[c]));
          }
          _mm512_mask_storeu_epi64(ind + ow + 8 * half, static_cast<__mmask8>((1u << m) - 1u), id);
        }
      }
    }
  }
}
#endif

// The flat positions (ih*W + iw) of the elements of the window with top-left corner (h0, w0) that lie
// inside the input, in torch's visiting order (row by row), into pos; returns how many.
inline int64_t window_positions(const Pool2dParams& p, int64_t h0, int64_t w0, int64_t* pos) {
  int64_t count = 0;
  for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
    const int64_t ih = h0 + kh * p.dilation_h;
    if (ih < 0 || ih >= p.in_h) continue;
    for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
      const int64_t iw = w0 + kw * p.dilation_w;
      if (iw >= 0 && iw < p.in_w) pos[count++] = ih * p.in_w + iw;
    }
  }
  return count;
}

#if FASTCONV_HAVE_AVX512_KERNELS
// One output pixel of a channels_last float32 max-pool, all C channels, 16 a vector: the running max and
// its int64 position (two vectors of 8) per channel over the window's `count` elements at `pos`, from
// -inf and `first`, taking an element when greater or NaN.
FASTCONV_AVX512 void max_pool2d_pixel_channels_last(const float* image, float* out, int64_t* ind, int64_t C,
                                                    int64_t first, const int64_t* pos, int64_t count) {
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const __mmask16 m = cpu::lane_mask(0, C - c0);
    __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512i lo = _mm512_set1_epi64(first), hi = lo;
    for (int64_t e = 0; e < count; ++e) {
      const __m512 v = _mm512_maskz_loadu_ps(m, image + pos[e] * C + c0);
      const __mmask16 take = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      best = _mm512_mask_mov_ps(best, take, v);
      const __m512i at = _mm512_set1_epi64(pos[e]);
      lo = _mm512_mask_mov_epi64(lo, static_cast<__mmask8>(take), at);
      hi = _mm512_mask_mov_epi64(hi, static_cast<__mmask8>(take >> 8), at);
    }
    _mm512_mask_storeu_ps(out + c0, m, best);
    _mm512_mask_storeu_epi64(ind + c0, static_cast<__mmask8>(m), lo);
    _mm512_mask_storeu_epi64(ind + c0 + 8, static_cast<__mmask8>(m >> 8), hi);
  }
}

// KxK windows (K = 2 or 3), stride 2, with padding (ResNet's 3x3/2 p1) or windows the ceil mode clips,
// float32: 16 outputs per step as above, each candidate taken only in the lanes whose column lies inside
// the input (rows outside are skipped whole), from -inf and the window's first element inside the input,
// as the scalar loop does; positions tracked as two int64 vectors.
template <int K>
FASTCONV_AVX512 void max_pool2d_stride2_padded_planes(const float* in, float* out, int64_t* idx, const Pool2dParams& p,
                                                      int64_t begin, int64_t end) {
  const int64_t H = p.in_h, W = p.in_w, OW = p.out_w, in_plane = H * W, out_plane = p.out_h * OW;
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512i lane2 = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);  // 2 * lane, lanes 0-7
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t pl = begin; pl < end; ++pl) {
    const float* src = in + pl * in_plane;
    for (int64_t oh = 0; oh < p.out_h; ++oh) {
      const int64_t h0 = 2 * oh - p.pad_h, h_first = std::max<int64_t>(h0, 0);
      float* dst = out + pl * out_plane + oh * OW;
      int64_t* ind = idx + pl * out_plane + oh * OW;
      for (int64_t ow = 0; ow < OW; ow += 16) {
        const int64_t n = std::min<int64_t>(16, OW - ow), w0 = 2 * ow - p.pad_w;  // lane l's window: w0 + 2l
        const __mmask16 lanes = cpu::lane_mask(0, n);
        // the lanes whose candidate kw lies in [0, W): 0 <= w0 + 2l + kw < W
        __mmask16 inside[K];
        const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(w0)), _mm512_add_epi32(iota, iota));
        for (int kw = 0; kw < K; ++kw) {
          const __m512i c = _mm512_add_epi32(col, _mm512_set1_epi32(kw));
          inside[kw] = _mm512_mask_cmpge_epi32_mask(lanes, c, _mm512_setzero_si512()) &
                       _mm512_cmplt_epi32_mask(c, _mm512_set1_epi32(static_cast<int32_t>(W)));
        }
        // columns w0 .. w0 + 33 of a row, bit j for column w0 + j, those inside the input (the masked
        // loads touch no other)
        const int64_t skip = std::clamp<int64_t>(-w0, 0, 34);
        const uint64_t cols = (((uint64_t(1) << std::clamp<int64_t>(W - w0, 0, 34)) - 1) >> skip) << skip;
        __m512 best = minus_inf;
        // the window's first element inside the input: row h_first, column max(w0 + 2l, 0)
        const __m512i first = _mm512_max_epi32(col, _mm512_setzero_si512());
        __m512i at_lo =
            _mm512_add_epi64(_mm512_set1_epi64(h_first * W), _mm512_cvtepi32_epi64(_mm512_castsi512_si256(first)));
        __m512i at_hi = _mm512_add_epi64(_mm512_set1_epi64(h_first * W),
                                         _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(first, 1)));
        for (int r = 0; r < K; ++r) {
          const int64_t ih = h0 + r;
          if (ih < 0 || ih >= H) continue;
          const float* row = src + ih * W + w0;
          const __m512 a0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(cols), row);
          const __m512 a1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(cols >> 16), row + 16);
          __m512 v[K];
          v[0] = _mm512_permutex2var_ps(a0, even, a1);
          v[1] = _mm512_permutex2var_ps(a0, odd, a1);
          if constexpr (K == 3) {  // column w0 + 2l + 2: the even columns from w0 + 2
            const uint64_t c2 = cols >> 2;
            const __m512 b0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(c2), row + 2);
            const __m512 b1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(c2 >> 16), row + 18);
            v[2] = _mm512_permutex2var_ps(b0, even, b1);
          }
          for (int kw = 0; kw < K; ++kw) {
            const __mmask16 take = inside[kw] & (_mm512_cmp_ps_mask(v[kw], best, _CMP_GT_OQ) |
                                                 _mm512_cmp_ps_mask(v[kw], v[kw], _CMP_UNORD_Q));
            best = _mm512_mask_mov_ps(best, take, v[kw]);
            const __m512i pos = _mm512_add_epi64(_mm512_set1_epi64(ih * W + w0 + kw), lane2);
            at_lo = _mm512_mask_mov_epi64(at_lo, static_cast<__mmask8>(take), pos);
            at_hi = _mm512_mask_mov_epi64(at_hi, static_cast<__mmask8>(take >> 8),
                                          _mm512_add_epi64(pos, _mm512_set1_epi64(16)));
          }
        }
        _mm512_mask_storeu_ps(dst + ow, lanes, best);
        _mm512_mask_storeu_epi64(ind + ow, static_cast<__mmask8>(lanes), at_lo);
        _mm512_mask_storeu_epi64(ind + ow + 8, static_cast<__mmask8>(lanes >> 8), at_hi);
      }
    }
  }
}
#endif

template <typename T>
void max_pool2d_forward_kernel(const T* in, T* out, int64_t* idx, const Pool2dParams& p) {
#if FASTCONV_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    bool padded = false;
    if (const int k = max_pool2d_vector_kernel(p, padded)) {
      at::parallel_for(0, p.batch * p.channels, 16, [&](int64_t begin, int64_t end) {
        if (!padded) {
          max_pool2d_stride2_planes(in, out, idx, p, begin, end);
        } else {
          (k == 2 ? max_pool2d_stride2_padded_planes<2> : max_pool2d_stride2_padded_planes<3>)(in, out, idx, p, begin,
                                                                                               end);
        }
      });
      return;
    }
  }
#endif
  const int64_t planes = p.batch * p.channels, in_plane = p.in_h * p.in_w, out_plane = p.out_h * p.out_w;
  const int64_t OW = p.out_w;
  using acc_t = at::opmath_type<T>;
  at::parallel_for(0, planes, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> best(OW);
    std::vector<int64_t> where(OW);
    for (int64_t pl = begin; pl < end; ++pl) {
      const T* src = in + pl * in_plane;
      for (int64_t oh = 0; oh < p.out_h; ++oh) {
        const int64_t ih_start = oh * p.stride_h - p.pad_h;
        int64_t ih_first = ih_start;
        while (ih_first < 0) ih_first += p.dilation_h;
        for (int64_t ow = 0; ow < OW; ++ow) {
          int64_t iw_first = ow * p.stride_w - p.pad_w;
          while (iw_first < 0) iw_first += p.dilation_w;
          best[ow] = below_all<acc_t>();
          where[ow] = ih_first * p.in_w + iw_first;
        }
        for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
          const int64_t ih = ih_start + kh * p.dilation_h;
          if (ih < 0 || ih >= p.in_h) continue;
          for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
            const int64_t off = kw * p.dilation_w - p.pad_w;
            int64_t lo, hi;
            cpu::valid_range(off, p.stride_w, p.in_w, OW, lo, hi);
            const T* row = src + ih * p.in_w + off;
            const int64_t base = ih * p.in_w + off;
            acc_t* b = best.data();
            int64_t* w = where.data();
            for (int64_t ow = lo; ow < hi; ++ow) {
              const acc_t v = static_cast<acc_t>(row[ow * p.stride_w]);
              const bool take = (v > b[ow]) | (v != v);  // NaN propagates, as in torch
              b[ow] = select_bits(take, v, b[ow]);
              w[ow] = select_bits(take, base + ow * p.stride_w, w[ow]);
            }
          }
        }
        T* dst = out + pl * out_plane + oh * OW;
        int64_t* ind = idx + pl * out_plane + oh * OW;
        for (int64_t ow = 0; ow < OW; ++ow) {
          dst[ow] = static_cast<T>(best[ow]);
          ind[ow] = where[ow];
        }
      }
    }
  });
}

#if FASTCONV_HAVE_AVX512_KERNELS
// The window of each output of a plane, for the flat scatter (max_pool2d_backward_plane_flat): its
// top-left corner as a flat position (may be outside the plane), its column range [clo, chi) and the
// bit set of its rows inside the plane. int32, 16 outputs per vector; shared by every plane.
struct OutputWindows {
  std::vector<int32_t> corner, clo, chi, rows;
  explicit OutputWindows(const Pool2dParams& p) {
    const int64_t n = p.out_h * p.out_w + 16;
    corner.assign(n, 0), clo.assign(n, 0), chi.assign(n, 0), rows.assign(n, 0);
    for (int64_t oh = 0; oh < p.out_h; ++oh) {
      const int64_t h0 = oh * p.stride_h - p.pad_h;
      int32_t bits = 0;
      for (int64_t r = 0; r < p.kernel_h && r < 31; ++r) bits |= (h0 + r >= 0 && h0 + r < p.in_h) ? (1 << r) : 0;
      for (int64_t ow = 0; ow < p.out_w; ++ow) {
        const int64_t o = oh * p.out_w + ow, w0 = ow * p.stride_w - p.pad_w;
        corner[o] = static_cast<int32_t>(h0 * p.in_w + w0);
        clo[o] = static_cast<int32_t>(std::max<int64_t>(0, -w0));
        chi[o] = static_cast<int32_t>(std::min<int64_t>(p.kernel_w, p.in_w - w0));
        rows[o] = bits;
      }
    }
  }
};

// One plane's backward as torch's scatter, outputs in order (so elements several windows pick get
// torch's exact sums), after a window check of 16 indices at a time in int32 lanes, without division:
// d = index - corner is in window row r iff r is a row inside the plane and clo <= d - r*W < chi. An
// index outside its window adds 0 to element 0. The plane must be zeroed first. (Measured, 2 threads,
// Intel host: AlexNet's 3x3/2 pools 0.82-1.17x torch's time, were 1.0-1.6x with a check of 8 int64
// lanes through a double reciprocal; a dense gather of each element's covering windows was slower
// still on 13x13 planes, 2.2x, where only 36 of 169 elements receive a gradient.)
FASTCONV_AVX512 void max_pool2d_backward_plane_flat(const float* src, const int64_t* ind, float* dst,
                                                    const Pool2dParams& p, const OutputWindows& win) {
  const int64_t n = p.out_h * p.out_w, in_plane = p.in_h * p.in_w;
  const __m512i plane_v = _mm512_set1_epi64(in_plane), zero = _mm512_setzero_si512();
  alignas(64) int32_t at_ok[16];
  alignas(64) float val_ok[16];
  for (int64_t o = 0; o < n; o += 16) {
    const int len = static_cast<int>(std::min<int64_t>(16, n - o));
    const __mmask16 m = static_cast<__mmask16>((1u << len) - 1u);
    const __m512i a_lo = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(m), ind + o);
    const __m512i a_hi = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(m >> 8), ind + o + 8);
    const __mmask8 in_lo = _mm512_cmpge_epi64_mask(a_lo, zero) & _mm512_cmplt_epi64_mask(a_lo, plane_v);
    const __mmask8 in_hi = _mm512_cmpge_epi64_mask(a_hi, zero) & _mm512_cmplt_epi64_mask(a_hi, plane_v);
    const __m512i at =
        _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(a_lo)), _mm512_cvtepi64_epi32(a_hi), 1);
    const __mmask16 in = m & static_cast<__mmask16>(in_lo | (static_cast<unsigned>(in_hi) << 8));
    const __m512i d = _mm512_sub_epi32(at, _mm512_loadu_si512(win.corner.data() + o));
    const __m512i lo = _mm512_loadu_si512(win.clo.data() + o), hi = _mm512_loadu_si512(win.chi.data() + o);
    const __m512i rows = _mm512_loadu_si512(win.rows.data() + o);
    __mmask16 ok = 0;
    for (int64_t r = 0; r < p.kernel_h && r < 31; ++r) {
      const __m512i c = _mm512_sub_epi32(d, _mm512_set1_epi32(static_cast<int32_t>(r * p.in_w)));
      __mmask16 k = _mm512_mask_test_epi32_mask(in, rows, _mm512_set1_epi32(1 << r));
      k = _mm512_mask_cmpge_epi32_mask(k, c, lo);
      ok |= _mm512_mask_cmplt_epi32_mask(k, c, hi);
    }
    // Every index in its window (indices from the forward): the scatter reads the arrays themselves.
    // Through the stack copies below each scalar load waited for the vector store before it (no store
    // forwarding from a 64-byte store to 4-byte loads on Zen 4): AlexNet's 3x3/2 backward at (8,64,55,55)
    // 469 -> 238 us, 2 threads, Zen 4 (torch 263 us).
    if (ok == m) {
      for (int i = 0; i < len; ++i) dst[ind[o + i]] += src[o + i];
      continue;
    }
    _mm512_store_si512(at_ok, _mm512_maskz_mov_epi32(ok, at));
    _mm512_store_ps(val_ok, _mm512_maskz_loadu_ps(ok, src + o));
    for (int i = 0; i < len; ++i) dst[at_ok[i]] += val_ok[i];
  }
}

// Windows that tile the plane (stride = kernel <= 16, no padding or dilation): each input element has
// one window, so grad_input is written densely, 16 elements per store: a lane takes its window's
// grad_output where the window's index equals the lane's position, else 0 (an index outside its
// window never equals a position of it, so it contributes nothing). No zero fill, no scatter.
struct LaneWindows {  // [first column % kw][lane]: the lane's window minus the first column's window
  alignas(64) int32_t of[16][16];
  explicit LaneWindows(int64_t kw) {
    for (int64_t r = 0; r < kw; ++r)
      for (int l = 0; l < 16; ++l) of[r][l] = static_cast<int32_t>((r + l) / kw);
  }
};

FASTCONV_AVX512 void max_pool2d_backward_plane_tiled(const float* src, const int64_t* ind, float* dst,
                                                     const Pool2dParams& p, const LaneWindows& lane_windows) {
  const int64_t W = p.in_w, H = p.in_h, kh = p.kernel_h, kw = p.kernel_w, OW = p.out_w, OH = p.out_h;
  const int64_t covered_w = std::min(W, OW * kw), covered_h = std::min(H, OH * kh), in_plane = H * W;
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const int64_t step_win = 16 / kw, step_res = 16 % kw;
  const __m512i plane_v = _mm512_set1_epi64(in_plane), minus1 = _mm512_set1_epi64(-1);
  // one window row at a time: its indices and gradients are loaded, checked and spread over the lanes
  // once, then compared with the positions of each of its kh input rows
  for (int64_t oh = 0; oh * kh < covered_h; ++oh) {
    const int64_t ih_end = std::min((oh + 1) * kh, covered_h);  // (ceil mode: the last window may be cut)
    const int64_t* at_row = ind + oh * OW;
    const float* go_row = src + oh * OW;
    for (int64_t iw0 = 0, ow0 = 0, res = 0; iw0 < covered_w; iw0 += 16) {  // res = iw0 % kw, ow0 = iw0 / kw
      if (iw0 > 0) {
        res += step_res;
        ow0 += step_win + (res >= kw);
        res -= res >= kw ? kw : 0;
      }
      const int64_t n_win = std::min<int64_t>(16, OW - ow0);
      const __mmask16 wm = static_cast<__mmask16>((1u << n_win) - 1u);
      __m512i a_lo = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(wm), at_row + ow0);
      __m512i a_hi = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(wm >> 8), at_row + ow0 + 8);
      // indices outside the plane become -1 before narrowing to int32 (never a position)
      a_lo = _mm512_mask_mov_epi64(
          minus1, _mm512_cmpge_epi64_mask(a_lo, _mm512_setzero_si512()) & _mm512_cmplt_epi64_mask(a_lo, plane_v), a_lo);
      a_hi = _mm512_mask_mov_epi64(
          minus1, _mm512_cmpge_epi64_mask(a_hi, _mm512_setzero_si512()) & _mm512_cmplt_epi64_mask(a_hi, plane_v), a_hi);
      const __m512i at =
          _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(a_lo)), _mm512_cvtepi64_epi32(a_hi), 1);
      const __m512i win = _mm512_load_si512(lane_windows.of[res]);
      const __m512i at_lanes = _mm512_permutexvar_epi32(win, at);
      const __m512 g_lanes = _mm512_permutexvar_ps(win, _mm512_maskz_loadu_ps(wm, go_row + ow0));
      const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<int64_t>(16, covered_w - iw0)) - 1u);
      for (int64_t ih = oh * kh; ih < ih_end; ++ih) {
        const __m512i pos = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(ih * W + iw0)), iota);
        const __mmask16 hit = _mm512_cmpeq_epi32_mask(at_lanes, pos);
        // added to +0, as torch's scatter into a zeroed grad_input: a -0 gradient lands as +0
        _mm512_mask_storeu_ps(dst + ih * W + iw0, lanes, _mm512_maskz_add_ps(hit, _mm512_setzero_ps(), g_lanes));
      }
    }
    for (int64_t ih = oh * kh; ih < ih_end; ++ih) std::fill(dst + ih * W + covered_w, dst + (ih + 1) * W, 0.f);
  }
  std::fill(dst + covered_h * W, dst + in_plane, 0.f);  // rows past the last window
}
#endif

// Whether flat position `at` of an input plane lies in the window whose top-left corner is (h0, w0)
// (which may lie in the padding). Indices come from the user to the backward; one behaviour on every
// backend (conv_params.h, check_max_pool2d_backward): an index outside its output's window contributes
// nothing. Without dilation, an index is in its window iff, for some window row r inside the plane,
// at - ((h0 + r)*W + w0) is a column of the window inside the plane: a few compares, no division (six
// divisions per element made the scalar backward 3x slower than torch's).
inline bool index_in_window(int64_t at, int64_t h0, int64_t w0, const Pool2dParams& p) {
  if (at < 0 || at >= p.in_h * p.in_w) return false;
  if (p.dilation_h == 1 && p.dilation_w == 1) {
    const int64_t c_lo = std::max<int64_t>(0, -w0), c_hi = std::min(p.kernel_w, p.in_w - w0);
    bool inside = false;
    for (int64_t r = 0; r < p.kernel_h; ++r) {  // no early exit: which row holds the max is random
      const int64_t c = at - ((h0 + r) * p.in_w + w0);
      inside |= (h0 + r >= 0) & (c >= c_lo) & (c < c_hi);
    }
    return inside;
  }
  const int64_t dh = at / p.in_w - h0, dw = at % p.in_w - w0;
  return dh >= 0 && dw >= 0 && dh % p.dilation_h == 0 && dw % p.dilation_w == 0 && dh / p.dilation_h < p.kernel_h &&
         dw / p.dilation_w < p.kernel_w;
}

// torch's scatter over one plane of grad_input: dst[at*step] += src[o*step] for the outputs o in order
// whose index at = ind[o*step] lies in its window (index_in_window; the others add nothing). Elements
// `step` apart: 1 for an NCHW plane, C for one channel of a channels_last image.
template <typename T>
void scatter_plane_checked(const T* src, const int64_t* ind, T* dst, const Pool2dParams& p, int64_t step) {
  for (int64_t oh = 0; oh < p.out_h; ++oh) {
    const int64_t h0 = oh * p.stride_h - p.pad_h;
    for (int64_t ow = 0; ow < p.out_w; ++ow) {
      const int64_t o = (oh * p.out_w + ow) * step, at = ind[o];
      const bool inside = index_in_window(at, h0, ow * p.stride_w - p.pad_w, p);
      dst[(inside ? at : 0) * step] += inside ? src[o] : T(0);  // selects, not branches
    }
  }
}

#if FASTCONV_HAVE_AVX512_KERNELS
// The dense rows' 2-wide windows on AVX2, four windows (eight pixels) a step: the windows [0, count) of
// row `row`, their gradients s, their indices at (minus `first`, the row's first position); returns how
// many it wrote (a multiple of 4).
__attribute__((target("avx2"))) inline int64_t dense_pairs_avx2(const float* s, const int64_t* at, int64_t first,
                                                                int64_t count, float* row) {
  const __m256i spread = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256i one = _mm256_set1_epi64x(1), base = _mm256_setr_epi64x(0, 2, 4, 6);
  int64_t ow = 0;
  for (; ow + 4 <= count; ow += 4) {
    // d = index - (position of the window's left pixel): 0 picks the left pixel, 1 the right one
    const __m256i d = _mm256_sub_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + ow)),
                                       _mm256_add_epi64(base, _mm256_set1_epi64x(first + 2 * ow)));
    const __m256i pick =
        _mm256_blend_epi32(_mm256_cmpeq_epi64(d, _mm256_setzero_si256()), _mm256_cmpeq_epi64(d, one), 0xAA);
    const __m256 g = _mm256_add_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + ow)), spread),
                                   _mm256_setzero_ps());  // +0, as torch's scatter into zeros
    _mm256_storeu_ps(row + 2 * ow, _mm256_and_ps(_mm256_castsi256_ps(pick), g));
  }
  return ow;
}
#endif

// Windows that tile the plane (stride == kernel, no padding or dilation) off the AVX-512 kernels: each
// input pixel lies in at most one window, so grad_input is written densely, each element once, with no
// zero fill and no scatter: the window's gradient where the window's index is the pixel, else 0. The
// gradient is added to +0 as torch's scatter into zeros adds it (-0 comes out +0); an index outside its
// window matches no pixel of it. Selects, not branches: where the max lies is random, and a branch per
// pixel took 1.3x the zero fill + scatter's time. Measured, 2 threads, Zen 3 (no AVX-512), time against
// torch, the zero fill + checked scatter before -> this: MNIST's pool1 (100,32,28,28) 2.90 -> 1.20,
// pool2 2.84 -> 1.43, LeNet's pool1 (100,6,24,24) 3.44 -> 0.79, SimpleConvNet's (100,30,24,24) 3.93 -> 1.02.
template <typename T>
void max_pool2d_backward_plane_dense(const T* src, const int64_t* ind, T* dst, const Pool2dParams& p) {
  const int64_t W = p.in_w, KH = p.kernel_h, KW = p.kernel_w, OW = p.out_w;
  for (int64_t ih = 0; ih < p.in_h; ++ih) {
    T* row = dst + ih * W;
    const int64_t oh = ih / KH, first = ih * W;
    int64_t iw = 0;
    if (oh < p.out_h) {
      const T* s = src + oh * OW;
      const int64_t* at = ind + oh * OW;
      const int64_t full = std::min(OW, W / KW);  // windows whose columns all lie inside the row
      int64_t ow = 0;
#if FASTCONV_HAVE_AVX512_KERNELS
      if constexpr (std::is_same_v<T, float>) {
        if (KW == 2 && cpu::avx2::available()) {
          ow = dense_pairs_avx2(s, at, first, full, row);
          iw = 2 * ow;
        }
      }
#endif
      for (; ow < OW; ++ow) {  // (past `full`: ceil_mode's last window, cut by the row's end)
        const T g = T(0) + s[ow];
        const int64_t a = at[ow] - first;
        for (int64_t j = 0; j < KW && iw < W; ++j, ++iw) row[iw] = select_bits(a == iw, g, T(0));
      }
    }
    for (; iw < W; ++iw) row[iw] = T(0);  // columns (rows) no window covers
  }
}

template <typename T>
void max_pool2d_backward_kernel(const T* go, const int64_t* idx, T* gi, const Pool2dParams& p) {
  const int64_t planes = p.batch * p.channels, in_plane = p.in_h * p.in_w, out_plane = p.out_h * p.out_w;
  // the vector kernels: no dilation, positions and window offsets in int32 lanes
  const bool fast = cpu::has_avx512() && p.dilation_h == 1 && p.dilation_w == 1 && in_plane < (int64_t(1) << 30) &&
                    (p.kernel_h + p.pad_h) * p.in_w < (int64_t(1) << 30);
  // dense writes of whole rows: for rows of 12+ (measured, 2 threads, Intel host, once each window
  // row's indices are checked and spread once for its kh input rows: 0.72-0.93x torch's time on rows
  // of 14-28, where the flat scatter took 0.98-1.31x; on rows of 6-10 1.4-1.8x the flat scatter's
  // time: there most of each vector idles)
  const bool tiled = fast && p.in_w >= 12 && p.stride_h == p.kernel_h && p.stride_w == p.kernel_w && p.kernel_w <= 16 &&
                     p.pad_h == 0 && p.pad_w == 0;
  const bool flat = fast && !tiled && p.kernel_h < 31;  // (window rows as bits of an int32)
  const bool dense = (!fast || !std::is_same_v<T, float>) && p.stride_h == p.kernel_h && p.stride_w == p.kernel_w &&
                     p.pad_h == 0 && p.pad_w == 0 && p.dilation_h == 1 && p.dilation_w == 1;
  (void)fast, (void)tiled, (void)flat;
#if FASTCONV_HAVE_AVX512_KERNELS
  const LaneWindows lane_windows(tiled ? p.kernel_w : 1);
  std::unique_ptr<OutputWindows> windows(flat ? new OutputWindows(p) : nullptr);
#endif
  at::parallel_for(0, planes, 16, [&](int64_t begin, int64_t end) {
    for (int64_t pl = begin; pl < end; ++pl) {
      T* dst = gi + pl * in_plane;
      const T* src = go + pl * out_plane;
      const int64_t* ind = idx + pl * out_plane;
#if FASTCONV_HAVE_AVX512_KERNELS
      if constexpr (std::is_same_v<T, float>) {
        if (tiled) {
          max_pool2d_backward_plane_tiled(src, ind, dst, p, lane_windows);
          continue;
        }
      }
#endif
      if (dense) {
        max_pool2d_backward_plane_dense(src, ind, dst, p);
        continue;
      }
      std::fill(dst, dst + in_plane, T(0));
#if FASTCONV_HAVE_AVX512_KERNELS
      if constexpr (std::is_same_v<T, float>) {
        if (flat) {
          max_pool2d_backward_plane_flat(src, ind, dst, p, *windows);
          continue;
        }
      }
#endif
      scatter_plane_checked(src, ind, dst, p, 1);
    }
  });
}

// ---- channels_last (NHWC) input: channels_last values, indices and grad_input, as torch's ----------
// One output pixel at a time, its channels innermost: each window element is a run of C contiguous
// values, compared with the running max of every channel at once (the same visiting order, ties, NaN
// and -inf rules as the planes above, so the same indices). float32 on AVX-512: 16 channels a vector.
template <typename T>
void max_pool2d_forward_channels_last(const T* in, T* out, int64_t* idx, const Pool2dParams& p) {
  const int64_t C = p.channels, H = p.in_h, W = p.in_w, L = p.out_h * p.out_w;
  using acc_t = at::opmath_type<T>;
  at::parallel_for(0, p.batch * L, std::max<int64_t>(1, 4096 / (C * p.kernel_h * p.kernel_w)),
                   [&](int64_t begin, int64_t end) {
                     std::vector<acc_t> best(C);
                     std::vector<int64_t> where(C), pos(p.kernel_h * p.kernel_w);
                     for (int64_t o = begin; o < end; ++o) {
                       const int64_t n = o / L, oh = o % L / p.out_w, ow = o % p.out_w;
                       const int64_t h0 = oh * p.stride_h - p.pad_h, w0 = ow * p.stride_w - p.pad_w;
                       int64_t h_first = h0, w_first = w0;  // the window's first element inside the input
                       while (h_first < 0) h_first += p.dilation_h;
                       while (w_first < 0) w_first += p.dilation_w;
                       const int64_t first = h_first * W + w_first, count = window_positions(p, h0, w0, pos.data());
                       const T* image = in + n * H * W * C;
#if FASTCONV_HAVE_AVX512_KERNELS
                       if constexpr (std::is_same_v<T, float>) {
                         if (cpu::has_avx512()) {
                           max_pool2d_pixel_channels_last(image, out + o * C, idx + o * C, C, first, pos.data(), count);
                           continue;
                         }
                       }
#endif
                       std::fill(best.begin(), best.end(), below_all<acc_t>());
                       std::fill(where.begin(), where.end(), first);
                       for (int64_t e = 0; e < count; ++e) {
                         const T* src = image + pos[e] * C;
                         for (int64_t c = 0; c < C; ++c) {
                           const acc_t v = static_cast<acc_t>(src[c]);
                           const bool take = (v > best[c]) | (v != v);  // NaN propagates, as in torch
                           best[c] = select_bits(take, v, best[c]);
                           where[c] = select_bits(take, pos[e], where[c]);
                         }
                       }
                       for (int64_t c = 0; c < C; ++c)
                         out[o * C + c] = static_cast<T>(best[c]), idx[o * C + c] = where[c];
                     }
                   });
}

// For each input position i (a row or a column), the windows that cover it, in order: list[first[i] ..
// first[i + 1]) (dilation: only those whose taps land on i).
struct CoveringWindows {
  std::vector<int64_t> first, list;
  CoveringWindows(int64_t size, int64_t outs, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
    first.assign(size + 1, 0);
    for (int64_t i = 0; i < size; ++i) {
      const int64_t num = i + pad - (kernel - 1) * dilation;
      const int64_t lo = num <= 0 ? 0 : (num + stride - 1) / stride, hi = std::min(outs - 1, (i + pad) / stride);
      for (int64_t o = lo; o <= hi; ++o) {
        if ((i + pad - o * stride) % dilation == 0) list.push_back(o);
      }
      first[i + 1] = static_cast<int64_t>(list.size());
    }
  }
};

#if FASTCONV_HAVE_AVX512_KERNELS
// grad_input of one channels_last float32 pixel at flat position `pos`, all C channels, 16 a vector: the
// gradients of the covering windows `o` (in output order) whose index is `pos`, added from +0. (Narrowing
// the indices to int32 first was slower: one more pass over them, and these layers are memory-bound.)
FASTCONV_AVX512 void max_pool2d_backward_pixel_channels_last(const float* go, const int64_t* idx, const int64_t* o,
                                                             int64_t windows, int64_t C, int64_t pos, float* dst) {
  const __m512i pos_v = _mm512_set1_epi64(pos);
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const __mmask16 m = cpu::lane_mask(0, C - c0);
    const __mmask8 m_lo = static_cast<__mmask8>(m), m_hi = static_cast<__mmask8>(m >> 8);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t w = 0; w < windows; ++w) {
      const int64_t* ind = idx + o[w] * C + c0;
      const __mmask8 lo = _mm512_mask_cmpeq_epi64_mask(m_lo, _mm512_maskz_loadu_epi64(m_lo, ind), pos_v);
      const __mmask8 hi = _mm512_mask_cmpeq_epi64_mask(m_hi, _mm512_maskz_loadu_epi64(m_hi, ind + 8), pos_v);
      const __mmask16 hit = static_cast<__mmask16>(lo | (static_cast<unsigned>(hi) << 8));
      acc = _mm512_mask_add_ps(acc, hit, acc, _mm512_maskz_loadu_ps(hit, go + o[w] * C + c0));
    }
    _mm512_mask_storeu_ps(dst + c0, m, acc);
  }
}
#endif

#if FASTCONV_HAVE_AVX512_KERNELS
// Overlapping windows (stride below the kernel), float32, no dilation: torch's scatter, outputs in order,
// image[at][c] += grad_output[o][c] for the channels [c0, c1) of image n (grad_input zeroed first), each
// index checked against its window 16 channels at a time (the window is the pixel's, the same for
// every channel: for each window row inside the plane, at - (row start + first column) below the
// window's width, unsigned); the adds read the arrays themselves when all 16 are in their windows. The
// dense per-pixel form below read each window's indices once per pixel it covers (9 times for 3x3):
// measured, 2 threads, Zen 4, AlexNet's 3x3/2 at (8,64,55,55) 390 -> 219-226 us (torch's channels_last
// 204-209), ResNet's 3x3/2 p1 at (8,64,112,112) 2.0 -> 1.04-1.57 ms (torch 1.09-1.55).
FASTCONV_AVX512 void max_pool2d_backward_scatter_channels_last(const float* go, const int64_t* idx, float* gi,
                                                               const Pool2dParams& p, int64_t n, int64_t c0,
                                                               int64_t c1) {
  const int64_t C = p.channels, H = p.in_h, W = p.in_w, L = p.out_h * p.out_w;
  float* image = gi + n * H * W * C;
  for (int64_t o = 0; o < L; ++o) {
    const int64_t h0 = o / p.out_w * p.stride_h - p.pad_h, w0 = o % p.out_w * p.stride_w - p.pad_w;
    const int64_t c_lo = std::max<int64_t>(0, -w0), width = std::min(p.kernel_w, W - w0) - c_lo;
    const float* src = go + (n * L + o) * C;
    const int64_t* ind = idx + (n * L + o) * C;
    for (int64_t c = c0; c < c1; c += 16) {
      const __mmask16 m = cpu::lane_mask(0, c1 - c);
      const __m512i a_lo = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(m), ind + c);
      const __m512i a_hi = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(m >> 8), ind + c + 8);
      __mmask8 ok_lo = 0, ok_hi = 0;
      for (int64_t r = 0; r < p.kernel_h; ++r) {
        const int64_t ih = h0 + r;
        if (ih < 0 || ih >= H) continue;
        const __m512i start = _mm512_set1_epi64(ih * W + w0 + c_lo), span = _mm512_set1_epi64(width);
        ok_lo |= _mm512_cmplt_epu64_mask(_mm512_sub_epi64(a_lo, start), span);
        ok_hi |= _mm512_cmplt_epu64_mask(_mm512_sub_epi64(a_hi, start), span);
      }
      const __mmask16 ok = m & static_cast<__mmask16>(ok_lo | (static_cast<unsigned>(ok_hi) << 8));
      const int64_t len = std::min<int64_t>(16, c1 - c);
      if (ok == m) {
        for (int64_t i = 0; i < len; ++i) image[ind[c + i] * C + c + i] += src[c + i];
      } else {
        for (int64_t i = 0; i < len; ++i) {
          if ((ok >> i) & 1) image[ind[c + i] * C + c + i] += src[c + i];
        }
      }
    }
  }
}
#endif

#if FASTCONV_HAVE_AVX512_KERNELS
// The dense rows of max_pool2d_backward_tiled_channels_last (below) for at most 8 channels, where one
// pixel a vector leaves most lanes idle (LeNet's 6 channels: 6 of 16): a row of grad_input is W*C
// consecutive floats, written 16 at a time. Lane e of a chunk is channel e % C of pixel e / C, whose
// window column ow gives its gradient and index at offset ow*C + e % C of the window row: with up to 8
// channels a chunk's offsets span at most 16 floats and each half's at most 8 (its pixels lie in two or
// three neighbouring windows; checked when the chunks are made), so one load and a permute gather the
// gradients and one a half the indices, the same for every row (FewChannelChunk, made once per call).
// Measured in-process against one pixel a vector, Zen 4, 2x2/2, time (2 threads / one), with two index
// loads a half: (100,6,24,24) 0.61 / 0.71, (512,6,24,24) 0.58 / 0.70, (8,3,224,224) 0.31 / 0.35,
// (64,8,32,32) 0.88; from 10 channels one pixel a vector is faster (10: 1.07, 12: 1.25, 15: 1.36 / 1.56),
// hence kFewChannels. One index load a half: 0.84-0.88x that. Against torch's channels_last scatter:
// 1.07-1.25x its time (2 threads, 3-8 channels).
constexpr int64_t kFewChannels = 8;
struct FewChannelChunk {
  int32_t go_perm[16];                // lane -> offset from go_base
  int64_t idx_perm[2][8], col[2][8];  // per half: lane -> offset from idx_base[half]; the lane's column iw
  int64_t go_base = 0, idx_base[2] = {0, 0};
  __mmask16 go_load = 0, store = 0;  // the lanes of the gradients' load; the lanes inside the row
  __mmask8 window[2] = {0, 0};       // per half, the lanes in a window
  __mmask8 idx_load[2] = {0, 0};     // per half, the int64 lanes of its load
};

// The chunks of a row (W*C floats) for windows at col_win[iw] (-1: none); empty where some chunk's
// offsets span more than a vector, or a half's more than 8 (then one pixel a vector runs).
inline std::vector<FewChannelChunk> few_channel_chunks(int64_t C, int64_t W, const std::vector<int64_t>& col_win) {
  const int64_t n = W * C;
  std::vector<FewChannelChunk> chunks((n + 15) / 16);
  for (size_t j = 0; j < chunks.size(); ++j) {
    FewChannelChunk& ch = chunks[j];
    int64_t off[16] = {}, col[16] = {};  // per lane: its element's offset in the window row; its column
    int64_t lo = -1, hi = -1, half_lo[2] = {-1, -1}, half_hi[2] = {-1, -1};
    for (int e = 0; e < 16; ++e) {
      const int64_t flat = 16 * static_cast<int64_t>(j) + e, iw = flat / C;
      if (flat >= n) break;
      ch.store |= __mmask16(1u << e);
      col[e] = iw;
      if (col_win[iw] < 0) continue;
      off[e] = col_win[iw] * C + flat % C;
      ch.window[e / 8] |= __mmask8(1u << (e % 8));
      lo = lo < 0 ? off[e] : std::min(lo, off[e]);
      hi = std::max(hi, off[e]);
      const int h = e / 8;
      half_lo[h] = half_lo[h] < 0 ? off[e] : std::min(half_lo[h], off[e]);
      half_hi[h] = std::max(half_hi[h], off[e]);
    }
    if (lo >= 0 && hi - lo >= 16) return {};
    ch.go_base = std::max<int64_t>(lo, 0);
    ch.go_load = lo < 0 ? 0 : cpu::lane_mask(0, hi - lo + 1);
    for (int h = 0; h < 2; ++h) {
      if (half_lo[h] >= 0 && half_hi[h] - half_lo[h] >= 8) return {};
      ch.idx_base[h] = std::max<int64_t>(half_lo[h], 0);
      const int64_t span = half_lo[h] < 0 ? 0 : half_hi[h] - half_lo[h] + 1;
      ch.idx_load[h] = static_cast<__mmask8>(cpu::lane_mask(0, span));
    }
    for (int e = 0; e < 16; ++e) {
      const bool in = (ch.window[e / 8] >> (e % 8)) & 1;
      ch.go_perm[e] = in ? static_cast<int32_t>(off[e] - ch.go_base) : 0;
      ch.idx_perm[e / 8][e % 8] = in ? off[e] - ch.idx_base[e / 8] : 0;
      ch.col[e / 8][e % 8] = col[e];
    }
  }
  return chunks;
}

// One row ih of an image's grad_input (window row oh, -1: none) from its FewChannelChunks.
FASTCONV_AVX512 void max_pool2d_backward_few_channels_row(const float* go, const int64_t* idx, float* dst,
                                                          const Pool2dParams& p, int64_t ih, int64_t oh,
                                                          const std::vector<FewChannelChunk>& chunks) {
  const int64_t C = p.channels, W = p.in_w;
  if (oh < 0) return (void)std::memset(dst, 0, sizeof(float) * W * C);
  const float* go_row = go + oh * p.out_w * C;
  const int64_t* idx_row = idx + oh * p.out_w * C;
  const __m512i row_start = _mm512_set1_epi64(ih * W);
  const __m512 zero = _mm512_setzero_ps();
  for (const FewChannelChunk& ch : chunks) {
    // per half, its indices: up to 8 int64 from idx_base (one masked load) permuted into its 8 lanes,
    // compared with the lanes' positions (two loads a half and a two-source permute, for spans up to 16,
    // took 1.14-1.19x the time)
    __mmask8 eq[2];
    for (int h = 0; h < 2; ++h) {
      const __m512i ind = _mm512_permutexvar_epi64(_mm512_loadu_si512(ch.idx_perm[h]),
                                                   _mm512_maskz_loadu_epi64(ch.idx_load[h], idx_row + ch.idx_base[h]));
      eq[h] =
          _mm512_mask_cmpeq_epi64_mask(ch.window[h], ind, _mm512_add_epi64(row_start, _mm512_loadu_si512(ch.col[h])));
    }
    const __mmask16 hit = _mm512_kunpackb(eq[1], eq[0]);
    const __m512 g =
        _mm512_permutexvar_ps(_mm512_loadu_si512(ch.go_perm), _mm512_maskz_loadu_ps(ch.go_load, go_row + ch.go_base));
    _mm512_mask_storeu_ps(dst, ch.store, _mm512_maskz_add_ps(hit, zero, g));
    dst += 16;
  }
}

// Row ih of one image's channels_last grad_input for max_pool2d_backward_tiled_channels_last below: its
// window row oh (-1: none) and each column's window column (col_win, -1: none).
FASTCONV_AVX512 void max_pool2d_backward_tiled_row(const float* go, const int64_t* idx, float* dst,
                                                   const Pool2dParams& p, int64_t ih, int64_t oh,
                                                   const std::vector<int64_t>& col_win) {
  const int64_t C = p.channels, W = p.in_w;
  if (oh < 0) return (void)std::memset(dst, 0, sizeof(float) * W * C);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t iw = 0; iw < W; ++iw, dst += C) {
    const int64_t ow = col_win[iw];
    if (ow < 0) {
      std::memset(dst, 0, sizeof(float) * C);
      continue;
    }
    const int64_t o = (oh * p.out_w + ow) * C;
    const __m512i pos = _mm512_set1_epi64(ih * W + iw);
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = cpu::lane_mask(0, C - c);
      const __mmask8 m_lo = static_cast<__mmask8>(m), m_hi = static_cast<__mmask8>(m >> 8);
      const __mmask8 lo = _mm512_mask_cmpeq_epi64_mask(m_lo, _mm512_maskz_loadu_epi64(m_lo, idx + o + c), pos);
      const __mmask8 hi = _mm512_mask_cmpeq_epi64_mask(m_hi, _mm512_maskz_loadu_epi64(m_hi, idx + o + c + 8), pos);
      const __mmask16 hit = static_cast<__mmask16>(lo | (static_cast<unsigned>(hi) << 8));
      _mm512_mask_storeu_ps(dst + c, m, _mm512_maskz_add_ps(hit, zero, _mm512_maskz_loadu_ps(hit, go + o + c)));
    }
  }
}

// Windows that do not overlap (stride >= kernel, no dilation), float32: every input pixel
// lies in at most one window, so grad_input is written densely, row by row: a pixel takes its window's
// gradient in the channels whose index is its position, +0 elsewhere and outside every window (added to
// +0, as torch's scatter into a zeroed grad_input rounds a -0 gradient). No zero fill, no scatter; the
// window's indices and gradients are read once per pixel it covers, from L1.
void max_pool2d_backward_tiled_channels_last(const float* go, const int64_t* idx, float* gi, const Pool2dParams& p) {
  const int64_t C = p.channels, H = p.in_h, W = p.in_w, OW = p.out_w, L = p.out_h * OW;
  // the window (output row / column) each input row / column lies in, -1 for none (at most one: the
  // windows do not overlap)
  const auto only_window = [](const CoveringWindows& w, int64_t size) {
    std::vector<int64_t> win(size, -1);
    for (int64_t i = 0; i < size; ++i) {
      if (w.first[i] < w.first[i + 1]) win[i] = w.list[w.first[i]];
    }
    return win;
  };
  const std::vector<int64_t> row_win = only_window(CoveringWindows(H, p.out_h, p.kernel_h, p.stride_h, p.pad_h, 1), H);
  const std::vector<int64_t> col_win = only_window(CoveringWindows(W, OW, p.kernel_w, p.stride_w, p.pad_w, 1), W);
  const std::vector<FewChannelChunk> chunks = C <= kFewChannels && W * C < (int64_t(1) << 30)
                                                  ? few_channel_chunks(C, W, col_win)
                                                  : std::vector<FewChannelChunk>();
  at::parallel_for(0, p.batch * H, std::max<int64_t>(1, 8192 / (W * C)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / H, ih = row % H;
      if (!chunks.empty()) {
        max_pool2d_backward_few_channels_row(go + n * L * C, idx + n * L * C, gi + row * W * C, p, ih, row_win[ih],
                                             chunks);
      } else {
        max_pool2d_backward_tiled_row(go + n * L * C, idx + n * L * C, gi + row * W * C, p, ih, row_win[ih], col_win);
      }
    }
  });
}
#endif

// grad_input written densely, one input pixel at a time (dilated float32 windows, every other dtype): per channel, the
// sum of the gradients of the windows that cover the pixel and whose index is its position, in output order, from +0
// (torch's scatter gives the same bits; an index outside its window matches no pixel the window covers). No zero fill,
// no scatter, no two threads on one element: rows of pixels split over the threads.
template <typename T>
void max_pool2d_backward_channels_last(const T* go, const int64_t* idx, T* gi, const Pool2dParams& p) {
  const int64_t C = p.channels, H = p.in_h, W = p.in_w, L = p.out_h * p.out_w;
  const CoveringWindows rows(H, p.out_h, p.kernel_h, p.stride_h, p.pad_h, p.dilation_h);
  const CoveringWindows cols(W, p.out_w, p.kernel_w, p.stride_w, p.pad_w, p.dilation_w);
  const bool vector = std::is_same_v<T, float> && cpu::has_avx512();
  at::parallel_for(0, p.batch * H, std::max<int64_t>(1, 4096 / (W * C)), [&](int64_t begin, int64_t end) {
    std::vector<T> acc(C);   // T: each sum rounded as torch's += on grad_input rounds it
    std::vector<int64_t> o;  // the covering windows of a pixel, in output order
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / H, ih = row % H;
      for (int64_t iw = 0; iw < W; ++iw) {
        o.clear();
        for (int64_t r = rows.first[ih]; r < rows.first[ih + 1]; ++r) {
          for (int64_t c = cols.first[iw]; c < cols.first[iw + 1]; ++c) {
            o.push_back(n * L + rows.list[r] * p.out_w + cols.list[c]);
          }
        }
        const int64_t pos = ih * W + iw;
        T* dst = gi + (row * W + iw) * C;
        if (vector) {
#if FASTCONV_HAVE_AVX512_KERNELS
          max_pool2d_backward_pixel_channels_last(reinterpret_cast<const float*>(go), idx, o.data(),
                                                  static_cast<int64_t>(o.size()), C, pos,
                                                  reinterpret_cast<float*>(dst));
#endif
          continue;
        }
        std::fill(acc.begin(), acc.end(), T(0));
        for (const int64_t w : o) {
          const T* src = go + w * C;
          const int64_t* ind = idx + w * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += ind[c] == pos ? src[c] : T(0);
        }
        std::copy(acc.begin(), acc.end(), dst);
      }
    }
  });
}

// The channels_last backward below 16 channels, where the per-pixel vectors would mostly idle: torch's
// scatter, per image and channel, outputs in order, each index checked against its window (an index
// outside matches nothing, as everywhere here): each grad_input element sums its windows' gradients in
// output order from +0, as the dense form does. float32 without dilation on AVX-512 runs
// max_pool2d_backward_scatter_channels_last (overlapping windows: a masked vector of the C channels) or
// max_pool2d_backward_tiled_channels_last; this is the rest.
template <typename T>
void max_pool2d_backward_scatter_channels_last_few(const T* go, const int64_t* idx, T* gi, const Pool2dParams& p) {
  const int64_t C = p.channels, HW = p.in_h * p.in_w, L = p.out_h * p.out_w;
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* dst = gi + n * HW * C;
      std::fill(dst, dst + HW * C, T(0));
      for (int64_t c = 0; c < C; ++c) scatter_plane_checked(go + n * L * C + c, idx + n * L * C + c, dst + c, p, C);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode) {
  const Pool2dParams p = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  // An input whose strides suggest channels_last gives channels_last values and indices, as torch's
  // (fastconv/_ops.py's fake kernel too), computed in place (on a copy of a slice). (Measured, 2 threads, Zen 4,
  // against torch's channels_last pool: 0.83-0.99x for 64 channels at 112x112 3x3/2 p1, 0.23-0.65x for 3 and 8
  // channels; through NCHW copies, as before, 12x for (8,64,112,112).)
  if (suggests_channels_last(input)) {
    const auto cl = input.options().memory_format(at::MemoryFormat::ChannelsLast);
    at::Tensor out = at::empty({p.batch, p.channels, p.out_h, p.out_w}, cl);
    at::Tensor idx = at::empty({p.batch, p.channels, p.out_h, p.out_w}, cl.dtype(at::kLong));
    if (out.numel() == 0) return {out, idx};
    const at::Tensor input_nhwc = input.contiguous(at::MemoryFormat::ChannelsLast);
    AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastconv_max_pool2d_cpu", [&] {
      max_pool2d_forward_channels_last<scalar_t>(input_nhwc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                 idx.data_ptr<int64_t>(), p);
    });
    return {out, idx};
  }
  const at::Tensor input_c = input.contiguous();
  at::Tensor out = at::empty({p.batch, p.channels, p.out_h, p.out_w}, input.options());
  at::Tensor idx = at::empty({p.batch, p.channels, p.out_h, p.out_w}, input.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, idx};
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastconv_max_pool2d_cpu", [&] {
    max_pool2d_forward_kernel<scalar_t>(input_c.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                        idx.data_ptr<int64_t>(), p);
  });
  return {out, idx};
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool ceil_mode) {
  const Pool2dParams p =
      check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, "fastconv._max_pool2d_backward");
  check_max_pool2d_backward(grad_output, input, indices, p);
  // grad_input in the input's layout, as torch's, computed in place. float32 on AVX-512: overlapping
  // windows by the scatter (one masked vector of up to 16 channels per output pixel), the others written
  // densely row by row (max_pool2d_backward_tiled_channels_last). Measured, 2 threads, Zen 4, the dense
  // rows against the per-pixel form they replace (16+ channels; separate runs): LeNet's pool2
  // (512,16,8,8) 0.38x the time, the MNIST CNN's pool1 (100,32,28,28) 0.51x, SimpleConvNet's
  // (100,30,24,24) 0.48x; against the scatter (below 16 channels, in-process): (8,3,224,224) 0.77x,
  // (100,6,24,24) 0.87x; up to 8 channels the rows are written 16 floats of several pixels at a time
  // (FewChannelChunk: 0.31-0.61x the time of one pixel a vector).
  if (suggests_channels_last(input)) {
    at::Tensor grad_input =
        at::empty({p.batch, p.channels, p.in_h, p.in_w}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (grad_input.numel() == 0) return grad_input;
    const at::Tensor go_c = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor idx_c = indices.contiguous(at::MemoryFormat::ChannelsLast);
    const bool few = p.channels < 16;
#if FASTCONV_HAVE_AVX512_KERNELS
    const bool overlapping = p.stride_h < p.kernel_h || p.stride_w < p.kernel_w;
    const bool vector =
        input.scalar_type() == at::kFloat && cpu::has_avx512() && p.dilation_h == 1 && p.dilation_w == 1;
    if (vector && !overlapping) {
      max_pool2d_backward_tiled_channels_last(go_c.const_data_ptr<float>(), idx_c.const_data_ptr<int64_t>(),
                                              grad_input.data_ptr<float>(), p);
      return grad_input;
    }
    if (vector) {
      // Items of channels of one image, so that no two items write one element. As many images as threads:
      // whole images, each zeroed right before its scatter, which then finds it in L2, where one zero fill
      // of the whole grad_input first went out to memory and the scatter read it back (measured
      // in-process, 2 threads, Zen 4: AlexNet's 3x3/2 pools at batch 32, (32,192,27,27) 0.47x the time,
      // (32,64,55,55) 0.80x, (32,256,13,13) 0.73x; at batch 8 0.69-0.90x; ResNet's 3x3/2 p1 at
      // (8,64,112,112) 0.90x). Fewer: one zero fill, then 64 channels an item, or 16 (one cache line)
      // where that leaves threads idle (batch 1). (16 always: 2.6x the time at (8,64,112,112), each item
      // walking the whole image for one line per pixel.)
      const int64_t threads = at::get_num_threads(), wide = (p.channels + 63) / 64;
      const bool whole = p.batch >= threads;
      const int64_t block = whole ? p.channels : p.batch * wide >= threads ? 64 : 16;
      const int64_t blocks = (p.channels + block - 1) / block, image_floats = p.in_h * p.in_w * p.channels;
      if (!whole) grad_input.zero_();
      at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t n = item / blocks, c0 = item % blocks * block;
          if (whole) std::memset(grad_input.data_ptr<float>() + n * image_floats, 0, sizeof(float) * image_floats);
          max_pool2d_backward_scatter_channels_last(go_c.const_data_ptr<float>(), idx_c.const_data_ptr<int64_t>(),
                                                    grad_input.data_ptr<float>(), p, n, c0,
                                                    std::min(p.channels, c0 + block));
        }
      });
      return grad_input;
    }
#endif
    if (few) {
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, input.scalar_type(), "fastconv_max_pool2d_backward_cpu", [&] {
            max_pool2d_backward_scatter_channels_last_few<scalar_t>(
                go_c.const_data_ptr<scalar_t>(), idx_c.const_data_ptr<int64_t>(), grad_input.data_ptr<scalar_t>(), p);
          });
      return grad_input;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "fastconv_max_pool2d_backward_cpu", [&] {
          max_pool2d_backward_channels_last<scalar_t>(go_c.const_data_ptr<scalar_t>(), idx_c.const_data_ptr<int64_t>(),
                                                      grad_input.data_ptr<scalar_t>(), p);
        });
    return grad_input;
  }
  at::Tensor grad_input = at::empty({p.batch, p.channels, p.in_h, p.in_w}, input.options());
  if (grad_input.numel() == 0) return grad_input;
  const at::Tensor go_c = grad_output.contiguous();
  const at::Tensor idx_c = indices.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "fastconv_max_pool2d_backward_cpu", [&] {
        max_pool2d_backward_kernel<scalar_t>(go_c.const_data_ptr<scalar_t>(), idx_c.const_data_ptr<int64_t>(),
                                             grad_input.data_ptr<scalar_t>(), p);
      });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("_max_pool2d_backward", &max_pool2d_backward_cpu);
}

}  // namespace fastconv
