// The float32 forward convolution for layers with few output channels (at most 64, one group): the first
// layers of CNNs, AlexNet's conv1 (3 -> 64, 11x11 stride 4) and ResNet's stem (3 -> 64, 7x7 stride 2).
//
// There the im2col+GEMM engine spends about a third of its time packing columns, because each column
// element feeds only OC/16 vector FMAs. This kernel packs nothing: its register tile is NPX output
// pixels of one output row x every output channel (NV <= 4 vectors of 16), and each step of the
// reduction over (c, kh, kw) loads one row of the transposed weights (NV vectors) and broadcasts NPX
// input floats straight from a zero-padded copy of the input, stride and dilation included. The sums
// stay in registers over the whole reduction; the tile is written to NCHW once, with bias and ReLU.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
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

constexpr int64_t kMaxChannels = 64;  // 4 vectors of output channels

// Where it runs (auto; measured, 2 threads, Zen 4, forward time against the im2col+GEMM engine):
// strided layers with at most 64 output channels and a reduction of 64+ (ResNet stem 0.92x, AlexNet
// conv1 0.84x at batch 8 and 0.87x at batch 1, 5x5/2 32->64 0.84x, 3x3/2 64->64 0.91x). Not for stride 1,
// where the engine's implicit GEMM packs nothing either (MNIST CNN conv1: 2.0x), nor for short
// reductions, where writing the tile out dominates (3x3/2 3->32, a reduction of 27: 1.4x).
inline bool applicable(const Conv2dParams& p) {
  return p.groups == 1 && p.out_channels <= kMaxChannels && (p.stride_h > 1 || p.stride_w > 1) &&
         p.col_rows_per_group() >= 64;
}

// Pixels per tile for NV vectors of channels: NPX x NV accumulators (24-32 of the 32 zmm registers).
constexpr int pixels_for(int nv) { return nv == 4 ? 6 : nv == 3 ? 8 : nv == 2 ? 12 : 16; }

// tile[i][16v + l] = sum over k < K of in[i*sw + koff[k]] * wt[k][16v + l], for i < NPX, v < NV.
template <int NV>
FASTCONV_AVX512 void pixel_tile(const float* in, int64_t sw, const int64_t* koff, int64_t K, const float* wt,
                                float* tile) {
  constexpr int NPX = pixels_for(NV);
  __m512 acc[NPX][NV];
  _Pragma("GCC unroll 16") for (int i = 0; i < NPX; ++i) {
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
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

template <int NV>
void forward_nv(const float* input, const float* weight, const float* bias, float* out, const Conv2dParams& p,
                bool relu) {
  constexpr int NPX = pixels_for(NV);
  const int64_t C = p.in_channels, OC = p.out_channels, OH = p.out_h, OW = p.out_w, L = p.out_plane();
  const int64_t KH = p.kernel_h, KW = p.kernel_w, K = C * KH * KW, width = NV * 16;
  // The padded copy: every tap a tile reads lies inside it, the columns past OW of a row's last tile
  // included (their sums are not stored), hence the zero columns on the right and the slack at the end.
  const int64_t Hp = std::max((OH - 1) * p.stride_h + (KH - 1) * p.dilation_h + 1, p.in_h + p.pad_h);
  const int64_t Wp =
      std::max((ceil_div(OW, NPX) * NPX - 1) * p.stride_w + (KW - 1) * p.dilation_w + 1, p.in_w + p.pad_w);
  const int64_t plane = Hp * Wp, image = C * plane;
  AlignedBuffer pad_buf, wt_buf;
  float* padded = pad_buf.get(p.batch * image + NPX * p.stride_w + 16);
  engine::copy_padded(input, p.batch * C, p.in_h, p.in_w, padded, Hp, Wp, p.pad_h, p.pad_w);
  std::fill(padded + p.batch * image, padded + p.batch * image + NPX * p.stride_w + 16, 0.f);
  // transposed weights wt[k][width], zero channels past OC
  float* wt = wt_buf.get(K * width);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t o = 0; o < width; ++o) wt[k * width + o] = o < OC ? weight[o * K + k] : 0.f;
  }
  std::vector<int64_t> koff(K);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t c = k / (KH * KW), kh = (k / KW) % KH, kw = k % KW;
    koff[k] = c * plane + kh * p.dilation_h * Wp + kw * p.dilation_w;
  }
  const engine::BalancedItems rows(p.batch * OH, 1);
  at::parallel_for(0, rows.count, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float tile[NPX * NV * 16];
    for (int64_t item = b0; item < b1; ++item) {
      for (int64_t r = rows.begin(item); r < rows.end(item); ++r) {
        const int64_t n = r / OH, oh = r % OH;
        const float* row_in = padded + n * image + oh * p.stride_h * Wp;
        float* row_out = out + n * OC * L + oh * OW;
        for (int64_t ow0 = 0; ow0 < OW; ow0 += NPX) {
          pixel_tile<NV>(row_in + ow0 * p.stride_w, p.stride_w, koff.data(), K, wt, tile);
          const int64_t valid = std::min<int64_t>(NPX, OW - ow0);
          for (int64_t o = 0; o < OC; ++o) {
            const float b = bias ? bias[o] : 0.f;
            float* dst = row_out + o * L + ow0;
            for (int64_t i = 0; i < valid; ++i) {
              const float y = tile[i * width + o] + b;
              dst[i] = relu ? (y > 0.f || y != y ? y : 0.f) : y;  // NaN stays NaN, as torch.relu
            }
          }
        }
      }
    }
  });
}

// out = conv2d(input, weight) + bias [, relu], float32 NCHW contiguous, applicable(p).
inline void forward(const float* input, const float* weight, const float* bias, float* out, const Conv2dParams& p,
                    bool relu = false) {
  switch (ceil_div(p.out_channels, 16)) {
    case 1:
      return forward_nv<1>(input, weight, bias, out, p, relu);
    case 2:
      return forward_nv<2>(input, weight, bias, out, p, relu);
    case 3:
      return forward_nv<3>(input, weight, bias, out, p, relu);
    default:
      return forward_nv<4>(input, weight, bias, out, p, relu);
  }
}

}  // namespace narrow
}  // namespace cpu
}  // namespace fastconv
#endif  // FASTCONV_HAVE_AVX512_KERNELS
