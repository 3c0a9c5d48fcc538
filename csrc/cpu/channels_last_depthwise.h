// Depthwise conv2d (one input and one output channel per group) on channels_last float32 tensors,
// AVX-512: forward, backward-input and backward-weight reading and writing NHWC in place, any kernel
// size, stride, dilation and padding.
//
// In NHWC a pixel's channels are consecutive floats, so the channels go in the vector lanes (16 a
// vector, up to kDwVectors vectors at a time) and every tap of a pixel is one vector load per 16
// channels at that tap's input pixel: no copies, no transposes (the NCHW kernels ran between a
// transposed copy in and one out, and the lane kernel's zero-padded slab copies were 61% of its
// forward).
//   forward:          out[px][c] = bias[c] + sum over the taps t inside the input of x[px + t][c] * w[c][t]
//   backward-input:   gx[q][c] = sum over the (pixel, tap) pairs that read q of gy[px][c] * w[c][t]
//                     (a gather: per input pixel q, the taps whose output pixel exists at this stride)
//   backward-weight:  gw[c][t] = sum over pixels px of gy[px][c] * x[px + t][c]
// The forward and backward-input list each pixel's taps that exist (padding and stride skip the rest:
// no FMAs on zeros) and sum them per channel in registers; stride-1 kernels of 20+ taps (5x5, 7x7) keep
// the lane kernel of depthwise_conv2d.h on NHWC slab copies (depthwise_forward_nhwc), whose rows of
// vectors in registers serve a row of taps. Backward-weight runs per tap over whole
// output rows (the columns inside the input are one range per tap), into partial sums per block of
// rows; the blocks are fixed by the shape and added in order, so the result is the same at any thread
// count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "conv_params.h"
#include "cpu/conv2d_avx512.h"
#include "cpu/depthwise_conv2d.h"
#include "cpu/flipped_conv.h"
#include "cpu/phase_backward_input.h"

#if FASTCONV_HAVE_AVX512_KERNELS
namespace fastconv {
namespace cpu {
namespace direct {

constexpr int kDwVectors = 16;  // vectors of 16 channels a pixel's sums hold in registers (per-pixel sums)

// Whether a layer is depthwise in the sense of these kernels.
inline bool is_depthwise(const Conv2dParams& p) {
  return p.in_channels_per_group() == 1 && p.out_channels_per_group() == 1;
}

// The weights as [tap][Cv] (Cv: C rounded up to whole vectors, lanes past C zero): one aligned vector
// load per tap and 16 channels.
inline const float* dw_weights_by_tap(const float* weight, const Conv2dParams& p, engine::AlignedBuffer& buf) {
  const int64_t C = p.in_channels, KK = p.kernel_h * p.kernel_w, Cv = engine::ceil_div(C, 16) * 16;
  float* wt = buf.get(KK * Cv);
  for (int64_t t = 0; t < KK; ++t) {
    for (int64_t c = 0; c < Cv; ++c) wt[t * Cv + c] = c < C ? weight[c * KK + t] : 0.0f;
  }
  return wt;
}

// Outputs whose input and output together pass this are stored non-temporally (whole, 64-byte aligned
// vectors: channel counts of multiples of 16), without reading their lines in first: depthwise layers
// move a few bytes per FMA, and the lines' reads had been a third of the traffic. Measured in-process, 2
// threads, Zen 4, batch 8, channels_last, against ordinary stores: MobileNetV2's 3x3 144 at 56x56 (29 MB)
// forward 0.58, backward-input 0.49; 3x3/2 144 from 56x56 0.64 / 0.72, 3x3/2 96 from 112x112 0.98 / 0.64;
// 3x3 32 at 112x112 0.87 / 0.84.
constexpr int64_t kDwStreamBytes = int64_t(16) << 20;
constexpr int64_t kDwStreamPhaseBytes = int64_t(3) << 20;  // see depthwise_backward_input_phases_channels_last

// out[0, 16 NV) = bias + sum over the `count` taps j of src[j][...] * w[j][...] (w aligned), the last
// vector's lanes under `last`; ReLU on request; stream: store_vector (gemm.h). bias: never null (zeros for none); no
// branches around the loop (see dw_tile).
template <int NV>
FASTCONV_AVX512 void dw_sum_taps(const float* const* src, const float* const* w, int64_t count, const float* bias,
                                 __mmask16 last, bool relu, float* out, bool stream) {
  __m512 acc[NV];
  _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) {
    acc[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xFFFF), bias + 16 * v);
  }
  for (int64_t j = 0; j < count; ++j) {
    const float* s = src[j];
    const float* wj = w[j];
    _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
      acc[v] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, s + 16 * v), _mm512_load_ps(wj + 16 * v), acc[v]);
    }
  }
  const __m512 floor = _mm512_set1_ps(relu ? 0.0f : -std::numeric_limits<float>::infinity());
  _Pragma("GCC unroll 16") for (int v = 0; v < NV; ++v) {
    store_vector(out + 16 * v, v == NV - 1 ? last : __mmask16(0xFFFF), _mm512_max_ps(floor, acc[v]), stream);
  }
}

using DwSumTaps = void (*)(const float* const*, const float* const*, int64_t, const float*, __mmask16, bool, float*,
                           bool);

template <int... N>
constexpr std::array<DwSumTaps, sizeof...(N)> dw_sums(std::integer_sequence<int, N...>) {
  return {&dw_sum_taps<N + 1>...};
}

inline DwSumTaps dw_sum_taps_for(int64_t nv) {
  static const auto table = dw_sums(std::make_integer_sequence<int, kDwVectors>());
  return table[nv - 1];
}

// A tile of NPX consecutive output pixels (px_step floats apart in the input, out_step in the output) x
// NV vectors of channels, every tap of the list inside the input for every pixel: per tap one weight
// load feeds NPX FMAs (dw_sum_taps, per pixel, loads a weight vector per FMA: twice the loads a FMA).
// bias: never null (zeros for none).
template <int NPX, int NV>
FASTCONV_AVX512 void dw_tile(const float* src, int64_t px_step, const int64_t* tap_off, const float* const* w,
                             int64_t count, const float* bias, __mmask16 last, bool relu, float* out, int64_t out_step,
                             bool stream) {
  __m512 acc[NPX * NV];  // [pixel][vector]
  _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
    const __m512 b = _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xFFFF), bias + 16 * v);
    _Pragma("GCC unroll 8") for (int i = 0; i < NPX; ++i) acc[i * NV + v] = b;
  }
  for (int64_t j = 0; j < count; ++j) {
    const float* s = src + tap_off[j];
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_ps(w[j] + 16 * v);
    for (int i = 0; i < NPX; ++i) {
      for (int v = 0; v < NV; ++v) {
        const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
        acc[i * NV + v] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, s + i * px_step + 16 * v), wv[v], acc[i * NV + v]);
      }
    }
  }
  // ReLU as max(floor, sum) with floor 0 or -inf; max_ps returns its second operand for a NaN, so NaN
  // stays NaN. (No branches around the loop and every loop over the sums unrolled: otherwise GCC kept
  // the sums in memory, a store after every FMA.)
  const __m512 floor = _mm512_set1_ps(relu ? 0.0f : -std::numeric_limits<float>::infinity());
  _Pragma("GCC unroll 8") for (int i = 0; i < NPX; ++i) {
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
      store_vector(out + i * out_step + 16 * v, m, _mm512_max_ps(floor, acc[i * NV + v]), stream);
    }
  }
}

// 2 pixels x up to 8 vectors: each pixel's 128 channels read as one contiguous run per tap. (4 pixels x
// 2 vectors, four passes over the row for 128 channels, took 1.8x the time: one thread, Zen 4,
// MobileNetV2's 3x3 144 at 56x56, batch 8, 5.1 ms against 2.8 ms, torch's 3.6 ms.)
constexpr int kDwTilePixels = 2, kDwTileVectors = 8;

using DwTile = void (*)(const float*, int64_t, const int64_t*, const float* const*, int64_t, const float*, __mmask16,
                        bool, float*, int64_t, bool);

template <int NV, int... N>
constexpr std::array<DwTile, sizeof...(N)> dw_tiles(std::integer_sequence<int, N...>) {
  return {&dw_tile<N + 1, NV>...};
}

inline DwTile dw_tile_for(int64_t npx, int64_t nv) {
  using Seq = std::make_integer_sequence<int, kDwTilePixels>;
  static const std::array<std::array<DwTile, kDwTilePixels>, kDwTileVectors> table = {
      dw_tiles<1>(Seq()), dw_tiles<2>(Seq()), dw_tiles<3>(Seq()), dw_tiles<4>(Seq()),
      dw_tiles<5>(Seq()), dw_tiles<6>(Seq()), dw_tiles<7>(Seq()), dw_tiles<8>(Seq())};
  return table[nv - 1][npx - 1];
}

// Dilation 1, kernel rows of KW taps at column stride SW: a tile of NPX consecutive output pixels x NV
// vectors where each kernel row loads its (NPX - 1) SW + KW input vectors once, each feeding every
// (pixel, tap) of the row that reads it (up to ceil(KW / SW) FMAs), and each tap's weight vector once
// for the NPX pixels: 3x3 at stride 1 costs about half a load a FMA, 5x5 at stride 2 two thirds, where
// dw_tile (one input load a FMA and a weight load per NPX FMAs) costs 1.5. `row_off[r]` / `w[KW r +
// kw]`: kernel row r's first tap and its weight vectors; outputs `out_step` floats apart; bias: never
// null. Measured at (3, 1) against dw_tile (2 pixels x up to 8 vectors), one thread, Zen 4, batch 8,
// channels_last 3x3 stride 1: 576 at 14x14 0.81x (batch 1 0.81x), 960 at 7x7 0.91x, 144 and 96 at 56x56
// 0.81x and 0.77x, 32 at 112x112 0.63x, 384 and 192 at 28x28 0.67x and 0.77x; 8 pixels x 2 vectors
// against 4 x 4 (fewer passes over a row, 0.75 loads a FMA): 0.98-1.3x.
template <int KW, int SW, int NPX, int NV>
FASTCONV_AVX512 void dw_row_tile(const float* src, int64_t C, const int64_t* row_off, const float* const* w,
                                 int64_t rows, const float* bias, __mmask16 last, bool relu, float* out,
                                 int64_t out_step, bool stream) {
  constexpr int kInputs = (NPX - 1) * SW + KW;  // input vectors a kernel row reads
  __m512 acc[NPX * NV];                         // [pixel][vector]
  _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
    const __m512 b = _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xFFFF), bias + 16 * v);
    _Pragma("GCC unroll 8") for (int i = 0; i < NPX; ++i) acc[i * NV + v] = b;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + row_off[r];
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
      __m512 wv[KW];
      _Pragma("GCC unroll 8") for (int kw = 0; kw < KW; ++kw) wv[kw] = _mm512_load_ps(w[KW * r + kw] + 16 * v);
      _Pragma("GCC unroll 32") for (int u = 0; u < kInputs; ++u) {
        __m512 in = _mm512_maskz_loadu_ps(m, s + u * C + 16 * v);
        __asm__("" : "+v"(in));  // one load, held in a register: GCC otherwise folds it into every FMA reading it
        _Pragma("GCC unroll 8") for (int i = 0; i < NPX; ++i) {
          const int kw = u - i * SW;
          if (kw >= 0 && kw < KW)
            acc[i * NV + v] = _mm512_fmadd_ps(in, wv[kw >= 0 && kw < KW ? kw : 0], acc[i * NV + v]);
        }
      }
    }
  }
  const __m512 floor = _mm512_set1_ps(relu ? 0.0f : -std::numeric_limits<float>::infinity());
  _Pragma("GCC unroll 8") for (int i = 0; i < NPX; ++i) {
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
      store_vector(out + i * out_step + 16 * v, m, _mm512_max_ps(floor, acc[i * NV + v]), stream);
    }
  }
}

constexpr int kDwRowPixels = 8, kDwRowVectors = 2;

using DwRowTile = void (*)(const float*, int64_t, const int64_t*, const float* const*, int64_t, const float*, __mmask16,
                           bool, float*, int64_t, bool);
using DwRowTiles = std::array<std::array<DwRowTile, kDwRowPixels>, kDwRowVectors>;  // [NV - 1][NPX - 1]

template <int KW, int SW, int NV, int... N>
constexpr std::array<DwRowTile, sizeof...(N)> dw_row_tiles(std::integer_sequence<int, N...>) {
  return {&dw_row_tile<KW, SW, N + 1, NV>...};
}

template <int KW, int SW>
const DwRowTiles* dw_row_table() {
  using Seq = std::make_integer_sequence<int, kDwRowPixels>;
  static const DwRowTiles table = {dw_row_tiles<KW, SW, 1>(Seq()), dw_row_tiles<KW, SW, 2>(Seq())};
  return &table;
}

// The row tiles for kernel rows of KW taps at column stride SW (dilation 1), or null where none is built:
// 1-3 taps at stride 1 (3x3 and the phases of strided backward-inputs: 3x3/2's 1-2 taps, 5x5/2's 2-3)
// and 3 or 5 taps at stride 2.
inline const DwRowTiles* dw_row_tiles_for(int64_t KW, int64_t SW) {
  if (SW == 1 && KW == 1) return dw_row_table<1, 1>();
  if (SW == 1 && KW == 2) return dw_row_table<2, 1>();
  if (SW == 1 && KW == 3) return dw_row_table<3, 1>();
  if (SW == 2 && KW == 3) return dw_row_table<3, 2>();
  if (SW == 2 && KW == 5) return dw_row_table<5, 2>();
  return nullptr;
}

// `units` (>= 1) split into the fewest near-equal parts of at most `most` (9 in parts of at most 8: 5 + 4,
// not 8 + 1, whose 1-vector part pays a pixel's overhead for 16 channels).
struct EvenSplit {
  int64_t count, base, extra;
  EvenSplit(int64_t units, int64_t most)
      : count(engine::ceil_div(units, most)), base(units / count), extra(units % count) {}
  int64_t first(int64_t i) const { return i * base + std::min(i, extra); }
  int64_t size(int64_t i) const { return base + (i < extra); }
};

// Blocks of channels: the vectors split evenly into blocks of at most `most`, the last vector's lanes
// masked past C.
struct DwChannelBlocks {
  int64_t C, Cv;
  EvenSplit split;
  int64_t count;
  DwChannelBlocks(int64_t C_, int64_t most)
      : C(C_), Cv(engine::ceil_div(C_, 16) * 16), split(Cv / 16, most), count(split.count) {}
  int64_t first(int64_t b) const { return 16 * split.first(b); }
  int64_t vectors(int64_t b) const { return split.size(b); }
  __mmask16 last(int64_t b) const {
    const int64_t tail = C - (first(b) + 16 * (vectors(b) - 1));
    return lane_mask(0, std::min<int64_t>(16, tail));
  }
};

// The outputs [lo, hi) of one dimension (`out` of them, `in` inputs) whose taps all lie inside the input,
// the last tap `reach` = (kernel - 1) * dilation past the first.
struct TapsInside {
  int64_t lo, hi;
  TapsInside(int64_t out, int64_t in, int64_t pad, int64_t stride, int64_t reach)
      : lo(std::min(out, engine::ceil_div(pad, stride))) {
    const int64_t last = in - 1 + pad - reach;  // o * stride <= last
    hi = std::clamp<int64_t>(last >= 0 ? last / stride + 1 : 0, lo, out);
  }
};

// Where the forward's output pixel (n, oh, ow) goes: its channels at out + ((n*rows + row0 + oh*row_step)*cols +
// col0 + ow*col_step)*C (a phase of a strided backward-input's grad_input: every stride-th pixel).
struct DwPlacement {
  int64_t rows, cols, row0, col0, row_step, col_step;
  bool stream;  // non-temporal stores (store_vector)
  float* pixel(float* out, int64_t n, int64_t oh, int64_t ow, int64_t C) const {
    return out + ((n * rows + row0 + oh * row_step) * cols + col0 + ow * col_step) * C;
  }
};

// Forward (and fused ReLU): items are (image, output row, channel block). by_tap: the weights already in
// dw_weights_by_tap's layout (else made from `weight`); place: where the output pixels go (else dense).
inline void depthwise_forward_channels_last(const float* input, const float* weight, const float* bias, float* out,
                                            const Conv2dParams& p, bool relu, const float* by_tap = nullptr,
                                            const DwPlacement* place = nullptr) {
  const int64_t C = p.in_channels, H = p.in_h, W = p.in_w, OH = p.out_h, OW = p.out_w;
  const int64_t KH = p.kernel_h, KW = p.kernel_w;
  const DwChannelBlocks cb(C, kDwVectors);
  engine::AlignedBuffer wbuf(false);  // written in full
  const float* wt = by_tap ? by_tap : dw_weights_by_tap(weight, p, wbuf);
  const DwPlacement dense{OH, OW, 0, 0, 1, 1, false};
  const DwPlacement& to = place ? *place : dense;
  const int64_t px_out = to.col_step * C;  // floats between consecutive output pixels of a row
  const std::vector<float> zeros(bias ? 0 : cb.Cv, 0.0f);
  const float* tile_bias = bias ? bias : zeros.data();
  // the output columns whose taps all lie inside the input: [in_lo, in_hi)
  const int64_t sw = p.stride_w, sh = p.stride_h;
  const TapsInside inside_cols(OW, W, p.pad_w, sw, (KW - 1) * p.dilation_w);
  const int64_t in_lo = inside_cols.lo, in_hi = inside_cols.hi;
  const bool stream = place ? place->stream : 4 * p.batch * C * (H * W + OH * OW) > kDwStreamBytes;
  // kernel rows whose input vectors the row tiles load once for all their taps; strided ones only on inputs
  // that stay in the caches: a row tile of 2 vectors makes a pass over the row per 2 vectors, where dw_tile
  // takes up to 8 in one, and an input streaming from memory pays for the passes (measured, one thread,
  // Zen 4, batch 8, row tiles against dw_tile: 3x3/2 96 from 112x112, 38.5 MB, 1.47x the time; 144 from
  // 56x56, 14.4 MB, 0.80-0.87x; 5x5/2 240 from 28x28 0.74-0.81x, 672 from 14x14 0.85-0.88x, 192 from 28x28
  // 0.79x; 3x3/2 32 from 112x112, 64 from 56x56, 128 from 28x28 0.97-1.01x)
  const bool input_cached = 4 * p.batch * C * H * W <= kDwStreamBytes;
  const DwRowTiles* row_tiles = p.dilation_w == 1 && (sw == 1 || input_cached) ? dw_row_tiles_for(KW, sw) : nullptr;
  const bool by_rows = row_tiles != nullptr;
  // the border columns down the output rows whose taps' rows all lie inside the input, [row_lo, row_hi), on
  // column tiles: the row tiles with kernel rows and columns swapped (each valid kernel column's KH taps
  // down the input at stride_h, input rows W C floats apart), items of their own (image, channel block,
  // border column); elsewhere a border pixel sums its taps per pixel (two loads a FMA). Measured against
  // per-pixel borders, in-process, Zen 4, batch 8: EfficientNet's 5x5/2 672 from 14x14 forward 0.89x the
  // time on one thread, 0.92x on two (two of its seven columns are borders), 240 from 28x28 0.84x,
  // MobileNetV2's 960 at 7x7 0.95x; backward-input (phases) 0.88-0.96x; wide planes level.
  const TapsInside inside_rows(OH, H, p.pad_h, sh, (KH - 1) * p.dilation_h);
  const int64_t row_lo = inside_rows.lo, row_hi = inside_rows.hi;
  const int64_t border_cols = in_lo + (OW - in_hi);
  const DwRowTiles* col_tiles =
      by_rows && p.dilation_h == 1 && (sh == 1 || input_cached) ? dw_row_tiles_for(KH, sh) : nullptr;
  const bool by_cols = col_tiles != nullptr && border_cols > 0 && row_hi > row_lo;
  const int64_t row_items = p.batch * OH * cb.count, col_items = by_cols ? p.batch * cb.count * border_cols : 0;
  at::parallel_for(0, row_items + col_items, engine::grain_for(OW * KH * KW * 16), [&](int64_t b0, int64_t b1) {
    std::vector<const float*> src(KH * KW), w(KH * KW), row_w(KH * KW), tile_w(KH * KW);
    std::vector<int64_t> tap_off(KH * KW), row_off(std::max(KH, KW));
    for (int64_t item = b0; item < b1; ++item) {
      if (item >= row_items) {  // a border column on column tiles
        const int64_t j = item - row_items, b = j % cb.count, k = (j / cb.count) % border_cols;
        const int64_t n = j / (cb.count * border_cols), ow = k < in_lo ? k : in_hi + (k - in_lo);
        const int64_t c0 = cb.first(b), nv = cb.vectors(b);
        const __mmask16 last = cb.last(b);
        const float* image = input + n * H * W * C + c0;
        int64_t cols = 0;  // the kernel columns inside the input
        for (int64_t kw = 0; kw < KW; ++kw) {
          const int64_t iw = ow * sw - p.pad_w + kw * p.dilation_w;
          if (iw < 0 || iw >= W) continue;
          row_off[cols] = iw * C;
          for (int64_t kh = 0; kh < KH; ++kh) row_w[cols * KH + kh] = wt + (kh * KW + kw) * cb.Cv + c0;
          ++cols;
        }
        const int64_t out_step = to.row_step * to.cols * C;
        const EvenSplit parts(nv, kDwRowVectors);
        for (int64_t part = 0; part < parts.count; ++part) {
          const int64_t v0 = parts.first(part), tv = parts.size(part);
          const __mmask16 tile_last = v0 + tv == nv ? last : __mmask16(0xFFFF);
          for (int64_t t = 0; t < cols * KH; ++t) tile_w[t] = row_w[t] + 16 * v0;
          for (int64_t oh = row_lo; oh < row_hi; oh += kDwRowPixels) {
            const int64_t npx = std::min<int64_t>(kDwRowPixels, row_hi - oh);
            float* o = to.pixel(out, n, oh, ow, C) + c0 + 16 * v0;
            (*col_tiles)[tv - 1][npx - 1](image + (oh * sh - p.pad_h) * W * C + 16 * v0, W * C, row_off.data(),
                                          tile_w.data(), cols, tile_bias + c0 + 16 * v0, tile_last, relu, o, out_step,
                                          stream);
          }
        }
        continue;
      }
      const int64_t b = item % cb.count, oh = (item / cb.count) % OH, n = item / (cb.count * OH);
      const int64_t c0 = cb.first(b), nv = cb.vectors(b);
      const __mmask16 last = cb.last(b);
      const float* image = input + n * H * W * C + c0;
      float* orow = to.pixel(out, n, oh, 0, C) + c0;
      // interior columns: tiles of pixels x vectors over the row's taps (the kernel rows inside the input)
      int64_t taps = 0;
      for (int64_t kh = 0; kh < KH; ++kh) {
        const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dilation_h;
        if (ih < 0 || ih >= H) continue;
        for (int64_t kw = 0; kw < KW; ++kw) {
          tap_off[taps] = (ih * W - p.pad_w + kw * p.dilation_w) * C;
          row_w[taps++] = wt + (kh * KW + kw) * cb.Cv + c0;
        }
      }
      // the block's vectors in near-equal tile widths; each kernel row's input vectors loaded once for all
      // its taps (dw_row_tile) where such a tile is built, else a vector per tap (dw_tile)
      const int64_t rows = taps / KW;
      if (by_rows) {
        for (int64_t r = 0; r < rows; ++r) row_off[r] = tap_off[KW * r];
      }
      const int64_t most_v = by_rows ? kDwRowVectors : kDwTileVectors, most_px = by_rows ? kDwRowPixels : kDwTilePixels;
      const EvenSplit parts(nv, most_v);
      for (int64_t part = 0; part < parts.count; ++part) {
        const int64_t v0 = parts.first(part), tv = parts.size(part);
        const __mmask16 tile_last = v0 + tv == nv ? last : __mmask16(0xFFFF);
        for (int64_t j = 0; j < taps; ++j) tile_w[j] = row_w[j] + 16 * v0;
        const float* tb = tile_bias + c0 + 16 * v0;
        for (int64_t ow = in_lo; ow < in_hi; ow += most_px) {
          const int64_t npx = std::min(most_px, in_hi - ow);
          float* o = orow + ow * px_out + 16 * v0;
          if (by_rows) {
            (*row_tiles)[tv - 1][npx - 1](image + ow * sw * C + 16 * v0, C, row_off.data(), tile_w.data(), rows, tb,
                                          tile_last, relu, o, px_out, stream);
          } else {
            dw_tile_for(npx, tv)(image + ow * sw * C + 16 * v0, sw * C, tap_off.data(), tile_w.data(), taps, tb,
                                 tile_last, relu, o, px_out, stream);
          }
        }
      }
      if (by_cols && oh >= row_lo && oh < row_hi) continue;  // its border columns are the column items'
      // border columns: each pixel's taps inside the input, all the block's vectors at once
      const DwSumTaps sum = dw_sum_taps_for(nv);
      const auto border = [&](int64_t ow) {
        int64_t count = 0;
        for (int64_t kh = 0; kh < KH; ++kh) {
          const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dilation_h;
          if (ih < 0 || ih >= H) continue;
          for (int64_t kw = 0; kw < KW; ++kw) {
            const int64_t iw = ow * sw - p.pad_w + kw * p.dilation_w;
            if (iw < 0 || iw >= W) continue;
            src[count] = image + (ih * W + iw) * C;
            w[count++] = wt + (kh * KW + kw) * cb.Cv + c0;
          }
        }
        sum(src.data(), w.data(), count, tile_bias + c0, last, relu, orow + ow * px_out, stream);
      };
      for (int64_t ow = 0; ow < in_lo; ++ow) border(ow);
      for (int64_t ow = in_hi; ow < OW; ++ow) border(ow);
    }
    if (stream) _mm_sfence();  // the non-temporal stores visible before the threads join
  });
}

// For each input position q < in of one dimension, the kernel positions k that read it and the output
// position each reads it for (q + pad - k*dilation = out * stride): entries [start[q], start[q + 1]).
struct DwTapList {
  std::vector<int64_t> start, k, out;
  DwTapList(int64_t in, int64_t out_size, int64_t K, int64_t stride, int64_t pad, int64_t dilation) : start(in + 1, 0) {
    for (int64_t q = 0; q < in; ++q) {
      for (int64_t kk = 0; kk < K; ++kk) {
        const int64_t y = q + pad - kk * dilation;
        if (y < 0 || y % stride != 0 || y / stride >= out_size) continue;
        k.push_back(kk);
        out.push_back(y / stride);
      }
      start[q + 1] = static_cast<int64_t>(k.size());
    }
  }
};

// The forward of a channels_last depthwise layer: stride-1 kernels of 20+ taps (5x5, 7x7) on the lane
// kernel over NHWC slab copies (depthwise_conv2d.h: each input row's vectors loaded once for a row of
// taps, where the tiles here load a vector per tap and pixel), the rest on the tiles here. Measured, 2
// threads, Zen 4, batch 8, against torch's channels_last (suite rows, lanes / tiles): ConvNeXt's 7x7
// at 56x56 1.07 / 1.59, 28x28 0.85 / 1.96, 14x14 0.83 / 1.85, 7x7 0.87 / 2.04, EfficientNet's 5x5 at
// 14x14 1.26 / 1.74; strided: 5x5/2 from 56x56 1.59 / 1.25, from 14x14 1.11 / 1.25.
inline void depthwise_forward_nhwc(const float* input, const float* weight, const float* bias, float* out,
                                   const Conv2dParams& p, bool relu) {
  if (p.kernel_h * p.kernel_w >= 20 && p.stride_h == 1 && p.stride_w == 1) {
    forward_channel_lanes(input, weight, bias, out, p, /*channels_last=*/true, relu);
    return;
  }
  depthwise_forward_channels_last(input, weight, bias, out, p, relu);
}

// Strided backward-input by phases of grad_input (phase_backward_input.h: each phase a stride-1
// correlation of grad_output with its taps of the kernel, flipped), each phase on the forward above
// (its interior on the row tiles: kernel rows of 1-3 taps) storing into every stride-th pixel of
// grad_input. Needs dilation 1 and phases_are_padded_forwards.
//
// Each phase writes every stride-th pixel, so with ordinary stores the lines of a large grad_input are
// read in and written out once per phase: from kDwStreamPhaseBytes of grad_input the stores are
// non-temporal. Measured in-process, one thread, Zen 4, against ordinary stores, 3x3/2: 32 from 112x112
// at batch 8 (12.8 MB) 0.46x the time, 96 from 112x112 (38.5 MB) 0.31-0.58x, 128 from 28x28 (3.2 MB)
// 0.56x, 96 from 112x112 at batch 2 (9.6 MB) 0.95x; at batch 1 (2.4 MB) 1.07x.
inline void depthwise_backward_input_phases_channels_last(const float* grad_output, const float* weight,
                                                          float* grad_input, const Conv2dParams& p) {
  const int64_t C = p.in_channels, KK = p.kernel_h * p.kernel_w, Cv = engine::ceil_div(C, 16) * 16;
  engine::AlignedBuffer wbuf(false);
  const bool stream = 4 * p.batch * C * p.in_h * p.in_w >= kDwStreamPhaseBytes;
  for (int64_t a = 0; a < p.stride_h; ++a) {
    const PhaseDim dh(a, p.in_h, p.kernel_h, p.stride_h, p.pad_h);
    for (int64_t b = 0; b < p.stride_w; ++b) {
      const PhaseDim dw(b, p.in_w, p.kernel_w, p.stride_w, p.pad_w);
      if (dh.count == 0 || dw.count == 0) continue;
      const Conv2dParams q = phase_forward_params(p, dh, dw);
      // the phase's taps, flipped, in dw_weights_by_tap's layout
      const std::vector<int64_t> taps = phase_taps(p, dh, dw);
      float* wt = wbuf.get(static_cast<int64_t>(taps.size()) * Cv);
      for (size_t t = 0; t < taps.size(); ++t) {
        for (int64_t c = 0; c < Cv; ++c) wt[t * Cv + c] = c < C ? weight[c * KK + taps[t]] : 0.0f;
      }
      const DwPlacement place{p.in_h, p.in_w, a, b, p.stride_h, p.stride_w, stream};
      depthwise_forward_channels_last(grad_output, nullptr, nullptr, grad_input, q, false, wt, &place);
    }
  }
}

// Backward-input: at stride 1 the forward of grad_output with the flipped weights (flipped_conv.h);
// else per input pixel q, the taps (kh, kw) with q + pad - k*dilation on the stride's grid and inside
// grad_output. Items are (image, input row, channel block).
inline void depthwise_backward_input_channels_last(const float* grad_output, const float* weight, float* grad_input,
                                                   const Conv2dParams& p) {
  if (backward_input_as_forward(p)) {
    const std::vector<float> flipped = flipped_transposed_weight(weight, p);
    depthwise_forward_nhwc(grad_output, flipped.data(), nullptr, grad_input, backward_input_params(p), false);
    return;
  }
  // by phases: measured in-process, 2 threads, Zen 4, against the per-pixel form below, batch 8: 3x3/2 32
  // from 56x56 0.46, 64 from 56x56 0.57, 96 from 112x112 0.65-0.92, 128 from 28x28 0.87; batch 1: 96 from
  // 112x112 0.63, 64 from 28x28 0.75. With the row tiles and streamed stores (one thread, batch 8): 5x5/2
  // 672 from 14x14 0.74, 240 from 28x28 0.44; 3x3/2 144 from 56x56 0.79 (batch 2 0.74), 576 from 14x14 0.80.
  if (p.dilation_h == 1 && p.dilation_w == 1 && phases_are_padded_forwards(p)) {
    depthwise_backward_input_phases_channels_last(grad_output, weight, grad_input, p);
    return;
  }
  const int64_t C = p.in_channels, H = p.in_h, W = p.in_w, OH = p.out_h, OW = p.out_w;
  const int64_t KH = p.kernel_h, KW = p.kernel_w;
  const DwChannelBlocks cb(C, kDwVectors);
  engine::AlignedBuffer wbuf(false);
  const float* wt = dw_weights_by_tap(weight, p, wbuf);
  const std::vector<float> zeros(cb.Cv, 0.0f);
  // per input row and column, the kernel rows / columns that reach it and the output row / column they
  // come from (divisions once per call, not per pixel and tap)
  const DwTapList rows_of(H, OH, KH, p.stride_h, p.pad_h, p.dilation_h);
  const DwTapList cols_of(W, OW, KW, p.stride_w, p.pad_w, p.dilation_w);
  const bool stream = 4 * p.batch * C * (H * W + OH * OW) > kDwStreamBytes;
  at::parallel_for(0, p.batch * H * cb.count, engine::grain_for(W * KH * KW * 16), [&](int64_t b0, int64_t b1) {
    std::vector<const float*> src(KH * KW), w(KH * KW);
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t b = item % cb.count, ih = (item / cb.count) % H, n = item / (cb.count * H);
      const int64_t c0 = cb.first(b);
      const DwSumTaps sum = dw_sum_taps_for(cb.vectors(b));
      const __mmask16 last = cb.last(b);
      float* grow = grad_input + ((n * H + ih) * W) * C + c0;
      for (int64_t iw = 0; iw < W; ++iw) {
        int64_t count = 0;
        for (int64_t r = rows_of.start[ih]; r < rows_of.start[ih + 1]; ++r) {
          const float* row = grad_output + ((n * OH + rows_of.out[r]) * OW) * C + c0;
          const float* wrow = wt + rows_of.k[r] * KW * cb.Cv + c0;
          for (int64_t q = cols_of.start[iw]; q < cols_of.start[iw + 1]; ++q) {
            src[count] = row + cols_of.out[q] * C;
            w[count++] = wrow + cols_of.k[q] * cb.Cv;
          }
        }
        sum(src.data(), w.data(), count, zeros.data(), last, false, grow + iw * C, stream);
      }
    }
    if (stream) _mm_sfence();
  });
}

// acc[0, 16 NV) += sum over `count` pixels i of a[i*lda ...] * b[i*ldb ...] (two sets of sums, even
// and odd pixels, so that the FMAs do not wait on each other with few vectors), the last vector's
// lanes under `last`. The loops over vectors unrolled by pragma: from 3 vectors GCC had kept both sets
// of sums on the stack, a store after every FMA (measured, channels_last backward-weight, one thread,
// Zen 4, batch 8, alternated processes: 5x5 672 at 14x14 0.65x the time, 7x7 384 at 14x14 0.72x, 5x5/2 240
// from 28x28 0.78x, 7x7 96 at 56x56 0.9x)
template <int NV>
FASTCONV_AVX512 void dw_dot_pixels(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t count,
                                   __mmask16 last, float* acc) {
  __m512 s0[NV], s1[NV];
  _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) s0[v] = s1[v] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 1 < count; i += 2) {
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
      s0[v] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i * lda + 16 * v),
                              _mm512_maskz_loadu_ps(m, b + i * ldb + 16 * v), s0[v]);
      s1[v] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + (i + 1) * lda + 16 * v),
                              _mm512_maskz_loadu_ps(m, b + (i + 1) * ldb + 16 * v), s1[v]);
    }
  }
  if (i < count) {
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
      s0[v] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i * lda + 16 * v),
                              _mm512_maskz_loadu_ps(m, b + i * ldb + 16 * v), s0[v]);
    }
  }
  _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {
    _mm512_store_ps(acc + 16 * v, _mm512_add_ps(_mm512_load_ps(acc + 16 * v), _mm512_add_ps(s0[v], s1[v])));
  }
}

using DwDotPixels = void (*)(const float*, int64_t, const float*, int64_t, int64_t, __mmask16, float*);

constexpr int kDwDotVectors = 8;  // two sets of sums of up to 8 vectors

inline DwDotPixels dw_dot_pixels_for(int64_t nv) {
  static const DwDotPixels table[kDwDotVectors] = {&dw_dot_pixels<1>, &dw_dot_pixels<2>, &dw_dot_pixels<3>,
                                                   &dw_dot_pixels<4>, &dw_dot_pixels<5>, &dw_dot_pixels<6>,
                                                   &dw_dot_pixels<7>, &dw_dot_pixels<8>};
  return table[nv - 1];
}

// out[0, 16) = the sum of `count` aligned vectors `stride` floats apart, in order
FASTCONV_AVX512 inline void dw_add_partials(const float* first, int64_t count, int64_t stride, float* out) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; ++i) s = _mm512_add_ps(s, _mm512_load_ps(first + i * stride));
  _mm512_store_ps(out, s);
}

// 3x3 backward-weight of one block of NV channel vectors over output rows [oh0, oh1) of image n, the nine
// taps' sums in registers (9 NV accumulators): per output pixel one load of grad_output's vectors and one
// of the input's per tap, where dw_dot_pixels, a tap at a time, loads both per FMA. The pixels of columns
// [lo, hi) (whose three input columns are all inside) only; the sums are stored, not added, at
// part + t * Cv, and dw_weight_grad_3x3_border adds the other columns' terms. No branch in the loop over
// pixels: kernel rows outside the input read `zeros` (at least W C + 48 zero floats). (Skipping them by a
// test per row, GCC kept the 27 sums in memory, a store after every pixel: measured in-process against
// that form, one thread, Zen 4, batch 8, channels_last: 576 at 14x14 0.75x the time, 576 at 3x3/2 0.82x,
// 384 at 28x28 0.70x, 32 at 112x112 0.75x, 960 at 7x7 0.92x; 2 threads 0.69-0.84x.)
template <int NV>
FASTCONV_AVX512 void dw_weight_grad_3x3_rows(const float* grad_output, const float* input, const Conv2dParams& p,
                                             int64_t n, int64_t oh0, int64_t oh1, int64_t c0, __mmask16 last,
                                             int64_t lo, int64_t hi, float* part, int64_t Cv, const float* zeros) {
  const int64_t C = p.in_channels, H = p.in_h, W = p.in_w, OH = p.out_h, OW = p.out_w, SW = p.stride_w;
  const int64_t tap_step = p.dilation_w * C;
  __m512 acc[9][NV];
  _Pragma("GCC unroll 9") for (int t = 0; t < 9; ++t) {
    _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_setzero_ps();
  }
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const float* gy = grad_output + ((n * OH + oh) * OW) * C + c0;
    const float* xr[3];
    for (int kh = 0; kh < 3; ++kh) {
      const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dilation_h;
      xr[kh] = ih >= 0 && ih < H ? input + ((n * H + ih) * W) * C + c0 : zeros;
    }
    for (int64_t ow = lo; ow < hi; ++ow) {
      const int64_t off = (ow * SW - p.pad_w) * C;
      __m512 g[NV];
      _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) {
        g[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xFFFF), gy + ow * C + 16 * v);
      }
      _Pragma("GCC unroll 3") for (int kh = 0; kh < 3; ++kh) {
        const float* x = xr[kh] + off;
        _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) {
          _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) {
            const __m512 xv = _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xFFFF), x + kw * tap_step + 16 * v);
            acc[kh * 3 + kw][v] = _mm512_fmadd_ps(g[v], xv, acc[kh * 3 + kw][v]);
          }
        }
      }
    }
  }
  _Pragma("GCC unroll 9") for (int t = 0; t < 9; ++t) {
    _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) _mm512_store_ps(part + t * Cv + 16 * v, acc[t][v]);
  }
}

// The border columns' terms of dw_weight_grad_3x3_rows (output columns outside [lo, hi)), added to the
// stored sums: per column the nine sums in registers over the rows, taps outside the input reading `zeros`.
template <int NV>
FASTCONV_AVX512 void dw_weight_grad_3x3_border(const float* grad_output, const float* input, const Conv2dParams& p,
                                               int64_t n, int64_t oh0, int64_t oh1, int64_t c0, __mmask16 last,
                                               int64_t lo, int64_t hi, float* part, int64_t Cv, const float* zeros) {
  const int64_t C = p.in_channels, H = p.in_h, W = p.in_w, OH = p.out_h, OW = p.out_w;
  for (int64_t ow = 0; ow < OW; ++ow) {
    if (ow == lo) ow = hi;  // hi >= lo
    if (ow >= OW) break;
    __m512 acc[9][NV];
    _Pragma("GCC unroll 9") for (int t = 0; t < 9; ++t) {
      _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_setzero_ps();
    }
    bool col_in[3];
    for (int kw = 0; kw < 3; ++kw) {
      const int64_t iw = ow * p.stride_w - p.pad_w + kw * p.dilation_w;
      col_in[kw] = iw >= 0 && iw < W;
    }
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const float* gy = grad_output + ((n * OH + oh) * OW + ow) * C + c0;
      const float* x[9];
      for (int kh = 0; kh < 3; ++kh) {
        const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dilation_h;
        for (int kw = 0; kw < 3; ++kw) {
          const int64_t iw = ow * p.stride_w - p.pad_w + kw * p.dilation_w;
          x[kh * 3 + kw] = ih >= 0 && ih < H && col_in[kw] ? input + ((n * H + ih) * W + iw) * C + c0 : zeros;
        }
      }
      __m512 g[NV];
      _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) {
        g[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xFFFF), gy + 16 * v);
      }
      _Pragma("GCC unroll 9") for (int t = 0; t < 9; ++t) {
        _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) {
          const __m512 xv = _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xFFFF), x[t] + 16 * v);
          acc[t][v] = _mm512_fmadd_ps(g[v], xv, acc[t][v]);
        }
      }
    }
    _Pragma("GCC unroll 9") for (int t = 0; t < 9; ++t) {
      _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) {
        float* d = part + t * Cv + 16 * v;
        _mm512_store_ps(d, _mm512_add_ps(_mm512_load_ps(d), acc[t][v]));
      }
    }
  }
}

// Backward-weight: items are (block of output rows, channel block); each sums its rows per tap into its
// own partial [tap][Cv], then the partials are added in block order per (tap, channel vector). 3x3
// kernels: blocks of at most 3 vectors with the nine taps' sums in registers (dw_weight_grad_3x3_rows).
inline void depthwise_backward_weight_channels_last(const float* grad_output, const float* input, float* grad_weight,
                                                    const Conv2dParams& p) {
  const int64_t C = p.in_channels, H = p.in_h, W = p.in_w, OH = p.out_h, OW = p.out_w;
  const int64_t KH = p.kernel_h, KW = p.kernel_w, KK = KH * KW;
  // 3x3 on the register kernel (measured, 2 threads, Zen 4, batch 8, against the per-tap dots: 144 at
  // 56x56 0.61x the time (batch 1 0.54x), 144 at 3x3/2 from 56x56 0.68x, 96 at 3x3/2 from 112x112 0.78x,
  // 64 at 112x112 0.71x; the dots had been kept for planes past 28x28 with several channel blocks, where
  // the form that kept its sums in memory measured 1.08-1.20x them)
  const bool three = KH == 3 && KW == 3;
  const DwChannelBlocks cb(C, three ? 3 : kDwDotVectors);
  const std::vector<float> zeros(three ? W * C + 48 : 0, 0.0f);  // dw_weight_grad_3x3_rows' rows outside the input
  // 3x3: the output columns whose three taps' input columns are all inside, [lo3, hi3)
  const TapsInside inside3(OW, W, p.pad_w, p.stride_w, 2 * p.dilation_w);
  const int64_t lo3 = inside3.lo, hi3 = inside3.hi;
  // rows per block: about 512 output pixels (fixed by the shape, never by the thread count)
  const int64_t rows = std::clamp<int64_t>(512 / std::max<int64_t>(1, OW), 1, OH);
  const int64_t row_blocks = engine::ceil_div(OH, rows), blocks = p.batch * row_blocks;
  engine::AlignedBuffer partial_buf(false);  // every block writes its whole partial
  float* partials = partial_buf.get(blocks * KK * cb.Cv);
  // per tap, the output columns whose input column lies inside
  std::vector<int64_t> lo(KW), hi(KW);
  for (int64_t kw = 0; kw < KW; ++kw) {
    const int64_t off = kw * p.dilation_w - p.pad_w;
    lo[kw] = std::clamp<int64_t>(engine::ceil_div(std::max<int64_t>(0, -off), p.stride_w), 0, OW);
    hi[kw] = std::clamp<int64_t>(W - off > 0 ? engine::ceil_div(W - off, p.stride_w) : 0, lo[kw], OW);
  }
  at::parallel_for(0, blocks * cb.count, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t b = item % cb.count, blk = item / cb.count, n = blk / row_blocks;
      const int64_t oh0 = (blk % row_blocks) * rows, oh1 = std::min(OH, oh0 + rows);
      const int64_t c0 = cb.first(b), nv = cb.vectors(b);
      const DwDotPixels dot = dw_dot_pixels_for(nv);
      const __mmask16 last = cb.last(b);
      float* part = partials + blk * KK * cb.Cv + c0;
      if (three) {
        (nv == 1   ? &dw_weight_grad_3x3_rows<1>
         : nv == 2 ? &dw_weight_grad_3x3_rows<2>
                   : &dw_weight_grad_3x3_rows<3>)(grad_output, input, p, n, oh0, oh1, c0, last, lo3, hi3, part, cb.Cv,
                                                  zeros.data());
        (nv == 1   ? &dw_weight_grad_3x3_border<1>
         : nv == 2 ? &dw_weight_grad_3x3_border<2>
                   : &dw_weight_grad_3x3_border<3>)(grad_output, input, p, n, oh0, oh1, c0, last, lo3, hi3, part, cb.Cv,
                                                    zeros.data());
        continue;
      }
      for (int64_t t = 0; t < KK; ++t) std::fill(part + t * cb.Cv, part + t * cb.Cv + 16 * nv, 0.0f);
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const float* gy = grad_output + ((n * OH + oh) * OW) * C + c0;
        for (int64_t kh = 0; kh < KH; ++kh) {
          const int64_t ih = oh * p.stride_h - p.pad_h + kh * p.dilation_h;
          if (ih < 0 || ih >= H) continue;
          const float* xrow = input + ((n * H + ih) * W) * C + c0;
          for (int64_t kw = 0; kw < KW; ++kw) {
            if (hi[kw] <= lo[kw]) continue;
            const int64_t iw0 = lo[kw] * p.stride_w - p.pad_w + kw * p.dilation_w;
            dot(gy + lo[kw] * C, C, xrow + iw0 * C, p.stride_w * C, hi[kw] - lo[kw], last,
                part + (kh * KW + kw) * cb.Cv);
          }
        }
      }
    }
  });
  // grad_weight[c][t] = sum over blocks, in order
  at::parallel_for(0, KK * (cb.Cv / 16), 1, [&](int64_t v0, int64_t v1) {
    for (int64_t tv = v0; tv < v1; ++tv) {
      const int64_t t = tv / (cb.Cv / 16), c0 = 16 * (tv % (cb.Cv / 16));
      alignas(64) float lanes[16];
      dw_add_partials(partials + t * cb.Cv + c0, blocks, KK * cb.Cv, lanes);
      for (int64_t c = c0; c < std::min(C, c0 + 16); ++c) grad_weight[c * KK + t] = lanes[c - c0];
    }
  });
}

}  // namespace direct
}  // namespace cpu
}  // namespace fastconv
#endif  // FASTCONV_HAVE_AVX512_KERNELS
