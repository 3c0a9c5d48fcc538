// Direct conv2d kernels for grouped convolutions with few channels per group (depthwise above all).
//
// im2col+GEMM is the wrong shape there: a depthwise 3x3 is a GEMM with M = 1 output row and K = 9 per
// group, which no register tile can fill. These kernels work on whole planes instead: each output
// row accumulates KH*KW shifted input rows (vectorised along the row, 16 floats per AVX-512 step for
// stride 1), backward-input of a stride-1 conv is the same kernel on grad_output with flipped weights,
// and backward-weight is a dot product of grad_output rows with shifted input rows. With one input
// channel per group (depthwise, channel multipliers) on AVX-512, every layer whose planes fit in cache
// runs on phase planes instead (PhasePlanes below: any stride as contiguous runs, no idle lanes on
// short rows; use_phase_planes), and the forward and backward-input of depthwise layers with 5x5 and
// larger kernels, or small planes, with 16 channels in the lanes (use_channel_lanes).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "conv_params.h"
#include "cpu/conv2d_avx512.h"
#include "cpu/flipped_conv.h"
#include "cpu/gemm.h"
#include "cpu/gemm_avx2.h"

namespace fastconv {
namespace cpu {
namespace direct {

// Few channels per group: the direct kernels beat a GEMM whose M and K are a handful (on the AVX-512
// engine only depthwise layers take them: conv2d.cpp, run_direct).
inline bool use_direct(const Conv2dParams& p) {
  return p.groups > 1 && p.in_channels_per_group() <= 4 && p.out_channels_per_group() <= 4;
}

// output columns [lo, hi) whose input column ow*stride + off lies inside [0, in)
inline void column_range(int64_t off, int64_t stride, int64_t in, int64_t out, int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
  hi = in - off <= 0 ? 0 : (in - off + stride - 1) / stride;
  lo = std::min(lo, out);
  hi = std::clamp(hi, lo, out);
}

#if FASTCONV_HAVE_AVX512_KERNELS
FASTCONV_AVX512 inline void axpy_row_avx512(float* acc, const float* src, float w, int64_t lo, int64_t hi) {
  const __m512 wv = _mm512_set1_ps(w);
  int64_t o = lo;
  for (; o + 16 <= hi; o += 16) {
    _mm512_storeu_ps(acc + o, _mm512_fmadd_ps(wv, _mm512_loadu_ps(src + o), _mm512_loadu_ps(acc + o)));
  }
  if (o < hi) {
    const __mmask16 m = lane_mask(0, hi - o);
    _mm512_mask_storeu_ps(acc + o, m,
                          _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, src + o), _mm512_maskz_loadu_ps(m, acc + o)));
  }
}

// One output row of a direct conv at stride 1: every tap of the window in registers, four
// independent 16-output accumulators per step (one accumulator made the 9 FMAs a latency chain;
// a call per tap and row cost more than the FMAs). masks[chunk*KW + kw]: the lanes whose input
// column lies inside the image. Adds to the row when `accumulate` (later channels of a group).
FASTCONV_AVX512 inline void conv_row_avx512(float* out, const float* in, const float* w, float bias, bool accumulate,
                                            int64_t oh, const Conv2dParams& p, const uint16_t* masks) {
  const int64_t OW = p.out_w, KW = p.kernel_w;
  for (int64_t ow0 = 0; ow0 < OW; ow0 += 64) {
    const int chunks = static_cast<int>(std::min<int64_t>(4, (OW - ow0 + 15) / 16));
    __m512 acc[4];
    __mmask16 m[4];
    for (int j = 0; j < 4; ++j) {
      m[j] = j < chunks ? lane_mask(0, OW - ow0 - 16 * j) : __mmask16(0);
      acc[j] = accumulate ? _mm512_maskz_loadu_ps(m[j], out + ow0 + 16 * j) : _mm512_set1_ps(bias);
    }
    const uint16_t* mk = masks + (ow0 / 16) * KW;
    for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
      const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dilation_h;
      if (ih < 0 || ih >= p.in_h) continue;
      const float* row = in + ih * p.in_w + ow0 - p.pad_w;
      for (int64_t kw = 0; kw < KW; ++kw) {
        const __m512 wv = _mm512_set1_ps(w[kh * KW + kw]);
        const float* src = row + kw * p.dilation_w;
        for (int j = 0; j < 4; ++j) {
          if (j < chunks) {
            acc[j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(__mmask16(mk[j * KW + kw]), src + 16 * j), acc[j]);
          }
        }
      }
    }
    for (int j = 0; j < chunks; ++j) _mm512_mask_storeu_ps(out + ow0 + 16 * j, m[j], acc[j]);
  }
}

// The masks conv_row_avx512 reads: per 16-column chunk and kw, the lanes with the input inside.
inline std::vector<uint16_t> row_masks(const Conv2dParams& p, const std::vector<int64_t>& lo,
                                       const std::vector<int64_t>& hi) {
  const int64_t chunks = (p.out_w + 15) / 16 + 3;  // + 3: the unused chunks of the last 64-column step
  std::vector<uint16_t> masks(chunks * p.kernel_w);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t kw = 0; kw < p.kernel_w; ++kw)
      masks[c * p.kernel_w + kw] = lane_mask(lo[kw] - 16 * c, hi[kw] - 16 * c) & lane_mask(0, p.out_w - 16 * c);
  return masks;
}

FASTCONV_AVX512 inline float dot_row_avx512(const float* a, const float* b, int64_t lo, int64_t hi) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t o = lo;
  for (; o + 32 <= hi; o += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + o), _mm512_loadu_ps(b + o), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + o + 16), _mm512_loadu_ps(b + o + 16), s1);
  }
  for (; o < hi; o += 16) {
    const __mmask16 m = lane_mask(0, hi - o);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + o), _mm512_maskz_loadu_ps(m, b + o), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// sums[kw] = sum over the rows r < rows of sum_o a_r[o] * b_r[o + off[kw]] for o in [lo[kw], hi[kw]) (rows
// `a_ld` / `b_ld` apart, rows of `cols` outputs; stride 1): every kernel column of one kernel row in
// one pass, each grad_output vector loaded once for all of them and one horizontal sum per tap at the end.
FASTCONV_AVX512 inline void dot_rows_taps_avx512(const float* a, int64_t a_ld, const float* b, int64_t b_ld,
                                                 int64_t rows, int64_t cols, const int64_t* off, const int64_t* lo,
                                                 const int64_t* hi, int64_t KW, float* sums) {
  constexpr int64_t kMaxTaps = 8, kMaxVectors = 16;
  if (cols > 16 * kMaxVectors) {  // wide rows: in pieces of kMaxVectors vectors
    std::vector<float> part(KW);
    std::fill(sums, sums + KW, 0.f);
    for (int64_t o0 = 0; o0 < cols; o0 += 16 * kMaxVectors) {
      const int64_t n = std::min(16 * kMaxVectors, cols - o0);
      std::vector<int64_t> l(KW), h(KW);
      for (int64_t kw = 0; kw < KW; ++kw) l[kw] = lo[kw] - o0, h[kw] = hi[kw] - o0;
      dot_rows_taps_avx512(a + o0, a_ld, b + o0, b_ld, rows, n, off, l.data(), h.data(), KW, part.data());
      for (int64_t kw = 0; kw < KW; ++kw) sums[kw] += part[kw];
    }
    return;
  }
  const int64_t nv = (cols + 15) / 16;
  for (int64_t kw0 = 0; kw0 < KW; kw0 += kMaxTaps) {
    const int64_t taps = std::min(kMaxTaps, KW - kw0);
    __mmask16 masks[kMaxVectors][kMaxTaps];  // the lanes of vector v whose input column of tap t is inside
    for (int64_t v = 0; v < nv; ++v) {
      for (int64_t t = 0; t < taps; ++t) masks[v][t] = lane_mask(lo[kw0 + t] - 16 * v, hi[kw0 + t] - 16 * v);
    }
    __m512 acc[kMaxTaps];
    for (int64_t t = 0; t < kMaxTaps; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const float* ar = a + r * a_ld;
      const float* br = b + r * b_ld;
      for (int64_t v = 0; v < nv; ++v) {
        const __m512 g = _mm512_maskz_loadu_ps(lane_mask(0, cols - 16 * v), ar + 16 * v);
        for (int64_t t = 0; t < taps; ++t) {
          acc[t] = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(masks[v][t], br + 16 * v + off[kw0 + t]), acc[t]);
        }
      }
    }
    for (int64_t t = 0; t < taps; ++t) sums[kw0 + t] = _mm512_reduce_add_ps(acc[t]);
  }
}
#endif

#if FASTCONV_HAVE_AVX512_KERNELS
// dst[0, n) = src[0, n), 16 floats per step (rows here are short: a memcpy call each cost more)
FASTCONV_AVX512 inline void copy_floats(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lane_mask(0, n - i);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_maskz_loadu_ps(m, src + i));
  }
}

// ---- One input channel per group, float32, any stride: phase planes -----------------------------
// Lanes of `vectors` 16-lane vectors picked by keep(i) (i the flat lane index): per vector its mask
// and the number of kept lanes before it, so a contiguous run of the kept values maps to the vectors by
// expand (expand_runs) and back by compress (store_virtual).
template <typename Keep>
inline void lane_runs(int64_t vectors, Keep keep, std::vector<__mmask16>& masks, std::vector<int64_t>& firsts) {
  masks = lane_masks(vectors, keep);
  firsts.resize(vectors);
  for (int64_t j = 0, count = 0; j < vectors; ++j) {
    firsts[j] = count;
    count += __builtin_popcount(masks[j]);
  }
}

// dst vector j = the next popcount(masks[j]) floats of src from firsts[j], spread to the lanes of
// masks[j], the other lanes zero
FASTCONV_AVX512 inline void expand_runs(const float* src, const std::vector<__mmask16>& masks,
                                        const std::vector<int64_t>& firsts, float* dst) {
  for (size_t j = 0; j < masks.size(); ++j) {
    const __m512 x = _mm512_maskz_loadu_ps(lane_mask(0, __builtin_popcount(masks[j])), src + firsts[j]);
    _mm512_storeu_ps(dst + 16 * j, _mm512_maskz_expand_ps(masks[j], x));
  }
}

// The zero-padded input plane is split into stride_h x stride_w phase planes (rows i = a mod sh,
// columns j = b mod sw) of Hq x Wq floats. Tap (kh, kw) of output pixel (oh, ow) then reads phase
// (kh*dh mod sh, kw*dw mod sw) at row oh + kh*dh/sh and column ow + kw*dw/sw: on the "virtual" output
// plane v = oh*Wq + ow (columns ow >= OW are junk) every tap is one contiguous run at a fixed offset,
// so each 16-lane vector of virtual outputs is KH*KW loads and FMAs whatever the stride or the plane
// width. Row by row (conv_row_avx512) a 7-pixel row used 7 of 16 lanes, and strides past 1 ran scalar
// (MobileNet's layers: 1.1-3.1x torch's time).
struct PhasePlanes {
  int64_t sh, sw, pad_h, pad_w, H, W, Hq, Wq, plane, size, OH, OW, V, vecs;
  std::vector<int64_t> off;      // per tap: its run's offset in the phase planes
  std::vector<__mmask16> valid;  // per virtual vector: the lanes of real outputs (ow < OW, v < V)
  std::vector<int64_t> first;    // per virtual vector: the real outputs before it (their plane offset)
  // stride 1 (one phase plane, the padded plane): per vector of it, the lanes holding input and the
  // input floats before it
  std::vector<__mmask16> in_lanes;
  std::vector<int64_t> in_first;
  explicit PhasePlanes(const Conv2dParams& p)
      : sh(p.stride_h), sw(p.stride_w), pad_h(p.pad_h), pad_w(p.pad_w), H(p.in_h), W(p.in_w), OH(p.out_h), OW(p.out_w) {
    Hq = engine::ceil_div(H + 2 * pad_h, sh);
    Wq = engine::ceil_div(W + 2 * pad_w, sw);
    plane = Hq * Wq;
    V = OH * Wq;
    vecs = engine::ceil_div(V, 16);
    int64_t most = 0;
    for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
        const int64_t r = kh * p.dilation_h, c = kw * p.dilation_w;
        off.push_back(((r % sh) * sw + c % sw) * plane + (r / sh) * Wq + c / sw);
        most = std::max(most, off.back());
      }
    }
    size = std::max(sh * sw * plane, most + 16 * vecs) + 16;  // runs of junk lanes read past the planes
    lane_runs(vecs, [&](int64_t v) { return v < V && v % Wq < OW; }, valid, first);
    if (sh == 1 && sw == 1) {
      lane_runs(
          engine::ceil_div(plane, 16),
          [&](int64_t i) {
            const int64_t r = i / Wq - pad_h, c = i % Wq - pad_w;
            return i < plane && r >= 0 && r < H && c >= 0 && c < W;
          },
          in_lanes, in_first);
    }
  }
  // q[size] all zero: the padding of the phase planes (split writes only the input's positions, the
  // same ones for every plane of a call, so a task clears its buffer once)
  void clear(float* q) const { std::memset(q, 0, size * sizeof(float)); }
  // the phase planes of one input plane into q (cleared before, by this call's geometry)
  FASTCONV_AVX512 void split(const float* in, float* q) const {
    if (sh == 1 && sw == 1) return expand_runs(in, in_lanes, in_first, q);  // the padded plane, 16 floats at a time
    for (int64_t ih = 0; ih < H; ++ih) {
      const int64_t i = ih + pad_h;
      float* row = q + (i % sh) * sw * plane + (i / sh) * Wq;
      const float* src = in + ih * W;
      if (sw == 1) {
        copy_floats(row + pad_w, src, W);
      } else if (sw == 2) {
        // 32 input columns per step: the even ones to one phase row, the odd ones to the other
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        for (int64_t iw = 0; iw < W; iw += 32) {
          const int64_t n = std::min<int64_t>(32, W - iw);
          const __m512 v0 = _mm512_maskz_loadu_ps(lane_mask(0, n), src + iw);
          const __m512 v1 = _mm512_maskz_loadu_ps(lane_mask(0, n - 16), src + iw + 16);
          const int64_t j0 = iw + pad_w, j1 = j0 + 1;  // columns of lanes 0 and 1
          _mm512_mask_storeu_ps(row + (j0 % 2) * plane + j0 / 2, lane_mask(0, (n + 1) / 2),
                                _mm512_permutex2var_ps(v0, even, v1));
          _mm512_mask_storeu_ps(row + (j1 % 2) * plane + j1 / 2, lane_mask(0, n / 2),
                                _mm512_permutex2var_ps(v0, odd, v1));
        }
      } else {
        for (int64_t iw = 0; iw < W; ++iw) {
          const int64_t j = iw + pad_w;
          row[(j % sw) * plane + j / sw] = src[iw];
        }
      }
    }
  }
  // the inverse for gradients: g[ih][iw] = q at the padded position (ih + pad_h, iw + pad_w)
  FASTCONV_AVX512 void gather(const float* q, float* g) const {
    for (int64_t ih = 0; ih < H; ++ih) {
      const int64_t i = ih + pad_h;
      const float* row = q + (i % sh) * sw * plane + (i / sh) * Wq;
      float* dst = g + ih * W;
      if (sw == 1) {
        copy_floats(dst, row + pad_w, W);
      } else if (sw == 2) {
        const __m512i lo = interleave_lo(), hi = interleave_hi();
        for (int64_t iw = 0; iw < W; iw += 32) {
          const int64_t n = std::min<int64_t>(32, W - iw);
          const int64_t j0 = iw + pad_w, j1 = j0 + 1;
          const __m512 a = _mm512_loadu_ps(row + (j0 % 2) * plane + j0 / 2);  // lanes 0, 2, 4, ...
          const __m512 b = _mm512_loadu_ps(row + (j1 % 2) * plane + j1 / 2);  // lanes 1, 3, 5, ...
          _mm512_mask_storeu_ps(dst + iw, lane_mask(0, n), _mm512_permutex2var_ps(a, lo, b));
          _mm512_mask_storeu_ps(dst + iw + 16, lane_mask(0, n - 16), _mm512_permutex2var_ps(a, hi, b));
        }
      } else {
        for (int64_t iw = 0; iw < W; ++iw) {
          const int64_t j = iw + pad_w;
          dst[iw] = row[(j % sw) * plane + j / sw];
        }
      }
    }
  }
};

// Virtual vector j of a result into its output plane: the real lanes packed together, stored at their
// place (rows of virtual outputs are Wq apart, the output's OW: copying them row by row through a
// buffer was more than the FMAs on 7x7 planes).
FASTCONV_AVX512 inline void store_virtual(const PhasePlanes& pp, int64_t j, __m512 acc, float* out) {
  _mm512_mask_storeu_ps(out + pp.first[j], lane_mask(0, __builtin_popcount(pp.valid[j])),
                        _mm512_maskz_compress_ps(pp.valid[j], acc));
}

// out = bias + sum over taps t of w[t] * q[off[t] + v] for the real virtual outputs v, into the plane
FASTCONV_AVX512 inline void conv_virtual(const float* q, const PhasePlanes& pp, const float* w, int64_t taps,
                                         float bias, float* out) {
  int64_t j = 0;
  for (; j + 4 <= pp.vecs; j += 4) {  // four independent accumulators per step of the taps
    __m512 acc[4];
    for (int u = 0; u < 4; ++u) acc[u] = _mm512_set1_ps(bias);
    for (int64_t t = 0; t < taps; ++t) {
      const __m512 wv = _mm512_set1_ps(w[t]);
      const float* src = q + pp.off[t] + 16 * j;
      for (int u = 0; u < 4; ++u) acc[u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(src + 16 * u), acc[u]);
    }
    for (int u = 0; u < 4; ++u) store_virtual(pp, j + u, acc[u], out);
  }
  for (; j < pp.vecs; ++j) {
    __m512 acc = _mm512_set1_ps(bias);
    for (int64_t t = 0; t < taps; ++t) {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(w[t]), _mm512_loadu_ps(q + pp.off[t] + 16 * j), acc);
    }
    store_virtual(pp, j, acc, out);
  }
}

// Strides past 1 and rows under 32 pixels always; stride-1 rows of 32+ pixels while the padded plane
// (backward-weight: with grad_output's virtual plane beside it) stays within cache, past which the row
// kernels win. Measured, 2 threads, Intel host, batch 8, phase planes against the row kernels: forward
// and backward-input 96 at 56x56 0.63x the time, 144 at 56x56 0.60-0.62x, 32 at 112x112 0.80-0.82x,
// 16 at 150x150 0.74-0.83x, 32 at 224x224 (a 200 KiB padded plane) 0.99-1.06x; backward-weight 64 at
// 72x72 0.74x, 32 at 112x112 (103 KiB) 0.83x, 16 at 150x150 (183 KiB) 0.76x, 32 at 224x224 (407 KiB)
// 0.99x, 16 at 300x300 (725 KiB) 1.37x.
inline bool use_phase_planes(const Conv2dParams& p, bool weight_grad = false) {
  if (!has_avx512() || p.in_channels_per_group() != 1) return false;
  if (p.stride_h > 1 || p.stride_w > 1 || p.out_w < 32) return true;
  const int64_t padded = (p.in_h + 2 * p.pad_h) * (p.in_w + 2 * p.pad_w);
  return weight_grad ? (padded + p.out_h * (p.in_w + 2 * p.pad_w)) * 4 <= (int64_t(256) << 10)
                     : padded * 4 <= (int64_t(128) << 10);
}

// out[n][oc] for one input channel per group: per (image, output channel) plane, its input's phase
// planes (kept while consecutive output channels share the input channel), then every virtual vector
// as KH*KW FMAs, the real lanes stored into the output plane.
inline void forward_phases(const float* input, const float* weight, const float* bias, float* output,
                           const Conv2dParams& p) {
  const PhasePlanes pp(p);
  const int64_t OCg = p.out_channels_per_group(), KK = p.kernel_h * p.kernel_w;
  at::parallel_for(0, p.batch * p.out_channels, 1, [&](int64_t begin, int64_t end) {
    thread_local engine::AlignedBuffer qbuf;
    float* q = qbuf.get(pp.size);
    pp.clear(q);
    int64_t split_of = -1;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / p.out_channels, oc = plane % p.out_channels, c = oc / OCg;
      if (n * p.in_channels + c != split_of) {
        pp.split(input + (n * p.in_channels + c) * p.in_plane(), q);
        split_of = n * p.in_channels + c;
      }
      conv_virtual(q, pp, weight + oc * KK, KK, bias ? bias[oc] : 0.f, output + plane * p.out_plane());
    }
  });
}

// grad_output's plane in the virtual layout (rows Wq floats apart, junk lanes zero): store_virtual undone
FASTCONV_AVX512 inline void to_virtual(const float* go, const PhasePlanes& pp, float* go_v) {
  expand_runs(go, pp.valid, pp.first, go_v);
}

// gq[off[t] + v] += w[t] * go_v[v] over the real virtual outputs v, tap after tap
FASTCONV_AVX512 inline void scatter_virtual(const float* go_v, const PhasePlanes& pp, const float* w, int64_t taps,
                                            float* gq) {
  for (int64_t t = 0; t < taps; ++t) {
    const __m512 wv = _mm512_set1_ps(w[t]);
    float* dst = gq + pp.off[t];
    for (int64_t j = 0; j < pp.vecs; ++j) {
      const __m512 acc = _mm512_loadu_ps(dst + 16 * j);
      _mm512_storeu_ps(dst + 16 * j, _mm512_mask3_fmadd_ps(wv, _mm512_loadu_ps(go_v + 16 * j), acc, pp.valid[j]));
    }
  }
}

// grad_input for one input channel per group: per (image, input channel), the phase planes of its
// gradient summed over the group's output channels tap by tap, then gathered back into the plane.
inline void backward_input_phases(const float* grad_output, const float* weight, float* grad_input,
                                  const Conv2dParams& p) {
  const PhasePlanes pp(p);
  const int64_t OCg = p.out_channels_per_group(), KK = p.kernel_h * p.kernel_w;
  at::parallel_for(0, p.batch * p.in_channels, 1, [&](int64_t begin, int64_t end) {
    thread_local engine::AlignedBuffer qbuf, vbuf;
    float* gq = qbuf.get(pp.size);
    float* go_v = vbuf.get(16 * pp.vecs);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / p.in_channels, c = plane % p.in_channels;
      pp.clear(gq);
      for (int64_t o = 0; o < OCg; ++o) {
        const int64_t oc = c * OCg + o;
        to_virtual(grad_output + (n * p.out_channels + oc) * p.out_plane(), pp, go_v);
        scatter_virtual(go_v, pp, weight + oc * KK, KK, gq);
      }
      pp.gather(gq, grad_input + plane * p.in_plane());
    }
  });
}

FASTCONV_AVX512 inline float reduce_lanes(const float* v) { return _mm512_reduce_add_ps(_mm512_load_ps(v)); }

// acc[t] (16 lane sums per tap) += go_v[v] * q[off[t] + v] over the real virtual outputs v, for NT taps
// in one pass over go_v, an accumulator per tap (tap after tap, each FMA had waited on the one before:
// a chain of FMA latencies)
template <int NT>
FASTCONV_AVX512 inline void dot_virtual_taps(const float* go_v, const float* q, const PhasePlanes& pp,
                                             const int64_t* off, float* acc) {
  __m512 a[NT];
  for (int t = 0; t < NT; ++t) a[t] = _mm512_load_ps(acc + 16 * t);
  for (int64_t j = 0; j < pp.vecs; ++j) {
    const __m512 g = _mm512_loadu_ps(go_v + 16 * j);
    for (int t = 0; t < NT; ++t)
      a[t] = _mm512_mask3_fmadd_ps(g, _mm512_loadu_ps(q + off[t] + 16 * j), a[t], pp.valid[j]);
  }
  for (int t = 0; t < NT; ++t) _mm512_store_ps(acc + 16 * t, a[t]);
}

// dot_virtual_taps for the NT (at most 9) taps at off, NT fixed at compile time
template <int NT = 9>
FASTCONV_AVX512 inline void dot_virtual_block(int64_t nt, const float* go_v, const float* q, const PhasePlanes& pp,
                                              const int64_t* off, float* acc) {
  if constexpr (NT > 1) {
    if (nt < NT) return dot_virtual_block<NT - 1>(nt, go_v, q, pp, off, acc);
  }
  dot_virtual_taps<NT>(go_v, q, pp, off, acc);
}

// dot_virtual_taps over all taps, 9 at a time (a 3x3 kernel in one pass)
FASTCONV_AVX512 inline void dot_virtual(const float* go_v, const float* q, const PhasePlanes& pp, int64_t taps,
                                        float* acc) {
  for (int64_t t0 = 0; t0 < taps; t0 += 9) {
    dot_virtual_block(std::min<int64_t>(9, taps - t0), go_v, q, pp, pp.off.data() + t0, acc + 16 * t0);
  }
}

// grad_weight for one input channel per group: one output channel per task, images in order, lane sums
// reduced once at the end (the result does not depend on the thread count).
inline void backward_weight_phases(const float* grad_output, const float* input, float* grad_weight,
                                   const Conv2dParams& p) {
  const PhasePlanes pp(p);
  const int64_t OCg = p.out_channels_per_group(), KK = p.kernel_h * p.kernel_w;
  at::parallel_for(0, p.out_channels, 1, [&](int64_t begin, int64_t end) {
    thread_local engine::AlignedBuffer qbuf, vbuf, abuf;
    float* q = qbuf.get(pp.size);
    float* go_v = vbuf.get(16 * pp.vecs);
    float* acc = abuf.get(16 * KK);
    pp.clear(q);
    for (int64_t oc = begin; oc < end; ++oc) {
      const int64_t c = oc / OCg;
      std::fill(acc, acc + 16 * KK, 0.f);
      for (int64_t n = 0; n < p.batch; ++n) {
        pp.split(input + (n * p.in_channels + c) * p.in_plane(), q);
        to_virtual(grad_output + (n * p.out_channels + oc) * p.out_plane(), pp, go_v);
        dot_virtual(go_v, q, pp, KK, acc);
      }
      for (int64_t t = 0; t < KK; ++t) grad_weight[oc * KK + t] = reduce_lanes(acc + 16 * t);
    }
  });
}

// ---- One channel per group (depthwise), float32: the channels in the lanes --------------------------
// On small planes most lanes of the phase planes' virtual vectors are junk (a 7x7 output padded by 3:
// 49 of 96), and their accumulators are few and long chains. Here 16 channels of one image share the
// vectors: the input rows an item reads are transposed once into [column][16] rows (zero-padded), each
// output pixel of a tile is one accumulator, and each tap is one weight vector and one FMA per pixel
// (the input vector a memory operand); each output row goes back into its 16 planes through 16x16
// register transposes. Items: (image, block of 16 channels, run of output rows), the rows split only
// when there are too few (image, block) pairs for the threads.
constexpr int kLanePixels = 8;  // accumulators of a tile: at most 8 pixels of one output row

// Where (auto): kernels of 20+ taps (5x5, 7x7) at any size and stride, and 3x3 on planes at most 8
// wide; phase planes for the other 3x3 layers, where the two transposes cost more than the lanes save.
// Measured, 2 threads, Intel host, batch 8, time against phase planes (forward / stride-1
// backward-input): ConvNeXt's 7x7 at 56x56 0.50/0.59x, 28x28 0.58/0.63x, 14x14 0.54/0.54x, 7x7
// 0.31/0.33x; EfficientNet's 5x5 at 28x28 0.79/0.82x, 7x7 0.48/0.47x, stride 2 0.56x (forward);
// MobileNetV3's 5x5 with 40 channels at 56x56 0.84x; MobileNet's 3x3 at 7x7 0.71/0.67x, but at 14x14
// 1.38x, stride 2 1.30x, 112x112 1.11x. Strided backward-input (by phases, against the phase planes'
// scatter): EfficientNet's 5x5/2 at 14x14 0.66x, 72 channels at 56x56 0.78x, 3x3/2 level (1.00-1.03x).
// That is the rule on Intel hosts. On AMD hosts the lanes take every forward (and stride-1
// backward-input, the forward with flipped weights): measured, 2 threads, Zen 4, batch 8, after
// LaneBuffer::fill's rewrite, time against the phase planes (forward / backward-input): MobileNetV2's
// 3x3 at 14x14 0.90/0.97x, 3x3 at 56x56 0.96/0.87x, 3x3/2 from 56x56 0.78x, from 112x112 0.52x; the
// strided backward-input keeps the rule above (3x3/2 from 56x56 1.08x, from 112x112 0.86x).
// FASTCONV_DW_LANES=0/1 forces them off/on (depthwise float32 forward, backward-input and
// backward-weight).
inline bool use_channel_lanes(const Conv2dParams& p, bool strided_backward_input = false) {
  if (!has_avx512() || p.in_channels_per_group() != 1 || p.out_channels_per_group() != 1) return false;
  const int f = forced("FASTCONV_DW_LANES", '0', '1');
  if (f >= 0) return f == 1;
  return (!intel_avx512() && !strided_backward_input) || p.kernel_h * p.kernel_w >= 20 || p.out_w <= 8;
}

// out[i][0, 16) = sum over taps (kh, kw) of wt[kh*KW + kw] * in[kh*dh_step + kw*dw_step + i*sw_step], for
// the NPX pixels i of a tile (in, wt and out 64-byte aligned, steps in floats, multiples of 16).
template <int NPX, int SW>  // SW: the stride in pixels, 0 when given at run time (sw_step)
FASTCONV_AVX512 void lane_tile(const float* in, int64_t dh_step, int64_t dw_step, int64_t sw_step, const float* wt,
                               int64_t KH, int64_t KW, float* out) {
  const int64_t step = SW ? SW * 16 : sw_step;
  __m512 acc[NPX];
  for (int i = 0; i < NPX; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t kh = 0; kh < KH; ++kh) {
    const float* row = in + kh * dh_step;
    for (int64_t kw = 0; kw < KW; ++kw) {
      const __m512 w = _mm512_load_ps(wt + (kh * KW + kw) * 16);
      const float* src = row + kw * dw_step;
      for (int i = 0; i < NPX; ++i) acc[i] = _mm512_fmadd_ps(_mm512_load_ps(src + i * step), w, acc[i]);
    }
  }
  for (int i = 0; i < NPX; ++i) _mm512_store_ps(out + i * 16, acc[i]);
}

// lane_tile at stride 1 and dilation 1 for a KW-wide kernel: each input row's NPX + KW - 1 vectors
// loaded once and kept in registers for the KW taps of the row (loads per FMA (NPX+1)/NPX -> about 3/NPX).
template <int NPX, int KW>
FASTCONV_AVX512 void lane_tile_dense(const float* in, int64_t dh_step, int64_t, int64_t, const float* wt, int64_t KH,
                                     int64_t, float* out) {
  __m512 acc[NPX];
  for (int i = 0; i < NPX; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t kh = 0; kh < KH; ++kh) {
    const float* row = in + kh * dh_step;
    __m512 x[NPX + KW - 1];
    for (int j = 0; j < NPX + KW - 1; ++j) x[j] = _mm512_load_ps(row + j * 16);
    for (int kw = 0; kw < KW; ++kw) {
      const __m512 w = _mm512_load_ps(wt + (kh * KW + kw) * 16);
      for (int i = 0; i < NPX; ++i) acc[i] = _mm512_fmadd_ps(x[i + kw], w, acc[i]);
    }
  }
  for (int i = 0; i < NPX; ++i) _mm512_store_ps(out + i * 16, acc[i]);
}

using LaneTile = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, float*);

template <int SW, int... N>
constexpr std::array<LaneTile, sizeof...(N)> lane_tiles(std::integer_sequence<int, N...>) {
  return {&lane_tile<N + 1, SW>...};
}

template <int KW, int... N>
constexpr std::array<LaneTile, sizeof...(N)> dense_lane_tiles(std::integer_sequence<int, N...>) {
  return {&lane_tile_dense<N + 1, KW>...};
}

// The tile kernel for npx in [1, kLanePixels] pixels: lane_tile_dense for stride 1, dilation 1 and
// kernels 3, 5 and 7 wide, else lane_tile<npx, SW> for SW 1, 2 or any (0).
inline LaneTile lane_tile_for(int64_t npx, int64_t sw, int64_t dw, int64_t KW) {
  using Seq = std::make_integer_sequence<int, kLanePixels>;
  static const auto one = lane_tiles<1>(Seq()), two = lane_tiles<2>(Seq()), any = lane_tiles<0>(Seq());
  static const auto k3 = dense_lane_tiles<3>(Seq()), k5 = dense_lane_tiles<5>(Seq()), k7 = dense_lane_tiles<7>(Seq());
  if (sw == 1 && dw == 1 && (KW == 3 || KW == 5 || KW == 7)) return (KW == 3 ? k3 : KW == 5 ? k5 : k7)[npx - 1];
  return (sw == 1 ? one : sw == 2 ? two : any)[npx - 1];
}

// The weights of each block of 16 channels (one per group), one vector per tap: wt[b][tap][16], lanes
// past C zero.
inline const float* lane_weights(const float* weight, int64_t C, int64_t KK, engine::AlignedBuffer& buf) {
  const int64_t blocks = engine::ceil_div(C, 16);
  float* wt = buf.get(blocks * KK * 16);
  for (int64_t b = 0; b < blocks; ++b) {
    engine::columns_to_lanes(weight + b * 16 * KK, KK, std::min<int64_t>(16, C - 16 * b), KK,
                             [&](int64_t t) { return wt + (b * KK + t) * 16; });
  }
  return wt;
}

// Runs of rows of a lane kernel's output planes over (image, block of 16 channels) pairs: the rows are
// split only when the pairs are too few for the threads (4 items a thread).
struct LaneRuns {
  int64_t blocks, pairs, run_rows, runs, flush_rows;
  LaneRuns(int64_t batch, int64_t C, int64_t rows, int64_t width) {
    blocks = engine::ceil_div(C, 16);
    pairs = batch * blocks;
    const int64_t threads = at::get_num_threads();
    const int64_t wanted = pairs >= 4 * threads ? 1 : std::min(rows, engine::ceil_div(4 * threads, pairs));
    run_rows = engine::ceil_div(rows, wanted);
    runs = engine::ceil_div(rows, run_rows);
    // rows go to the planes `flush_rows` at a time: ~256 pixels, 16 to a transpose (a 7-pixel row alone
    // used 7 of its 16)
    flush_rows = std::clamp<int64_t>(256 / width, 1, run_rows);
  }
};

// A zero-padded [row][column][16] copy of 16 channel planes (H x W, plane floats apart) for the rows
// [r_lo, r_lo + rows) and columns [c_lo, c_lo + cols) of the planes' coordinates (outside: zeros).
struct LaneBuffer {
  int64_t H, W, c_lo, cols, row_floats, in_lo, in_hi;  // [in_lo, in_hi): the buffer columns holding input
  LaneBuffer(int64_t H_, int64_t W_, int64_t c_lo_, int64_t cols_)
      : H(H_), W(W_), c_lo(c_lo_), cols(cols_), row_floats(cols_ * 16) {
    in_lo = std::clamp<int64_t>(-c_lo, 0, cols);
    in_hi = std::clamp<int64_t>(W - c_lo, in_lo, cols);
  }
  // The buffer rows [r0, r1) that hold input rows, for rows [r_lo, r_lo + rows).
  void input_rows(int64_t r_lo, int64_t rows, int64_t& r0, int64_t& r1) const {
    r0 = std::clamp<int64_t>(-r_lo, 0, rows);
    r1 = std::clamp<int64_t>(H - r_lo, r0, rows);
  }
  // The zeros around the input (a thread's previous fill of the same call and the same rows left them).
  void zero(float* buf, int64_t r_lo, int64_t rows) const {
    int64_t r0, r1;
    input_rows(r_lo, rows, r0, r1);
    std::memset(buf, 0, r0 * row_floats * sizeof(float));
    std::memset(buf + r1 * row_floats, 0, (rows - r1) * row_floats * sizeof(float));
    for (int64_t r = r0; r < r1; ++r) {
      std::memset(buf + r * row_floats, 0, in_lo * 16 * sizeof(float));
      std::memset(buf + r * row_floats + in_hi * 16, 0, (cols - in_hi) * 16 * sizeof(float));
    }
  }
  // From NCHW planes (`nc` of them, `plane` floats apart); `zero_too`: write the zeros too.
  FASTCONV_AVX512 void fill(const float* planes, int64_t plane, int64_t nc, int64_t r_lo, int64_t rows, float* buf,
                            bool zero_too) const {
    if (zero_too) zero(buf, r_lo, rows);
    int64_t r0, r1;
    input_rows(r_lo, rows, r0, r1);
    if (r1 <= r0 || in_hi <= in_lo) return;
    // rows [r_lo + r0, r_lo + r1), contiguous in each plane: 16 pixels to a transpose whatever the row
    // length, each pixel to its place, row and column followed pixel by pixel in locals (through
    // transpose_columns' store callback, members and counters were reloaded from memory around every
    // vector store, which may alias them, and the vectors spilled: 0.33 -> 0.17 ms for MobileNetV2's
    // 3x3/2 backward-weight at 14x14, 2 threads, Zen 4)
    const float* src = planes + (r_lo + r0) * W;
    const int64_t total = (r1 - r0) * W, width = W, row_step = row_floats;
    const int64_t w_lo = in_lo + c_lo, w_hi = in_hi + c_lo;  // the plane columns kept
    float* at = buf + r0 * row_floats - c_lo * 16;           // pixel (row, column 0)
    int64_t w = 0;
    auto put = [&](const __m512& v) FASTCONV_AVX512 {
      if (w >= w_lo && w < w_hi) _mm512_store_ps(at + w * 16, v);
      if (++w == width) w = 0, at += row_step;
    };
    for (int64_t p0 = 0; p0 < total; p0 += 16) {
      const int64_t n = std::min<int64_t>(16, total - p0);
      const __mmask16 m = lane_mask(0, n);
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = j < nc ? _mm512_maskz_loadu_ps(m, src + j * plane + p0) : _mm512_setzero_ps();
      engine::transpose16(r);
      if (n == 16) {
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; ++i) put(r[i]);
      } else {
        for (int64_t i = 0; i < n; ++i) put(r[i]);
      }
    }
  }
  // From a channels_last image (its pixels C floats apart, `image` at its first channel): each pixel's
  // nc channels one masked load, no transposes.
  FASTCONV_AVX512 void fill_channels_last(const float* image, int64_t C, int64_t nc, int64_t r_lo, int64_t rows,
                                          float* buf, bool zero_too) const {
    if (zero_too) zero(buf, r_lo, rows);
    int64_t r0, r1;
    input_rows(r_lo, rows, r0, r1);
    const __mmask16 m = lane_mask(0, nc);
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = image + ((r_lo + r) * W + in_lo + c_lo) * C;
      float* dst = buf + r * row_floats + in_lo * 16;
      for (int64_t w = in_lo; w < in_hi; ++w, src += C, dst += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(src + 8 * C), _MM_HINT_T0);  // pixels C floats apart
        _mm512_store_ps(dst, _mm512_maskz_loadu_ps(m, src));
      }
    }
  }
};

// Whether this thread must write a LaneBuffer's zeros for run `run` of call `call` (a new call, or
// another run of rows since its last fill). One state for both lane kernels, each with its own
// buffer: every call takes a new id (lane_call_id) and fills one buffer.
inline bool lane_zeros_needed(uint64_t call, int64_t run) {
  thread_local uint64_t zeroed_call = 0;
  thread_local int64_t zeroed_run = -1;
  if (zeroed_call == call && zeroed_run == run) return false;
  zeroed_call = call, zeroed_run = run;
  return true;
}

inline uint64_t lane_call_id() {
  static std::atomic<uint64_t> calls{0};
  return ++calls;
}

// Pixel-major rows [px][16] (`count` pixels) into a channels_last output (pixels C floats apart, `out` at
// channel c0), + bias, then ReLU on request (max(floor, x) with floor 0 or -inf: NaN stays NaN).
FASTCONV_AVX512 inline void store_to_channels_last(const float* rows, int64_t count, int64_t C, int64_t nc,
                                                   const float* bias, bool relu, float* out) {
  const __mmask16 m = lane_mask(0, nc);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias) : _mm512_setzero_ps();
  const __m512 floor = _mm512_set1_ps(relu ? 0.0f : -std::numeric_limits<float>::infinity());
  for (int64_t px = 0; px < count; ++px) {
    _mm_prefetch(reinterpret_cast<const char*>(out + (px + 8) * C), _MM_HINT_T0);
    _mm512_mask_storeu_ps(out + px * C, m, _mm512_max_ps(floor, _mm512_add_ps(_mm512_load_ps(rows + px * 16), b)));
  }
}

// out = conv2d(input, weight) + bias for one channel per group and one output channel per group; with
// `channels_last`, input and output are NHWC in memory (no transposes at all), and `relu` applies ReLU
// as the output is stored (NHWC only).
inline void forward_channel_lanes(const float* input, const float* weight, const float* bias, float* output,
                                  const Conv2dParams& p, bool channels_last = false, bool relu = false) {
  TORCH_INTERNAL_ASSERT(channels_last || !relu, "forward_channel_lanes: ReLU is fused into the NHWC store only");
  const int64_t C = p.out_channels, H = p.in_h, W = p.in_w, OH = p.out_h, OW = p.out_w, L = p.out_plane();
  const int64_t KH = p.kernel_h, KW = p.kernel_w, KK = KH * KW;
  const int64_t sh = p.stride_h, sw = p.stride_w, dh = p.dilation_h, dw = p.dilation_w;
  engine::AlignedBuffer wbuf(false);  // written in full
  const float* wt = lane_weights(weight, C, KK, wbuf);
  // the buffer's columns: input columns -pad_w .. -pad_w + Wp - 1, every tap of the output row
  const LaneBuffer lb(H, W, -p.pad_w, (OW - 1) * sw + (KW - 1) * dw + 1);
  // the row's tiles: T of them, the first OW % T one pixel wider
  const int64_t tiles = engine::ceil_div(OW, kLanePixels), base = OW / tiles, wider = OW % tiles;
  const LaneRuns lr(p.batch, C, OH, OW);
  const uint64_t call = lane_call_id();
  at::parallel_for(0, lr.pairs * lr.runs, 1, [&](int64_t begin, int64_t end) {
    thread_local engine::AlignedBuffer in_buf(false), out_buf(false);  // written before read, every item
    float* out_rows = out_buf.get(lr.flush_rows * OW * 16);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (lr.blocks * lr.runs), b = (item / lr.runs) % lr.blocks, run = item % lr.runs;
      const int64_t c0 = 16 * b, nc = std::min<int64_t>(16, C - c0);
      const int64_t oh0 = run * lr.run_rows, oh1 = std::min(OH, oh0 + lr.run_rows);
      const int64_t ih0 = oh0 * sh - p.pad_h, rows = (oh1 - 1 - oh0) * sh + (KH - 1) * dh + 1;
      float* buf = in_buf.get(rows * lb.row_floats);
      if (channels_last) {
        lb.fill_channels_last(input + n * H * W * C + c0, C, nc, ih0, rows, buf, lane_zeros_needed(call, run));
      } else {
        lb.fill(input + (n * C + c0) * H * W, H * W, nc, ih0, rows, buf, lane_zeros_needed(call, run));
      }
      const float* wb = wt + b * KK * 16;
      for (int64_t f0 = oh0; f0 < oh1; f0 += lr.flush_rows) {
        const int64_t f1 = std::min(oh1, f0 + lr.flush_rows);
        for (int64_t oh = f0; oh < f1; ++oh) {
          const float* in_row = buf + (oh - oh0) * sh * lb.row_floats;
          float* out_row = out_rows + (oh - f0) * OW * 16;
          for (int64_t t = 0, x0 = 0; t < tiles; ++t) {
            const int64_t npx = base + (t < wider);
            lane_tile_for(npx, sw, dw, KW)(in_row + x0 * sw * 16, dh * lb.row_floats, dw * 16, sw * 16, wb, KH, KW,
                                           out_row + x0 * 16);
            x0 += npx;
          }
        }
        if (channels_last) {
          store_to_channels_last(out_rows, (f1 - f0) * OW, C, nc, bias ? bias + c0 : nullptr, relu,
                                 output + (n * L + f0 * OW) * C + c0);
        } else {
          engine::store_row_to_planes<1>(out_rows, (f1 - f0) * OW, nc, bias ? bias + c0 : nullptr, false,
                                         output + (n * C + c0) * L + f0 * OW, L);
        }
      }
    }
  });
}

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The taps k < K (kernel positions, dilation d) that reach positions of phase r under stride s
// (k*d = r mod s), last first: a grad_input pixel of that phase reads grad_output at (its padded
// position - k*d)/s, which grows by d/gcd(s, d) from one tap of the list to the next.
inline std::vector<int64_t> phase_taps(int64_t K, int64_t s, int64_t d, int64_t r) {
  std::vector<int64_t> taps;
  for (int64_t k = K - 1; k >= 0; --k) {
    if ((k * d) % s == r) taps.push_back(k);
  }
  return taps;
}

// grad_input of a depthwise conv (one channel per group and one output channel per group), any stride,
// dilation and padding, with 16 channels in the lanes. A grad_input pixel at padded position y reads
// the taps of its phase y mod s only, and the pixels of one phase along a row read consecutive
// grad_output columns: each (row, column phase) is a stride-1 correlation of a zero-padded lane copy of
// grad_output with the phase's taps, last tap first (lane_tile); its pixels, stride apart, are
// copied into the row.
inline void backward_input_channel_lanes(const float* grad_output, const float* weight, float* grad_input,
                                         const Conv2dParams& p) {
  const int64_t C = p.in_channels, H = p.in_h, W = p.in_w, OH = p.out_h, OW = p.out_w;
  const int64_t KH = p.kernel_h, KW = p.kernel_w, KK = KH * KW;
  const int64_t sh = p.stride_h, sw = p.stride_w, dh = p.dilation_h, dw = p.dilation_w;
  const int64_t eh = dh / std::gcd(sh, dh), ew = dw / std::gcd(sw, dw);  // grad_output steps per phase tap
  engine::AlignedBuffer wbuf(false), pbuf(false);                        // written in full
  const float* wt = lane_weights(weight, C, KK, wbuf);
  // the phases' taps and weights: wp[b][(rho, phi) taps in order][16], phase (rho, phi) from offset[rho][phi]
  std::vector<std::vector<int64_t>> th(sh), tw(sw);
  for (int64_t r = 0; r < sh; ++r) th[r] = phase_taps(KH, sh, dh, r);
  for (int64_t r = 0; r < sw; ++r) tw[r] = phase_taps(KW, sw, dw, r);
  const int64_t blocks = engine::ceil_div(C, 16);
  std::vector<int64_t> offset(sh * sw);
  float* wp = pbuf.get(blocks * KK * 16);
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t at = 0;  // every tap is in one phase: KK vectors a block
    for (int64_t rho = 0; rho < sh; ++rho) {
      for (int64_t phi = 0; phi < sw; ++phi) {
        offset[rho * sw + phi] = at;
        for (const int64_t kh : th[rho]) {
          for (const int64_t kw : tw[phi]) {
            std::memcpy(wp + (b * KK + at++) * 16, wt + (b * KK + kh * KW + kw) * 16, 16 * sizeof(float));
          }
        }
      }
    }
  }
  // grad_output columns [ow_lo, ow_hi] in the buffer (every tap of every grad_input column)
  const int64_t ow_lo = floor_div(p.pad_w - (KW - 1) * dw, sw), ow_hi = floor_div(W - 1 + p.pad_w, sw);
  const LaneBuffer lb(OH, OW, ow_lo, ow_hi - ow_lo + 1);
  const LaneRuns lr(p.batch, C, H, W);
  const uint64_t call = lane_call_id();
  at::parallel_for(0, lr.pairs * lr.runs, 1, [&](int64_t begin, int64_t end) {
    thread_local engine::AlignedBuffer go_buf(false), out_buf(false);  // written before read, every item
    float* out_rows = out_buf.get(lr.flush_rows * W * 16);
    alignas(64) float tile[kLanePixels * 16];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (lr.blocks * lr.runs), b = (item / lr.runs) % lr.blocks, run = item % lr.runs;
      const int64_t c0 = 16 * b, nc = std::min<int64_t>(16, C - c0);
      const int64_t ih0 = run * lr.run_rows, ih1 = std::min(H, ih0 + lr.run_rows);
      const int64_t oh_lo = floor_div(ih0 + p.pad_h - (KH - 1) * dh, sh), oh_hi = floor_div(ih1 - 1 + p.pad_h, sh);
      float* buf = go_buf.get((oh_hi - oh_lo + 1) * lb.row_floats);
      lb.fill(grad_output + (n * C + c0) * OH * OW, OH * OW, nc, oh_lo, oh_hi - oh_lo + 1, buf,
              lane_zeros_needed(call, run));
      for (int64_t f0 = ih0; f0 < ih1; f0 += lr.flush_rows) {
        const int64_t f1 = std::min(ih1, f0 + lr.flush_rows);
        for (int64_t ih = f0; ih < f1; ++ih) {
          float* out_row = out_rows + (ih - f0) * W * 16;
          const int64_t y = ih + p.pad_h, rho = y % sh;
          for (int64_t phi = 0; phi < sw; ++phi) {
            const int64_t iw0 = ((phi - p.pad_w) % sw + sw) % sw;  // the phase's first column
            if (iw0 >= W) continue;
            const int64_t count = engine::ceil_div(W - iw0, sw);
            if (th[rho].empty() || tw[phi].empty()) {  // no tap reaches these pixels
              for (int64_t j = 0; j < count; ++j) std::memset(out_row + (iw0 + j * sw) * 16, 0, 16 * sizeof(float));
              continue;
            }
            const int64_t nh = th[rho].size(), nw = tw[phi].size();
            const float* src = buf + ((y - th[rho][0] * dh) / sh - oh_lo) * lb.row_floats +
                               ((iw0 + p.pad_w - tw[phi][0] * dw) / sw - ow_lo) * 16;
            const float* wph = wp + (b * KK + offset[rho * sw + phi]) * 16;
            for (int64_t j0 = 0; j0 < count; j0 += kLanePixels) {
              const int64_t npx = std::min<int64_t>(kLanePixels, count - j0);
              lane_tile_for(npx, 1, ew, nw)(src + j0 * 16, eh * lb.row_floats, ew * 16, 16, wph, nh, nw, tile);
              for (int64_t j = 0; j < npx; ++j) {
                std::memcpy(out_row + (iw0 + (j0 + j) * sw) * 16, tile + j * 16, 16 * sizeof(float));
              }
            }
          }
        }
        engine::store_row_to_planes<1>(out_rows, (f1 - f0) * W, nc, nullptr, false,
                                       grad_input + (n * C + c0) * H * W + f0 * W, H * W);
      }
    }
  });
}
#endif

#if FASTCONV_HAVE_AVX512_KERNELS
// The stride-1 rows below on AVX2 + FMA (CPUs without AVX-512; cpu/gemm_avx2.h's available()).
__attribute__((target("avx2,fma"))) inline void axpy_row_avx2(float* acc, const float* src, float w, int64_t lo,
                                                              int64_t hi) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t o = lo;
  for (; o + 8 <= hi; o += 8) {
    _mm256_storeu_ps(acc + o, _mm256_fmadd_ps(wv, _mm256_loadu_ps(src + o), _mm256_loadu_ps(acc + o)));
  }
  for (; o < hi; ++o) acc[o] += w * src[o];
}

__attribute__((target("avx2,fma"))) inline float dot_row_avx2(const float* a, const float* b, int64_t lo, int64_t hi) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t o = lo;
  for (; o + 16 <= hi; o += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + o), _mm256_loadu_ps(b + o), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + o + 8), _mm256_loadu_ps(b + o + 8), s1);
  }
  for (; o + 8 <= hi; o += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + o), _mm256_loadu_ps(b + o), s0);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(s0, s1));
  float s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; o < hi; ++o) s += a[o] * b[o];
  return s;
}
#endif

// acc[o] += w * src[o * stride] for o in [lo, hi)
template <typename T>
inline void axpy_row(T* acc, const T* src, T w, int64_t lo, int64_t hi, int64_t stride) {
#if FASTCONV_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1 && has_avx512()) return axpy_row_avx512(acc, src, w, lo, hi);
    if (stride == 1 && avx2::available()) return axpy_row_avx2(acc, src, w, lo, hi);
  }
#endif
  for (int64_t o = lo; o < hi; ++o) acc[o] += w * src[o * stride];
}

// sum of a[o] * b[o * stride] for o in [lo, hi)
template <typename T>
inline T dot_row(const T* a, const T* b, int64_t lo, int64_t hi, int64_t stride) {
#if FASTCONV_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1 && has_avx512()) return dot_row_avx512(a, b, lo, hi);
    if (stride == 1 && avx2::available()) return dot_row_avx2(a, b, lo, hi);
  }
#endif
  T s = T(0);
  for (int64_t o = lo; o < hi; ++o) s += a[o] * b[o * stride];
  return s;
}

#if FASTCONV_HAVE_AVX512_KERNELS
// acc[kw][16] += sum over the OW pixels ow of go[ow] * in[ow*sw_step + kw*dw_step] (KW taps of one kernel
// row; floats, vectors of 16 channels, steps multiples of 16), the KW accumulators in registers.
template <int KW>
FASTCONV_AVX512 void lane_weight_row(const float* go, const float* in, int64_t OW, int64_t sw_step, int64_t dw_step,
                                     float* acc) {
  __m512 a[KW];
  for (int kw = 0; kw < KW; ++kw) a[kw] = _mm512_load_ps(acc + 16 * kw);
  for (int64_t ow = 0; ow < OW; ++ow) {
    const __m512 g = _mm512_load_ps(go + 16 * ow);
    const float* x = in + ow * sw_step;
    for (int kw = 0; kw < KW; ++kw) a[kw] = _mm512_fmadd_ps(g, _mm512_load_ps(x + kw * dw_step), a[kw]);
  }
  for (int kw = 0; kw < KW; ++kw) _mm512_store_ps(acc + 16 * kw, a[kw]);
}

// lane_weight_row for any KW, up to 8 taps at a time
FASTCONV_AVX512 inline void lane_weight_taps(const float* go, const float* in, int64_t OW, int64_t sw_step,
                                             int64_t dw_step, int64_t KW, float* acc) {
  using Row = void (*)(const float*, const float*, int64_t, int64_t, int64_t, float*);
  static constexpr Row rows[8] = {&lane_weight_row<1>, &lane_weight_row<2>, &lane_weight_row<3>, &lane_weight_row<4>,
                                  &lane_weight_row<5>, &lane_weight_row<6>, &lane_weight_row<7>, &lane_weight_row<8>};
  for (int64_t k0 = 0; k0 < KW; k0 += 8) {
    rows[std::min<int64_t>(8, KW - k0) - 1](go, in + k0 * dw_step, OW, sw_step, dw_step, acc + 16 * k0);
  }
}

// grad_weight of a depthwise conv (one channel per group and one output channel per group), any
// stride, dilation and padding, with 16 channels in the lanes: per (block of 16 channels, slot of
// images), each image's input rows (zero-padded) and grad_output rows transposed into [column][16], then
// per output row and kernel row the KW taps' sums over the row's pixels (lane_weight_taps). The slots'
// partials are summed in slot order: the result does not depend on the thread count.
inline void backward_weight_channel_lanes(const float* grad_output, const float* input, float* grad_weight,
                                          const Conv2dParams& p) {
  const int64_t C = p.in_channels, H = p.in_h, W = p.in_w, OH = p.out_h, OW = p.out_w;
  const int64_t KH = p.kernel_h, KW = p.kernel_w, KK = KH * KW;
  const int64_t sh = p.stride_h, sw = p.stride_w, dh = p.dilation_h, dw = p.dilation_w;
  const LaneBuffer lb(H, W, -p.pad_w, (OW - 1) * sw + (KW - 1) * dw + 1);
  const LaneBuffer gb(OH, OW, 0, OW);  // grad_output's rows: no padding
  const int64_t rows = (OH - 1) * sh + (KH - 1) * dh + 1;
  const int64_t blocks = engine::ceil_div(C, 16);
  // slots of images: enough items for 64 threads, fixed by the shapes alone
  const int64_t slots = std::clamp<int64_t>(engine::ceil_div(64, blocks), 1, p.batch);
  const int64_t per_slot = engine::ceil_div(p.batch, slots);
  engine::AlignedBuffer partial_buf(false);  // written in full
  float* partial = partial_buf.get(blocks * slots * KK * 16);
  const uint64_t call = lane_call_id();
  at::parallel_for(0, blocks * slots, 1, [&](int64_t begin, int64_t end) {
    thread_local engine::AlignedBuffer in_buf(false), go_buf(false);  // written before read
    float* buf = in_buf.get(rows * lb.row_floats);
    float* gbuf = go_buf.get(OH * gb.row_floats);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / slots, slot = item % slots, c0 = 16 * b, nc = std::min<int64_t>(16, C - c0);
      float* acc = partial + item * KK * 16;
      std::fill(acc, acc + KK * 16, 0.f);
      for (int64_t n = slot * per_slot; n < std::min(p.batch, (slot + 1) * per_slot); ++n) {
        lb.fill(input + (n * C + c0) * H * W, H * W, nc, -p.pad_h, rows, buf, lane_zeros_needed(call, 0));
        gb.fill(grad_output + (n * C + c0) * OH * OW, OH * OW, nc, 0, OH, gbuf, false);
        for (int64_t oh = 0; oh < OH; ++oh) {
          for (int64_t kh = 0; kh < KH; ++kh) {
            lane_weight_taps(gbuf + oh * gb.row_floats, buf + (oh * sh + kh * dh) * lb.row_floats, OW, sw * 16, dw * 16,
                             KW, acc + kh * KW * 16);
          }
        }
      }
    }
  });
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c0 = 16 * b, nc = std::min<int64_t>(16, C - c0);
    for (int64_t t = 0; t < KK; ++t) {
      for (int64_t l = 0; l < nc; ++l) {
        float sum = 0.f;
        for (int64_t slot = 0; slot < slots; ++slot) sum += partial[((b * slots + slot) * KK + t) * 16 + l];
        grad_weight[(c0 + l) * KK + t] = sum;
      }
    }
  }
}

// Where (auto): every depthwise layer. Measured, 2 threads, Zen 4, time against the phase planes: batch
// 8, MobileNetV2's 3x3/2 from 14x14 0.50x, 3x3 at 7x7 0.77x, 3x3/2 from 56x56 0.65x, from 112x112
// 0.47x, 3x3 at 56x56 0.64x, at 28x28 0.93-1.05x, at 14x14 1.02-1.15x; EfficientNet's 5x5 at 14x14
// 0.80x, 5x5/2 0.60x; ConvNeXt's 7x7 at 7x7 0.51x, 14x14 0.65x, 56x56 0.61x; 32 channels at 224x224
// batch 4 0.90x (a 3.3 MB lane copy of the padded plane per thread). FASTCONV_DW_LANES=0 forces the
// phase planes (and their row kernels past the cache).
inline bool use_channel_lanes_weight(const Conv2dParams& p) {
  if (!has_avx512() || p.in_channels_per_group() != 1 || p.out_channels_per_group() != 1) return false;
  return forced("FASTCONV_DW_LANES", '0', '1') != 0;
}
#endif

template <typename T>
bool all_finite(const T* v, int64_t count) {
  T zero = T(0);
  for (int64_t i = 0; i < count; ++i) zero += v[i] * T(0);  // NaN once any value is NaN or infinite
  return zero == T(0);
}

// Off the AVX-512 kernels: each input plane copied into zero padding and split into its stride phases
// (sh x sw planes of Hq x Wq, phase (a, b) holding padded pixels (sh*r + a, sw*c + b); stride 1: one plane
// of the padded width), with ((KW-1)*dw)/sw + 9 zeros past each, and the output computed on the phases'
// grid: output (oh, ow) at oh*Wq + ow, tap (kh, kw) reading its phase at the same place plus
// (kh*dh/sh)*Wq + (kw*dw)/sw. Every tap is then one contiguous axpy (forward) or dot (backward-weight)
// over the whole plane, not a call per row and tap (rows of 7-14 pixels made those calls the cost:
// 3-10x torch's time on ConvNeXt's and MobileNetV2's small planes); the Wq - OW columns past each row
// are computed and dropped.
template <typename T>
struct PaddedGrid {
  int64_t sh, sw, Hq, Wq, phase_size, size, taps_span;
  explicit PaddedGrid(const Conv2dParams& p)
      : sh(p.stride_h),
        sw(p.stride_w),
        Hq((p.in_h + 2 * p.pad_h + sh - 1) / sh),
        Wq((p.in_w + 2 * p.pad_w + sw - 1) / sw),
        phase_size(Hq * Wq + (p.kernel_w - 1) * p.dilation_w / sw + 9),
        size(sh * sw * phase_size),
        taps_span((p.out_h * Wq + 7) / 8 * 8) {}  // whole 8-float vectors (the last few columns dropped too)
  // f(first, run, count) for each run of one input row's pixels that land in one phase: the `count`
  // pixels first, first + sw, ... of the plane, at grid places run, run + 1, ... (no division per pixel).
  template <typename Run>
  void for_each_run(const Conv2dParams& p, Run f) const {
    for (int64_t ih = 0; ih < p.in_h; ++ih) {
      const int64_t y = ih + p.pad_h;
      const int64_t row = (y % sh) * sw * phase_size + (y / sh) * Wq;
      for (int64_t b = 0; b < sw; ++b) {
        const int64_t iw0 = ((b - p.pad_w) % sw + sw) % sw;
        if (iw0 < p.in_w)
          f(ih * p.in_w + iw0, row + b * phase_size + (iw0 + p.pad_w) / sw, (p.in_w - iw0 + sw - 1) / sw);
      }
    }
  }
  // Returns whether every value is finite (0 * x is 0 then, which backward-weight's extra columns rely on).
  bool fill(const T* plane, const Conv2dParams& p, T* dst) const {
    std::fill(dst, dst + size, T(0));
    T zero = T(0);
    for_each_run(p, [&](int64_t first, int64_t run, int64_t count) {
      for (int64_t j = 0; j < count; ++j) {
        const T v = plane[first + j * sw];
        dst[run + j] = v;
        zero += v * T(0);  // NaN once any value is NaN or infinite
      }
    });
    return zero == T(0);
  }
  // The inverse of fill: the plane's pixels out of the padded phases.
  void gather(const T* src, const Conv2dParams& p, T* plane) const {
    for_each_run(p, [&](int64_t first, int64_t run, int64_t count) {
      for (int64_t j = 0; j < count; ++j) plane[first + j * sw] = src[run + j];
    });
  }
  // An output-sized plane (grad_output) laid on the grid, row oh at oh * Wq; the columns past each row
  // are left as they are (zeros in the callers' buffers).
  void lay_output(const T* plane, const Conv2dParams& p, T* dst) const {
    for (int64_t oh = 0; oh < p.out_h; ++oh) std::copy(plane + oh * p.out_w, plane + (oh + 1) * p.out_w, dst + oh * Wq);
  }
  int64_t offset(const Conv2dParams& p, int64_t kh, int64_t kw) const {
    const int64_t y = kh * p.dilation_h, x = kw * p.dilation_w;
    return ((y % sh) * sw + x % sw) * phase_size + (y / sh) * Wq + x / sw;
  }
};

template <typename T>
bool padded_grid_applies() {
  bool avx512 = false;
#if FASTCONV_HAVE_AVX512_KERNELS
  avx512 = std::is_same_v<T, float> && has_avx512();
#endif
  return !avx512;
}

template <typename T>
void forward_padded_grid(const T* input, const T* weight, const T* bias, T* output, const Conv2dParams& p) {
  const int64_t Cg = p.in_channels_per_group(), OCg = p.out_channels_per_group(), KK = p.kernel_h * p.kernel_w;
  const PaddedGrid<T> grid(p);
  at::parallel_for(0, p.batch * p.out_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> padded(grid.size), acc(grid.taps_span);
    int64_t filled = -1;  // the input plane in `padded` (consecutive output channels may share it)
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / p.out_channels, oc = plane % p.out_channels, c0 = (oc / OCg) * Cg;
      std::fill(acc.begin(), acc.end(), bias ? bias[oc] : T(0));
      for (int64_t c = 0; c < Cg; ++c) {
        const int64_t in_plane = n * p.in_channels + c0 + c;
        if (filled != in_plane) grid.fill(input + in_plane * p.in_h * p.in_w, p, padded.data());
        filled = in_plane;
        const T* w = weight + (oc * Cg + c) * KK;
        for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
          for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
            axpy_row(acc.data(), padded.data() + grid.offset(p, kh, kw), w[kh * p.kernel_w + kw], 0, grid.taps_span, 1);
          }
        }
      }
      T* out = output + plane * p.out_plane();
      for (int64_t oh = 0; oh < p.out_h; ++oh) {
        std::copy(acc.data() + oh * grid.Wq, acc.data() + oh * grid.Wq + p.out_w, out + oh * p.out_w);
      }
    }
  });
}

// out[n][oc] = bias[oc] + sum over the group's input channels c of conv(in[n][c], w[oc][c]).
template <typename T>
void forward(const T* input, const T* weight, const T* bias, T* output, const Conv2dParams& p) {
#if FASTCONV_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (use_channel_lanes(p)) return forward_channel_lanes(input, weight, bias, output, p);
    if (use_phase_planes(p)) return forward_phases(input, weight, bias, output, p);
  }
#endif
  if (padded_grid_applies<T>()) {
    // (an infinite or NaN weight times a padding zero would be NaN where the row kernels skip the tap)
    if (all_finite(weight, p.out_channels * p.in_channels_per_group() * p.kernel_h * p.kernel_w)) {
      return forward_padded_grid(input, weight, bias, output, p);
    }
  }
  const int64_t Cg = p.in_channels_per_group(), OCg = p.out_channels_per_group();
  const int64_t KH = p.kernel_h, KW = p.kernel_w, OW = p.out_w, H = p.in_h, W = p.in_w;
  std::vector<int64_t> lo(KW), hi(KW);
  for (int64_t kw = 0; kw < KW; ++kw) column_range(kw * p.dilation_w - p.pad_w, p.stride_w, W, OW, lo[kw], hi[kw]);
#if FASTCONV_HAVE_AVX512_KERNELS
  const std::vector<uint16_t> masks = row_masks(p, lo, hi);
#endif
  at::parallel_for(0, p.batch * p.out_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / p.out_channels, oc = plane % p.out_channels, c0 = (oc / OCg) * Cg;
      T* out = output + plane * p.out_plane();
#if FASTCONV_HAVE_AVX512_KERNELS
      if constexpr (std::is_same_v<T, float>) {
        if (p.stride_w == 1 && has_avx512()) {
          for (int64_t oh = 0; oh < p.out_h; ++oh) {
            for (int64_t c = 0; c < Cg; ++c) {
              conv_row_avx512(out + oh * OW, input + (n * p.in_channels + c0 + c) * H * W,
                              weight + (oc * Cg + c) * KH * KW, bias ? bias[oc] : 0.f, c > 0, oh, p, masks.data());
            }
          }
          continue;
        }
      }
#endif
      for (int64_t oh = 0; oh < p.out_h; ++oh) {
        T* acc = out + oh * OW;
        std::fill(acc, acc + OW, bias ? bias[oc] : T(0));
        for (int64_t c = 0; c < Cg; ++c) {
          const T* in = input + ((n * p.in_channels + c0 + c) * H) * W;
          const T* w = weight + (oc * Cg + c) * KH * KW;
          for (int64_t kh = 0; kh < KH; ++kh) {
            const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dilation_h;
            if (ih < 0 || ih >= H) continue;
            for (int64_t kw = 0; kw < KW; ++kw) {
              axpy_row(acc, in + ih * W + kw * p.dilation_w - p.pad_w, w[kh * KW + kw], lo[kw], hi[kw], p.stride_w);
            }
          }
        }
      }
    }
  });
}

// grad_input on the padded grid (see PaddedGrid; strides past 1, padding past the reach): per input
// plane, each tap one contiguous axpy of grad_output (laid on the grid, 0 past each row) into the padded
// plane's phases, then the plane gathered out of the padding. Needs finite weights (the grid's extra
// columns add w * 0).
template <typename T>
void backward_input_padded_grid(const T* grad_output, const T* weight, T* grad_input, const Conv2dParams& p) {
  const int64_t Cg = p.in_channels_per_group(), OCg = p.out_channels_per_group(), KK = p.kernel_h * p.kernel_w;
  const PaddedGrid<T> grid(p);
  at::parallel_for(0, p.batch * p.in_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> padded(grid.size), go_grid(grid.taps_span, T(0));
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / p.in_channels, c = plane % p.in_channels, g = c / Cg;
      std::fill(padded.begin(), padded.end(), T(0));
      for (int64_t oc = g * OCg; oc < (g + 1) * OCg; ++oc) {
        const T* go = grad_output + (n * p.out_channels + oc) * p.out_plane();
        grid.lay_output(go, p, go_grid.data());
        const T* w = weight + (oc * Cg + c % Cg) * KK;
        for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
          for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
            axpy_row(padded.data() + grid.offset(p, kh, kw), go_grid.data(), w[kh * p.kernel_w + kw], 0, grid.taps_span,
                     1);
          }
        }
      }
      grid.gather(padded.data(), p, grad_input + plane * p.in_h * p.in_w);
    }
  });
}

// grad_input: a stride-1 conv is undone by the same kernel on grad_output (channels swap roles
// within each group) with flipped weights and padding dilation*(K-1) - pad; other strides scatter.
template <typename T>
void backward_input(const T* grad_output, const T* weight, T* grad_input, const Conv2dParams& p) {
  const int64_t Cg = p.in_channels_per_group(), OCg = p.out_channels_per_group();
  const int64_t KH = p.kernel_h, KW = p.kernel_w;
#if FASTCONV_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (!backward_input_as_forward(p) && use_channel_lanes(p, true))
      return backward_input_channel_lanes(grad_output, weight, grad_input, p);
  }
#endif
  if (backward_input_as_forward(p)) {
    const std::vector<T> w_t = flipped_transposed_weight(weight, p);
    return forward<T>(grad_output, w_t.data(), nullptr, grad_input, backward_input_params(p));
  }
#if FASTCONV_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (use_phase_planes(p)) return backward_input_phases(grad_output, weight, grad_input, p);
  }
#endif
  if (padded_grid_applies<T>() && all_finite(weight, p.out_channels * Cg * KH * KW)) {
    return backward_input_padded_grid(grad_output, weight, grad_input, p);
  }
  // scatter, one input plane per task: every contribution to it comes from this task
  at::parallel_for(0, p.batch * p.in_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / p.in_channels, c = plane % p.in_channels, g = c / Cg;
      T* gi = grad_input + plane * p.in_plane();
      std::fill(gi, gi + p.in_plane(), T(0));
      for (int64_t o = 0; o < OCg; ++o) {
        const int64_t oc = g * OCg + o;
        const T* go = grad_output + (n * p.out_channels + oc) * p.out_plane();
        const T* w = weight + (oc * Cg + (c - g * Cg)) * KH * KW;
        for (int64_t oh = 0; oh < p.out_h; ++oh) {
          for (int64_t kh = 0; kh < KH; ++kh) {
            const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dilation_h;
            if (ih < 0 || ih >= p.in_h) continue;
            for (int64_t ow = 0; ow < p.out_w; ++ow) {
              const T gv = go[oh * p.out_w + ow];
              for (int64_t kw = 0; kw < KW; ++kw) {
                const int64_t iw = ow * p.stride_w - p.pad_w + kw * p.dilation_w;
                if (iw >= 0 && iw < p.in_w) gi[ih * p.in_w + iw] += w[kh * KW + kw] * gv;
              }
            }
          }
        }
      }
    }
  });
}

// grad_weight[oc][c][kh][kw] = sum over n, oh, ow of grad_output[n][oc][oh][ow] * input[n][c][ih][iw];
// one output channel per task, a fixed summation order.
#if FASTCONV_HAVE_AVX512_KERNELS
// grad_weight[oc][c][kh][kw] for every (kh, kw) of one (oc, input channel c), stride_w 1, float32:
// per kernel row, the output rows whose input row lies inside the image, of every image.
inline void weight_taps_stride1(const float* grad_output, const float* input, const Conv2dParams& p, int64_t oc,
                                int64_t c, const std::vector<int64_t>& lo, const std::vector<int64_t>& hi, float* gw) {
  const int64_t KH = p.kernel_h, KW = p.kernel_w, OW = p.out_w, H = p.in_h, W = p.in_w;
  std::vector<int64_t> off(KW);
  for (int64_t kw = 0; kw < KW; ++kw) off[kw] = kw * p.dilation_w - p.pad_w;
  std::vector<float> sums(KW);
  for (int64_t kh = 0; kh < KH; ++kh) {
    std::fill(gw + kh * KW, gw + (kh + 1) * KW, 0.f);
    // output rows oh with ih = oh*stride_h - pad_h + kh*dilation_h inside [0, H)
    const int64_t shift = kh * p.dilation_h - p.pad_h;
    int64_t oh0 = 0, oh1 = p.out_h;
    while (oh0 < oh1 && oh0 * p.stride_h + shift < 0) ++oh0;
    while (oh1 > oh0 && (oh1 - 1) * p.stride_h + shift >= H) --oh1;
    if (oh0 >= oh1) continue;
    for (int64_t n = 0; n < p.batch; ++n) {
      const float* go = grad_output + ((n * p.out_channels + oc) * p.out_h + oh0) * OW;
      const float* in = input + ((n * p.in_channels + c) * H + oh0 * p.stride_h + shift) * W;
      dot_rows_taps_avx512(go, OW, in, p.stride_h * W, oh1 - oh0, OW, off.data(), lo.data(), hi.data(), KW,
                           sums.data());
      for (int64_t kw = 0; kw < KW; ++kw) gw[kh * KW + kw] += sums[kw];
    }
  }
}
#endif

template <typename T>
void backward_weight(const T* grad_output, const T* input, T* grad_weight, const Conv2dParams& p) {
#if FASTCONV_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (use_channel_lanes_weight(p)) return backward_weight_channel_lanes(grad_output, input, grad_weight, p);
    if (use_phase_planes(p, true)) return backward_weight_phases(grad_output, input, grad_weight, p);
  }
#endif
  const int64_t Cg = p.in_channels_per_group(), OCg = p.out_channels_per_group();
  const int64_t KH = p.kernel_h, KW = p.kernel_w, OW = p.out_w, H = p.in_h, W = p.in_w;
  std::vector<int64_t> lo(KW), hi(KW);
  for (int64_t kw = 0; kw < KW; ++kw) column_range(kw * p.dilation_w - p.pad_w, p.stride_w, W, OW, lo[kw], hi[kw]);
  if (padded_grid_applies<T>()) {  // (see PaddedGrid) grad_output on the padded grid, 0 past each row
    const PaddedGrid<T> grid(p);
    at::parallel_for(0, p.out_channels, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> padded(grid.size), go_grid(grid.taps_span, T(0)), sums(KH * KW);
      for (int64_t oc = begin; oc < end; ++oc) {
        const int64_t c0 = (oc / OCg) * Cg;
        for (int64_t c = 0; c < Cg; ++c) {
          std::fill(sums.begin(), sums.end(), T(0));
          for (int64_t n = 0; n < p.batch; ++n) {
            const T* go = grad_output + (n * p.out_channels + oc) * p.out_plane();
            const T* in = input + (n * p.in_channels + c0 + c) * H * W;
            if (!grid.fill(in, p, padded.data())) {  // a NaN or infinity: only its own taps may see it (per row)
              for (int64_t kh = 0; kh < KH; ++kh) {
                for (int64_t kw = 0; kw < KW; ++kw) {
                  for (int64_t oh = 0; oh < p.out_h; ++oh) {
                    const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dilation_h;
                    if (ih < 0 || ih >= H) continue;
                    sums[kh * KW + kw] +=
                        dot_row(go + oh * OW, in + ih * W + kw * p.dilation_w - p.pad_w, lo[kw], hi[kw], p.stride_w);
                  }
                }
              }
              continue;
            }
            grid.lay_output(go, p, go_grid.data());
            for (int64_t kh = 0; kh < KH; ++kh) {
              for (int64_t kw = 0; kw < KW; ++kw) {
                sums[kh * KW + kw] +=
                    dot_row(go_grid.data(), padded.data() + grid.offset(p, kh, kw), int64_t(0), grid.taps_span, 1);
              }
            }
          }
          std::copy(sums.begin(), sums.end(), grad_weight + (oc * Cg + c) * KH * KW);
        }
      }
    });
    return;
  }
  at::parallel_for(0, p.out_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t oc = begin; oc < end; ++oc) {
      const int64_t c0 = (oc / OCg) * Cg;
      for (int64_t c = 0; c < Cg; ++c) {
#if FASTCONV_HAVE_AVX512_KERNELS
        if constexpr (std::is_same_v<T, float>) {
          if (p.stride_w == 1 && has_avx512()) {
            weight_taps_stride1(grad_output, input, p, oc, c0 + c, lo, hi, grad_weight + (oc * Cg + c) * KH * KW);
            continue;
          }
        }
#endif
        for (int64_t kh = 0; kh < KH; ++kh) {
          for (int64_t kw = 0; kw < KW; ++kw) {
            T sum = T(0);
            for (int64_t n = 0; n < p.batch; ++n) {
              const T* go = grad_output + (n * p.out_channels + oc) * p.out_plane();
              const T* in = input + (n * p.in_channels + c0 + c) * H * W;
              for (int64_t oh = 0; oh < p.out_h; ++oh) {
                const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dilation_h;
                if (ih < 0 || ih >= H) continue;
                sum += dot_row(go + oh * OW, in + ih * W + kw * p.dilation_w - p.pad_w, lo[kw], hi[kw], p.stride_w);
              }
            }
            grad_weight[((oc * Cg + c) * KH + kh) * KW + kw] = sum;
          }
        }
      }
    }
  });
}

}  // namespace direct
}  // namespace cpu
}  // namespace fastconv
