// The float32 forward and backward-weight convolutions for layers with few output channels (at most 64,
// one group), strided: the first layers of CNNs, AlexNet's conv1 (3 -> 64, 11x11 stride 4) and ResNet's
// stem (3 -> 64, 7x7 stride 2).
//
// There the im2col+GEMM engine spends about a third of its time packing columns, because each column
// element feeds only OC/16 vector FMAs. These kernels pack nothing. Forward: the register tile is NPX
// output pixels of one output row x every output channel (NV <= 4 vectors of 16); each step of the
// reduction over (c, kh, kw) loads one row of the transposed weights (NV vectors) and broadcasts NPX
// input floats straight from a zero-padded copy of the input, stride and dilation included; the sums
// stay in registers over the whole reduction (or a block of it), the tile goes to a row buffer, and
// each output row is written to NCHW once, with bias and ReLU.
// Backward-weight: the tile is 6 taps x every output channel, the reduction runs over pixels, each step
// one row of grad_output^T (transposed once per item) and 6 broadcasts from the padded input.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "conv_params.h"
#include "cpu/conv2d_avx512.h"
#include "cpu/gemm.h"

#if FASTCONV_HAVE_AVX512_KERNELS
namespace fastconv {
namespace cpu {
namespace narrow {

using engine::AlignedBuffer;
using engine::ceil_div;
using engine::store_row_to_planes;

constexpr int64_t kMaxChannels = 64;  // 4 vectors of output channels

// Where they run (auto; measured, 2 threads, Zen 4, time against the im2col+GEMM engine):
// - forward: strided layers with at most 64 output channels and a reduction of 64+ (ResNet stem 0.92x,
//   AlexNet conv1 0.84x at batch 8 and 0.87x at batch 1, 5x5/2 32->64 0.84x, 3x3/2 64->64 0.91x). Not
//   for stride 1, where the engine's implicit GEMM packs nothing either (MNIST CNN conv1: 2.0x), nor for
//   short reductions, where writing the tile out dominates (3x3/2 3->32, a reduction of 27: 1.4x).
inline bool forward_applicable(const Conv2dParams& p) {
  return p.groups == 1 && p.out_channels <= kMaxChannels && (p.stride_h > 1 || p.stride_w > 1) &&
         p.col_rows_per_group() >= 64;
}

// - backward-weight: at most 64 output channels and a reduction past the dot form's 25 rows
//   (engine::kDotRows, which is faster below: MNIST CNN conv1 1.37x, LeNet conv1 1.55x here), any
//   stride (ResNet stem 0.91x, AlexNet conv1 0.79-0.82x, MNIST CNN conv2 0.89x, LeNet conv2 0.74x,
//   3x3 4->32 0.84x); not 1x1 stride-1 layers, whose columns the engine reads in place (256->64 at 28x28:
//   1.16x). Winograd, where it applies, goes first (3x3 64->64 at 56x56: 1.37x here).
inline bool backward_weight_applicable(const Conv2dParams& p) {
  const bool pointwise_stride1 = p.kernel_h == 1 && p.kernel_w == 1 && p.stride_h == 1 && p.stride_w == 1;
  return p.groups == 1 && p.out_channels <= kMaxChannels && p.col_rows_per_group() > engine::kDotRows &&
         !pointwise_stride1;
}

// Pixels per tile for NV vectors of channels: NPX x NV accumulators (24-32 of the 32 zmm registers).
constexpr int pixels_for(int nv) { return nv == 4 ? 6 : nv == 3 ? 8 : nv == 2 ? 12 : 16; }

// The forward's pixels per tile: of pixels_for(nv) and the two sizes below it, the one with the least
// work per row, counting the pixels computed past the row's end and about half a pixel's worth per tile
// (AlexNet conv1's 55-pixel rows: 11 tiles of 5, not 10 of 6 with 5 wasted, 0.81-0.92x the time;
// 28-pixel rows: 7 of 4, 0.86-0.96x; ResNet stem's 112: 19 of 6, where 28 of 4 measured 1.01x).
inline int tile_pixels(int nv, int64_t OW) {
  const auto work = [OW](int npx) { return static_cast<double>(ceil_div(OW, npx)) * (npx + 0.5); };
  int best = pixels_for(nv);
  for (int npx = pixels_for(nv) - 1; npx >= pixels_for(nv) - 2; --npx) {
    if (work(npx) < work(best)) best = npx;
  }
  return best;
}

// tile[i][16v + l] = sum over k < K of in[i*sw + koff[k]] * wt[k][16v + l], for i < NPX, v < NV.
// With `accumulate`, the sums start from the tile's contents instead of zero.
template <int NV, int NPX>
FASTCONV_AVX512 void pixel_tile(const float* in, int64_t sw, const int64_t* koff, int64_t K, const float* wt,
                                float* tile, bool accumulate = false) {
  __m512 acc[NPX][NV];
  _Pragma("GCC unroll 16") for (int i = 0; i < NPX; ++i) {
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) {
      acc[i][v] = accumulate ? _mm512_load_ps(tile + (i * NV + v) * 16) : _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* a = in + koff[k];
    __m512 b[NV];
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) b[v] = _mm512_load_ps(wt + (k * NV + v) * 16);
    _Pragma("GCC unroll 16") for (int i = 0; i < NPX; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * sw]);
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, b[v], acc[i][v]);
    }
  }
  _Pragma("GCC unroll 16") for (int i = 0; i < NPX; ++i) {
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) _mm512_store_ps(tile + (i * NV + v) * 16, acc[i][v]);
  }
}

// A zero-padded copy of the input holding every tap of output pixels [0, OH) x [0, ow_end) (ow_end >= OW:
// a forward row's last tile computes a few pixels past OW, whose sums are not stored), and the offset
// of each tap k = (c, kh, kw) from its output pixel's top-left input position.
// With `whole_batch` false nothing is copied up front: each thread fills its own image's worth with
// copy_rows (the forward).
struct PaddedInput {
  AlignedBuffer buf{false};  // written in full by copy_padded
  const float* input;
  const float* data = nullptr;
  int64_t Hp, Wp, plane, image;
  std::vector<int64_t> koff;
  PaddedInput(const float* input_, const Conv2dParams& p, int64_t ow_end, bool whole_batch = true) : input(input_) {
    const int64_t C = p.in_channels, KH = p.kernel_h, KW = p.kernel_w;
    Hp = (p.out_h - 1) * p.stride_h + (KH - 1) * p.dilation_h + 1;
    Wp = (ow_end - 1) * p.stride_w + (KW - 1) * p.dilation_w + 1;
    plane = Hp * Wp;
    image = C * plane;
    if (whole_batch) {
      float* d = buf.get(p.batch * image);
      engine::copy_padded(input, p.batch * C, p.in_h, p.in_w, d, Hp, Wp, p.pad_h, p.pad_w);
      data = d;
    }
    koff = engine::padded_tap_offsets(p, C * KH * KW, plane, Wp);
  }
  // the top-left input position of output pixel (n, oh, ow)
  const float* at(const Conv2dParams& p, int64_t n, int64_t oh, int64_t ow) const {
    return data + n * image + oh * p.stride_h * Wp + ow * p.stride_w;
  }
  // Padded rows [r0, r1) of every channel of image n into dst (one image's worth: C planes of Hp x Wp).
  void copy_rows(const Conv2dParams& p, int64_t n, int64_t r0, int64_t r1, float* dst) const {
    for (int64_t c = 0; c < p.in_channels; ++c) {  // each plane's rows as a plane of r1 - r0 rows
      engine::copy_padded(input + (n * p.in_channels + c) * p.in_h * p.in_w, 1, p.in_h, p.in_w,
                          dst + c * plane + r0 * Wp, r1 - r0, Wp, p.pad_h - r0, p.pad_w);
    }
  }
};

template <int NV, int NPX>
void forward_nv(const float* input, const float* weight, const float* bias, float* out, const Conv2dParams& p,
                bool relu) {
  const int64_t C = p.in_channels, OC = p.out_channels, OH = p.out_h, OW = p.out_w, L = p.out_plane();
  const int64_t K = C * p.kernel_h * p.kernel_w, width = NV * 16;
  // Each thread copies the padded rows of the image it works on into its own buffer, which stays in L2
  // (a zero-padded copy of the whole batch, written to and read back from memory, had taken 5.7% of
  // AlexNet conv1's forward at batch 8).
  const PaddedInput padded(input, p, ceil_div(OW, NPX) * NPX, false);
  const int64_t kh_span = (p.kernel_h - 1) * p.dilation_h + 1;
  // transposed weights wt[k][width], zero channels past OC
  thread_local AlignedBuffer wt_buf(false);  // written in full below; kept across calls
  float* wt = wt_buf.get(K * width);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t o = 0; o < width; ++o) wt[k * width + o] = o < OC ? weight[o * K + k] : 0.f;
  }
  // The transposed weights stream through L1 once per tile. Past any L1 (AlexNet conv1: 363 taps x 64
  // channels, 93 KiB) they come from L2 at 4 vectors per step, which a core with two FMA units cannot
  // feed; then the reduction runs in blocks of at most 24 KiB of weights, each over the whole output
  // row. Measured, 2 threads, Intel Xeon with AMX: AlexNet conv1 0.85x (batch 1) and 0.92x (batch 8)
  // the time of one block; the ResNet stem's 37 KiB (in a 48 KiB L1) 1.15x, so it keeps one block (on
  // Zen 4, one FMA unit, blocks measured 1.02-1.06x for both). Either way the row's sums go to a row
  // buffer and the row is stored after the last block, its output lines prefetched into L2 while it
  // is summed: storing tile by tile instead, each partial-line store waited on its line (ResNet stem
  // 1.05-1.11x the time at 2 threads, 1.06x at one; other layers level).
  const int64_t tiles = ceil_div(OW, NPX);
  const int64_t kblock =
      K * width * 4 > (int64_t(64) << 10) ? std::max<int64_t>(16, (int64_t(24) << 10) / (width * 4)) : K;
  const engine::KBlocks kb(K, kblock);
  const engine::BalancedItems rows(p.batch * OH, 1);
  at::parallel_for(0, rows.count, 1, [&](int64_t b0, int64_t b1) {
    if (b0 >= b1) return;
    thread_local AlignedBuffer row_buf, image_buf;
    float* acc = row_buf.get(tiles * NPX * width);
    float* image = image_buf.get(padded.image);
    const int64_t last = rows.end(b1 - 1) - 1;  // this thread's last output row (all images)
    int64_t copied = -1;                        // the image in `image`
    for (int64_t item = b0; item < b1; ++item) {
      for (int64_t r = rows.begin(item); r < rows.end(item); ++r) {
        const int64_t n = r / OH, oh = r % OH;
        if (n != copied) {  // the rows of image n that this thread's output rows read
          const int64_t oh_last = std::min(OH - 1, last - n * OH);
          padded.copy_rows(p, n, oh * p.stride_h, oh_last * p.stride_h + kh_span, image);
          copied = n;
        }
        const float* in_row = image + oh * p.stride_h * padded.Wp;
        float* row_out = out + n * OC * L + oh * OW;
        // the row's output lines into L2 while it is summed
        for (int64_t o = 0; o < OC; ++o) {
          const float* line = row_out + o * L;
          for (int64_t x = 0; x < OW; x += 16) _mm_prefetch(reinterpret_cast<const char*>(line + x), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(line + OW - 1), _MM_HINT_T1);
        }
        for (int64_t b = 0; b < kb.count; ++b) {
          const int64_t k0 = b * kb.size, kc = std::min(kb.size, K - k0);
          for (int64_t t = 0; t < tiles; ++t) {
            pixel_tile<NV, NPX>(in_row + t * NPX * p.stride_w, p.stride_w, padded.koff.data() + k0, kc, wt + k0 * width,
                                acc + t * NPX * width, b > 0);
          }
        }
        store_row_to_planes<NV>(acc, OW, OC, bias, relu, row_out, L);
      }
    }
  });
}

// ---- backward-weight ------------------------------------------------------------------------------
// grad_W^T[k][o] = sum over pixels of input tap k x grad_output[o], the pixels as the reduction: a
// register tile of kRowsPerTile taps x every output channel (NV vectors of grad_output^T, transposed
// once per item of pixels); each pixel step loads one row of grad_output^T and broadcasts the taps
// straight from the padded input. No im2col.
constexpr int kRowsPerTile = 6;

// A run of output pixels along one output row: its first pixel's top-left input position, its
// first row of grad_output^T, its length.
struct PixelRun {
  const float* in;
  const float* got;
  int64_t len;
};

// acc[j][16v + l] += sum over the runs, over t < len, of in[t*sw + koff[j]] * got[t][16v + l], for
// j < kRowsPerTile (acc rows and got rows NV*16 floats apart). The sums stay in registers across all
// runs of an item (they were loaded and stored per run: 48 memory operations per 14-28 pixel steps of
// 24 FMAs each on MNIST-sized rows). Items of 128-256 pixels instead of 512 (grad_output^T in L1)
// measured within noise.
template <int NV>
FASTCONV_AVX512 void tap_tile(const PixelRun* runs, int64_t nruns, int64_t sw, const int64_t* koff, float* acc) {
  constexpr int KB = kRowsPerTile;
  __m512 sum[KB][NV];
  _Pragma("GCC unroll 6") for (int j = 0; j < KB; ++j) {
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) sum[j][v] = _mm512_loadu_ps(acc + (j * NV + v) * 16);
  }
  for (int64_t r = 0; r < nruns; ++r) {
    const float* a[KB];
    _Pragma("GCC unroll 6") for (int j = 0; j < KB; ++j) a[j] = runs[r].in + koff[j];
    const float* got = runs[r].got;
    for (int64_t t = 0; t < runs[r].len; ++t) {
      __m512 b[NV];
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(got + (t * NV + v) * 16);
      _Pragma("GCC unroll 6") for (int j = 0; j < KB; ++j) {
        const __m512 av = _mm512_set1_ps(a[j][t * sw]);
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) sum[j][v] = _mm512_fmadd_ps(av, b[v], sum[j][v]);
      }
    }
  }
  _Pragma("GCC unroll 6") for (int j = 0; j < KB; ++j) {
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + (j * NV + v) * 16, sum[j][v]);
  }
}

template <int NV>
void backward_weight_nv(const float* grad_output, const float* input, float* grad_weight, const Conv2dParams& p) {
  const int64_t OC = p.out_channels, OW = p.out_w, L = p.out_plane(), total = p.batch * L;
  const int64_t K = p.col_rows_per_group(), width = NV * 16;
  const PaddedInput padded(input, p, OW);
  // taps past K (the last tile's) repeat tap K-1; their sums land in rows that are never read
  std::vector<int64_t> koff(ceil_div(K, kRowsPerTile) * kRowsPerTile);
  for (size_t k = 0; k < koff.size(); ++k) koff[k] = padded.koff[std::min<int64_t>(k, K - 1)];
  const engine::BalancedItems items(total, 512);
  const int64_t slots = std::min<int64_t>(at::get_num_threads(), items.count);
  const int64_t part = static_cast<int64_t>(koff.size()) * width;  // grad_W^T per slot: [k][width]
  std::unique_ptr<float[]> parts(new float[slots * part]);
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    thread_local AlignedBuffer gbuf;
    float* got = gbuf.get(items.largest() * width);
    std::vector<PixelRun> runs;
    for (int64_t s = s0; s < s1; ++s) {
      float* acc = parts.get() + s * part;
      std::fill(acc, acc + part, 0.f);
      for (int64_t item = s * items.count / slots; item < (s + 1) * items.count / slots; ++item) {
        const int64_t g0 = items.begin(item), g1 = items.end(item);
        engine::transpose_grad_output(grad_output, p, 0, OC, g0, g1, width, got);
        runs.clear();
        for (int64_t g = g0; g < g1;) {  // runs of one output row
          const int64_t n = g / L, q = g % L, oh = q / OW, ow = q % OW, len = std::min(OW - ow, g1 - g);
          runs.push_back({padded.at(p, n, oh, ow), got + (g - g0) * width, len});
          g += len;
        }
        for (int64_t k0 = 0; k0 < K; k0 += kRowsPerTile) {
          tap_tile<NV>(runs.data(), static_cast<int64_t>(runs.size()), p.stride_w, koff.data() + k0, acc + k0 * width);
        }
      }
    }
  });
  engine::write_grad_weight(parts.get(), slots, part, p, width, grad_weight);
}

// grad_weight of conv2d(input, weight), float32 NCHW contiguous, backward_weight_applicable(p).
inline void backward_weight(const float* grad_output, const float* input, float* grad_weight, const Conv2dParams& p) {
  switch (ceil_div(p.out_channels, 16)) {
    case 1:
      return backward_weight_nv<1>(grad_output, input, grad_weight, p);
    case 2:
      return backward_weight_nv<2>(grad_output, input, grad_weight, p);
    case 3:
      return backward_weight_nv<3>(grad_output, input, grad_weight, p);
    default:
      return backward_weight_nv<4>(grad_output, input, grad_weight, p);
  }
}

// out = conv2d(input, weight) + bias [, relu], float32 NCHW contiguous, forward_applicable(p).
inline void forward(const float* input, const float* weight, const float* bias, float* out, const Conv2dParams& p,
                    bool relu = false) {
  const int nv = static_cast<int>(std::min<int64_t>(4, ceil_div(p.out_channels, 16)));
  const int below = pixels_for(nv) - tile_pixels(nv, p.out_w);  // 0, 1 or 2
#define FASTCONV_NARROW_FORWARD(NV)                                                               \
  case NV:                                                                                        \
    if (below == 0) return forward_nv<NV, pixels_for(NV)>(input, weight, bias, out, p, relu);     \
    if (below == 1) return forward_nv<NV, pixels_for(NV) - 1>(input, weight, bias, out, p, relu); \
    return forward_nv<NV, pixels_for(NV) - 2>(input, weight, bias, out, p, relu);
  switch (nv) {
    FASTCONV_NARROW_FORWARD(1)
    FASTCONV_NARROW_FORWARD(2)
    FASTCONV_NARROW_FORWARD(3)
    default:
      FASTCONV_NARROW_FORWARD(4)
  }
#undef FASTCONV_NARROW_FORWARD
}

}  // namespace narrow
}  // namespace cpu
}  // namespace fastconv
#endif  // FASTCONV_HAVE_AVX512_KERNELS
