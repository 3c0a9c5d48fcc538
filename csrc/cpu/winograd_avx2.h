// Winograd F(2x2, 3x3) on AVX2 (float32): the forward pass of 3x3, stride-1 convolutions on CPUs with
// AVX2 + FMA but without AVX-512 (the AVX-512 engine has its own, cpu/winograd_conv2d.h). Each 2x2 block
// of output pixels (a tile) is computed from its 4x4 input patch d as
//   Y = A^T [ sum_c (G g_c G^T) .* (B^T d_c B) ] A
// (Lavin & Gray, CVPR'16): 16 multiplications per tile and channel pair instead of 36. The 16 element-wise
// products summed over channels are 16 GEMMs, M_xi[oc][tile] = U_xi[oc][c] V_xi[c][tile], run on the
// portable path's AVX2 GEMM (cpu/gemm_avx2.h).
//
// Per work item (a block of tile rows of the batch, each row padded to a multiple of 8 tiles):
//   V = B^T d B for 8 tiles of a row at a time (their patches deinterleaved from zero-padded copies of the
//   tile row's 4 input rows: no bounds checks), M_xi = U_xi V_xi, then Y = A^T M A (+ bias, ReLU)
//   interleaved back into two output rows per tile row (masked at odd edges).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "conv_params.h"
#include "cpu/gemm_avx2.h"

#if FASTCONV_HAVE_AVX2_GEMM
namespace fastconv {
namespace cpu {
namespace avx2 {

// Whether winograd_forward runs these parameters: 3x3, stride 1, dilation 1, one group, padding up to 2.
inline bool winograd_applicable(const Conv2dParams& p) {
  return p.kernel_h == 3 && p.kernel_w == 3 && p.stride_h == 1 && p.stride_w == 1 && p.dilation_h == 1 &&
         p.dilation_w == 1 && p.groups == 1 && p.pad_h <= 2 && p.pad_w <= 2;
}

// The 16 GEMMs' A operands straight in pack_a's layout: for each xi, the OC x C matrix U_xi[o][c] =
// (G g G^T)[xi] of the 3x3 kernel g = w[o][c] (flipped: w[c][o] rotated by 180 degrees, for the stride-1
// backward-input as a forward convolution), G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1], in 6-row
// micro-panels (element (o, c) at packed[xi*per_xi + (o/6)*C*6 + c*6 + o%6], rows past OC zero).
inline void winograd_weights(const float* w, int64_t OC, int64_t C, bool flipped, float* packed, int64_t per_xi) {
  const int64_t panels = ceil_div(OC, kMR);
  at::parallel_for(0, panels, std::max<int64_t>(1, 1024 / std::max<int64_t>(1, C)), [&](int64_t p0, int64_t p1) {
    for (int64_t pn = p0; pn < p1; ++pn) {
      for (int64_t c = 0; c < C; ++c) {
        float* dst = packed + (pn * C + c) * kMR;
        for (int64_t r = 0; r < kMR; ++r) {
          const int64_t o = pn * kMR + r;
          if (o >= OC) {
            for (int xi = 0; xi < 16; ++xi) dst[xi * per_xi + r] = 0.f;
            continue;
          }
          float g[3][3];
          for (int i = 0; i < 3; ++i) {
            for (int j = 0; j < 3; ++j)
              g[i][j] = flipped ? w[((c * OC + o) * 3 + 2 - i) * 3 + 2 - j] : w[((o * C + c) * 3 + i) * 3 + j];
          }
          float t[4][3];
          for (int j = 0; j < 3; ++j) {
            t[0][j] = g[0][j];
            t[1][j] = 0.5f * (g[0][j] + g[1][j] + g[2][j]);
            t[2][j] = 0.5f * (g[0][j] - g[1][j] + g[2][j]);
            t[3][j] = g[2][j];
          }
          for (int i = 0; i < 4; ++i) {
            const float u[4] = {t[i][0], 0.5f * (t[i][0] + t[i][1] + t[i][2]), 0.5f * (t[i][0] - t[i][1] + t[i][2]),
                                t[i][2]};
            for (int l = 0; l < 4; ++l) dst[(i * 4 + l) * per_xi + r] = u[l];
          }
        }
      }
    }
  });
}

// Lanes 0, 2, .., 14 (odd: 1, 3, .., 15) of the 16 floats x, y.
FASTCONV_AVX2 inline __m256 even_lanes(__m256 x, __m256 y) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(x, y, 0x88)), 0xD8));
}
FASTCONV_AVX2 inline __m256 odd_lanes(__m256 x, __m256 y) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(x, y, 0xDD)), 0xD8));
}

// Columns 2t .. 2t + 3 of a padded input row for the 8 tiles t of a vector: columns 0, 2, .., 14, then
// 1, 3, .., 15, 2, .., 16 and 3, .., 17 (row: the first tile's first column).
FASTCONV_AVX2 inline void patch_columns(const float* row, __m256 col[4]) {
  const __m256 a = _mm256_loadu_ps(row), b = _mm256_loadu_ps(row + 8);
  const __m256 c = _mm256_loadu_ps(row + 2), d = _mm256_loadu_ps(row + 10);
  col[0] = even_lanes(a, b);
  col[1] = odd_lanes(a, b);
  col[2] = even_lanes(c, d);
  col[3] = odd_lanes(c, d);
}

// V[xi][k] (xi = 4i + l, the 16 planes `plane` floats apart) = (B^T d B)[i][l] for 8 tiles whose patches
// start at `src` (padded rows Wp floats apart), B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
FASTCONV_AVX2 inline void input_transform(const float* src, int64_t Wp, float* V, int64_t plane) {
  __m256 d[4][4];
  for (int r = 0; r < 4; ++r) patch_columns(src + r * Wp, d[r]);
  __m256 s[4][4];
  for (int j = 0; j < 4; ++j) {
    s[0][j] = _mm256_sub_ps(d[0][j], d[2][j]);
    s[1][j] = _mm256_add_ps(d[1][j], d[2][j]);
    s[2][j] = _mm256_sub_ps(d[2][j], d[1][j]);
    s[3][j] = _mm256_sub_ps(d[1][j], d[3][j]);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_store_ps(V + (4 * i + 0) * plane, _mm256_sub_ps(s[i][0], s[i][2]));
    _mm256_store_ps(V + (4 * i + 1) * plane, _mm256_add_ps(s[i][1], s[i][2]));
    _mm256_store_ps(V + (4 * i + 2) * plane, _mm256_sub_ps(s[i][2], s[i][1]));
    _mm256_store_ps(V + (4 * i + 3) * plane, _mm256_sub_ps(s[i][1], s[i][3]));
  }
}

// Y = A^T m A (A^T = [1 1 1 0; 0 1 -1 -1]) + bias [, ReLU] for 8 tiles (m: the 16 planes of M, `plane`
// floats apart), stored as columns 2t, 2t + 1 of output rows y0 and y1 (y1 null: one row), the first
// `cols` columns of each.
FASTCONV_AVX2 inline void output_transform(const float* M, int64_t plane, float bias, bool relu, float* y0, float* y1,
                                           int64_t cols) {
  __m256 m[4][4];
  for (int i = 0; i < 4; ++i) {
    for (int l = 0; l < 4; ++l) m[i][l] = _mm256_load_ps(M + (4 * i + l) * plane);
  }
  __m256 r[2][4];
  for (int l = 0; l < 4; ++l) {
    r[0][l] = _mm256_add_ps(_mm256_add_ps(m[0][l], m[1][l]), m[2][l]);
    r[1][l] = _mm256_sub_ps(_mm256_sub_ps(m[1][l], m[2][l]), m[3][l]);
  }
  const __m256 b = _mm256_set1_ps(bias), zero = _mm256_setzero_ps();
  for (int a = 0; a < 2; ++a) {
    float* y = a == 0 ? y0 : y1;
    if (!y) break;
    __m256 left = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(r[a][0], r[a][1]), r[a][2]), b);
    __m256 right = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(r[a][1], r[a][2]), r[a][3]), b);
    // ReLU as max(0, y): maxps returns its second operand where one is NaN, so NaN passes, as in torch.relu
    if (relu) left = _mm256_max_ps(zero, left), right = _mm256_max_ps(zero, right);
    // interleave: tiles 0-3 into columns 0-7, tiles 4-7 into 8-15
    const __m256 lo = _mm256_unpacklo_ps(left, right), hi = _mm256_unpackhi_ps(left, right);
    const __m256 first = _mm256_permute2f128_ps(lo, hi, 0x20), second = _mm256_permute2f128_ps(lo, hi, 0x31);
    _mm256_maskstore_ps(y, first_lanes(cols), first);
    _mm256_maskstore_ps(y + 8, first_lanes(cols - 8), second);
  }
}

// out = conv2d(input, w) + bias [, relu] (winograd_applicable; flipped: see winograd_weights, the
// weight tensor then [C][OC][3][3] of the convolution whose backward-input this is).
inline void winograd_forward(const float* input, const float* w, const float* bias, float* out, const Conv2dParams& p,
                             bool relu, bool flipped = false) {
  const int64_t C = p.in_channels, OC = p.out_channels, H = p.in_h, W = p.in_w, OH = p.out_h, OW = p.out_w;
  const int64_t TH = (OH + 1) / 2, TW = (OW + 1) / 2, TWp = (TW + 7) / 8 * 8;
  const int64_t Wp = 2 * TWp + 8;  // a padded row: the patches of TWp tiles read columns up to 2 TWp + 1
  // U as 16 packed A operands (written in full; per calling thread, kept across calls: no zero fill and no
  // fresh pages on every call, 16 MB for 512 channels each way)
  thread_local Scratch packed_buf;
  const int64_t per_xi = packed_a_floats(OC, C);
  float* packed = packed_buf.get(16 * per_xi);
  winograd_weights(w, OC, C, flipped, packed, per_xi);
  // items: blocks of whole tile rows of the batch (an image's last rows and the next one's first may share
  // a block), about 128 tiles (measured, one thread, Zen 4 under FASTCONV_CPU_GEMM=avx2, blocks of 32 to
  // 256 tiles: MNIST conv2 0.77-0.85x the GEMM's time, 64 channels at 56x56 0.76-0.80x, AlexNet conv4 at
  // batch 8 0.75-1.13x, no size best for all; 128 among the best for each)
  const int64_t R = p.batch * TH, target = 128;
  const int64_t rows_per_block = std::clamp<int64_t>(target / TWp, 1, R);
  const int64_t blocks = (R + rows_per_block - 1) / rows_per_block;
  at::parallel_for(0, blocks, 1, [&](int64_t i0, int64_t i1) {
    thread_local Scratch pad_buf, v_buf, m_buf;
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t r0 = item * rows_per_block, rows = std::min(R, r0 + rows_per_block) - r0, T = rows * TWp;
      // each tile row's 4 zero-padded input rows, per channel: pad[c][row][4][Wp]
      float* pad = pad_buf.get(C * rows * 4 * Wp);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t tr = 0; tr < rows; ++tr) {
          const int64_t n = (r0 + tr) / TH, th = (r0 + tr) % TH;
          for (int64_t r = 0; r < 4; ++r) {
            float* dst = pad + ((c * rows + tr) * 4 + r) * Wp;
            const int64_t ih = 2 * th + r - p.pad_h;
            std::fill(dst, dst + Wp, 0.f);
            if (ih < 0 || ih >= H) continue;
            const float* src = input + ((n * C + c) * H + ih) * W;
            std::copy(src, src + std::min<int64_t>(W, Wp - p.pad_w), dst + p.pad_w);
          }
        }
      }
      float* V = v_buf.get(16 * C * T);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t tr = 0; tr < rows; ++tr) {
          for (int64_t t0 = 0; t0 < TWp; t0 += 8) {
            input_transform(pad + (c * rows + tr) * 4 * Wp + 2 * t0, Wp, V + c * T + tr * TWp + t0, C * T);
          }
        }
      }
      float* Mbuf = m_buf.get(16 * OC * T);
      for (int64_t xi = 0; xi < 16; ++xi) {
        gemm(PackedA{packed + xi * per_xi, OC, C}, T, RowsB{V + xi * C * T, T}, Mbuf + xi * OC * T, T, nullptr, false);
      }
      for (int64_t tr = 0; tr < rows; ++tr) {
        const int64_t n = (r0 + tr) / TH, oh = 2 * ((r0 + tr) % TH);
        for (int64_t o = 0; o < OC; ++o) {
          float* yo = out + ((n * OC + o) * OH + oh) * OW;
          for (int64_t t0 = 0; t0 < TW; t0 += 8) {
            output_transform(Mbuf + o * T + tr * TWp + t0, OC * T, bias ? bias[o] : 0.f, relu, yo + 2 * t0,
                             oh + 1 < OH ? yo + OW + 2 * t0 : nullptr, OW - 2 * t0);
          }
        }
      }
    }
  });
}

}  // namespace avx2
}  // namespace cpu
}  // namespace fastconv
#endif  // FASTCONV_HAVE_AVX2_GEMM
