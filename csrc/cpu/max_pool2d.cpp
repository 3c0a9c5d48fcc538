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
#include "cpu/gemm.h"    // has_avx512
#include "cpu/im2col.h"  // valid_range

namespace fastconv {
namespace {

// take ? a : b through bit masks: the compiler must not turn it into a branch (random data
// mispredicts it half the time, which made this kernel twice as slow).
template <typename V>
inline V select_bits(bool take, V a, V b) {
  using U = std::conditional_t<sizeof(V) == 8, uint64_t, uint32_t>;
  static_assert(sizeof(V) == sizeof(U), "4- or 8-byte values only");
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(V));
  std::memcpy(&ub, &b, sizeof(V));
  const U mask = U(0) - static_cast<U>(take);
  const U r = (ua & mask) | (ub & ~mask);
  V out;
  std::memcpy(&out, &r, sizeof(V));
  return out;
}

// One output row at a time, window offset (kh, kw) outer and output column inner: the inner loop
// is a branch-free running max over contiguous (or strided) input, which the compiler vectorises;
// a data-dependent branch here mispredicts on every other element of random data. Each window
// still visits its elements in torch's order (row by row), so ties (first wins), NaN (last NaN
// wins) and all -inf windows (first in-range element) give torch's exact indices.
#if FASTCONV_HAVE_AVX512_KERNELS
// KxK windows (K = 2 or 3), stride 2, no padding or dilation, float32: 16 outputs per step. The
// even and odd input columns are split with two-source permutes and the K*K candidates compared in
// torch's visiting order (row by row, column by column) with "greater, or NaN" masks, so ties, NaN
// and -inf give torch's indices exactly. The MNIST CNN, LeNet and SimpleConvNet pool 2x2/2,
// AlexNet 3x3/2.
int max_pool2d_vector_kernel(const Pool2dParams& p) {
  const bool shape = p.kernel_h == p.kernel_w && (p.kernel_h == 2 || p.kernel_h == 3) && p.stride_h == 2 &&
                     p.stride_w == 2 && p.pad_h == 0 && p.pad_w == 0 && p.dilation_h == 1 && p.dilation_w == 1;
  if (!shape || !cpu::has_avx512()) return 0;
  const int64_t k = p.kernel_h;
  // every window wholly inside the input (true in floor mode; ceil mode may clip the last one)
  const bool inside = 2 * (p.out_h - 1) + k <= p.in_h && 2 * (p.out_w - 1) + k <= p.in_w;
  return inside ? static_cast<int>(k) : 0;
}

template <int K>
__attribute__((target("avx512f"))) void max_pool2d_stride2_planes(const float* in, float* out, int64_t* idx,
                                                                  const Pool2dParams& p, int64_t begin, int64_t end) {
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
        // input columns 2*ow .. 2*ow + 2n - 1 (the last odd one is read only when K == 2 or 3 needs it)
        const int64_t cols = 2 * n;
        const __mmask16 lo = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1u);
        const __mmask16 hi = cols > 16 ? __mmask16((1u << (cols - 16)) - 1u) : __mmask16(0);
        // third column of each window, 2*ow + 2 + 2*lane: only even lanes 0 .. 2n - 2 are needed
        const int64_t cols3 = 2 * n - 1;
        const __mmask16 lo3 = cols3 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols3) - 1u);
        const __mmask16 hi3 = cols3 > 16 ? __mmask16((1u << (cols3 - 16)) - 1u) : __mmask16(0);
        __m512 v[kCand];
        int64_t offset[kCand];
        for (int r = 0; r < K; ++r) {
          const float* row = src + (2 * oh + r) * W + 2 * ow;
          const __m512 a0 = _mm512_maskz_loadu_ps(lo, row), a1 = _mm512_maskz_loadu_ps(hi, row + 16);
          v[r * K + 0] = _mm512_permutex2var_ps(a0, even, a1);
          v[r * K + 1] = _mm512_permutex2var_ps(a0, odd, a1);
          offset[r * K + 0] = r * W;
          offset[r * K + 1] = r * W + 1;
          if constexpr (K == 3) {
            const __m512 c0 = _mm512_maskz_loadu_ps(lo3, row + 2), c1 = _mm512_maskz_loadu_ps(hi3, row + 18);
            v[r * K + 2] = _mm512_permutex2var_ps(c0, even, c1);
            offset[r * K + 2] = r * W + 2;
          }
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

template <typename T>
void max_pool2d_forward_kernel(const T* in, T* out, int64_t* idx, const Pool2dParams& p) {
#if FASTCONV_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (const int k = max_pool2d_vector_kernel(p)) {
      at::parallel_for(0, p.batch * p.channels, 16, [&](int64_t begin, int64_t end) {
        if (k == 2) {
          max_pool2d_stride2_planes<2>(in, out, idx, p, begin, end);
        } else {
          max_pool2d_stride2_planes<3>(in, out, idx, p, begin, end);
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
          best[ow] = -std::numeric_limits<acc_t>::infinity();
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
        _mm512_mask_storeu_ps(dst + ih * W + iw0, lanes, _mm512_maskz_mov_ps(hit, g_lanes));
      }
    }
    for (int64_t ih = oh * kh; ih < ih_end; ++ih) std::fill(dst + ih * W + covered_w, dst + (ih + 1) * W, 0.f);
  }
  std::fill(dst + covered_h * W, dst + in_plane, 0.f);  // rows past the last window
}
#endif

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
      std::fill(dst, dst + in_plane, T(0));
#if FASTCONV_HAVE_AVX512_KERNELS
      if constexpr (std::is_same_v<T, float>) {
        if (flat) {
          max_pool2d_backward_plane_flat(src, ind, dst, p, *windows);
          continue;
        }
      }
#endif
      // Indices come from the user on this path. One behaviour on every backend (conv_params.h,
      // check_max_pool2d_backward): an index outside its output's window contributes nothing.
      // Without dilation, an index is in its window iff, for some window row r, at - (top-left + r*W)
      // is a column of the window inside the plane: a few compares, no division (six divisions per
      // element made this loop 3x slower than torch's).
      const bool dilated = p.dilation_h != 1 || p.dilation_w != 1;
      for (int64_t oh = 0; oh < p.out_h; ++oh) {
        const int64_t h0 = oh * p.stride_h - p.pad_h;
        for (int64_t ow = 0; ow < p.out_w; ++ow) {
          const int64_t o = oh * p.out_w + ow;
          const int64_t at = ind[o];
          if (at < 0 || at >= in_plane) continue;
          const int64_t w0 = ow * p.stride_w - p.pad_w;
          bool inside = false;
          if (!dilated) {
            const int64_t c_lo = std::max<int64_t>(0, -w0), c_hi = std::min(p.kernel_w, p.in_w - w0);
            for (int64_t r = 0; r < p.kernel_h; ++r) {  // no early exit: which row holds the max is random
              const int64_t c = at - ((h0 + r) * p.in_w + w0);
              inside |= (h0 + r >= 0) & (c >= c_lo) & (c < c_hi);
            }
          } else {
            const int64_t dh = at / p.in_w - h0, dw = at % p.in_w - w0;
            inside = dh >= 0 && dw >= 0 && dh % p.dilation_h == 0 && dw % p.dilation_w == 0 &&
                     dh / p.dilation_h < p.kernel_h && dw / p.dilation_w < p.kernel_w;
          }
          dst[at] += inside ? src[o] : T(0);  // a select, not a branch
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode) {
  const Pool2dParams p = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  const at::Tensor input_c = input.contiguous();
  at::Tensor out = at::empty({p.batch, p.channels, p.out_h, p.out_w}, input.options());
  at::Tensor idx = at::empty({p.batch, p.channels, p.out_h, p.out_w}, input.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, idx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastconv_max_pool2d_cpu", [&] {
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
