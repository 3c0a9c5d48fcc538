// Winograd convolutions on AVX-512 (float32), stride 1, dilation 1: F(2x2, 3x3) and F(4x4, 3x3) for
// 3x3, F(2x2, 5x5) for 5x5 (and 4x4, zero-padded); other kernels as sums of such sub-kernels
// (forward_decomposed; backward-weight likewise).
//
// Each MxM block of output pixels (a tile) is computed from its (M+R-1)x(M+R-1) input patch d as
//   Y = A^T [ sum_c (G g_c G^T) .* (B^T d_c B) ] A
// (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR'16): per tile and channel
// pair, F(2x2, 3x3) takes 16 multiplications instead of 36 (2.25x fewer), F(4x4, 3x3) 36 instead of
// 144 (4x), F(2x2, 5x5) 36 instead of 100 (2.78x). The P = (M+R-1)^2 element-wise products summed over
// channels are P independent GEMMs, M_xi[oc][tile] = U_xi[oc][c] * V_xi[c][tile], run on the same
// micro-kernel as the im2col engine (gemm.h).
//
// Per work item (a block of tiles, flattened over the batch like the engine's pixels):
//   for each block of input channels: V = B^T d B for every tile (16 tiles of a tile row per vector,
//   deinterleaved from masked loads of the input, read in place) into 48-tile panels per xi; M_xi += U_xi
//   V_xi; then Y = A^T M A + bias (+ ReLU), interleaved back into NCHW output rows (masked at odd edges).
// With few items per thread, or wide layers, the forward runs over whole tiles (forward_whole_tiles).
// Backward-input of a stride-1 conv is again such a conv (flipped weights), so it runs here too.
// float32 error (relative to the sum of the products' magnitudes, random data, 64 channels, measured in
// float64 numpy): about 1e-7 for F(2x2, 3x3) (its transforms use only 0.5, 1 and -1), 7e-7 for
// F(2x2, 5x5) and 1e-6 for F(4x4, 3x3) on the points 0, +-1, +-2 (both have the same B).
#pragma once

#include <ATen/ATen.h>
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
namespace winograd {

using engine::AlignedBuffer;
using engine::ceil_div;

constexpr int64_t kMaxBlockC = 128;
constexpr int64_t kTileBlockBytes = 512 * 1024;  // V (P x kc x tiles) and M (P x OC x tiles) per item

// The kernel size R of the F(2x2, RxR) a convolution runs on: 5 for kernels of 4x4 and up (5x5 on
// its own, 4x4 zero-padded, 6x6-7x7 as four 5x5 sub-kernels: 36 products per tile and sub-kernel
// where sums of 3x3 sub-kernels took 64 for 5x5, and 144 with more tiles for 7x7), else 3.
inline int tile_kernel(const Conv2dParams& p) { return p.kernel_h >= 4 && p.kernel_w >= 4 ? 5 : 3; }

// Transform points per tile of F(MxM, RxR): its (M+R-1)x(M+R-1) patch.
template <int R, int M = 2>
constexpr int kPoints = (M + R - 1) * (M + R - 1);

template <int R, int M = 2>
inline int64_t tiles_per_item(const Conv2dParams& p) {
  const int64_t kc = std::min(p.in_channels, kMaxBlockC);
  const int64_t by_v = kTileBlockBytes / (kPoints<R, M> * kc * 4),
                by_m = kTileBlockBytes / (kPoints<R, M> * p.out_channels * 4);
  return std::clamp<int64_t>(std::min(by_v, by_m) / kTileCols, 1, 4) * kTileCols;
}

// RxR sub-kernels per kernel row/column (larger kernels: see forward_decomposed); for R = 3: 1 for 3,
// 2 for 4-5, 3 for 6-7; for R = 5: 1 up to 5, 2 for 6-7.
template <int R>
inline int64_t sub_kernels(int64_t k) {
  return k <= R ? 1 : (k - R + 1) / 2 + 1;
}

// The taps of a KH x KW kernel that RxR sub-kernel (a, b) owns: kernel rows 2a and 2a+1, the last
// sub-kernel also rows 2a+2 .. 2a+R-1 (inside the kernel); columns likewise. Sub-kernel tap tap[j] =
// r*R + s is kernel tap dst[j] = (2a + r)*KW + 2b + s; the other taps of the sub-kernel are zero.
// For an RxR kernel: all of them.
template <int R>
struct SubKernel {
  int count = 0;
  int tap[R * R];
  int64_t dst[R * R];
  SubKernel(int64_t kh, int64_t kw, int64_t a, int64_t b) {
    const int64_t na = sub_kernels<R>(kh), nb = sub_kernels<R>(kw);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t q = 0; q < R; ++q) {
        const int64_t row = 2 * a + r, col = 2 * b + q;
        if ((r >= 2 && a != na - 1) || (q >= 2 && b != nb - 1) || row >= kh || col >= kw) continue;
        tap[count] = static_cast<int>(r * R + q);
        dst[count++] = row * kw + col;
      }
  }
};

// Sub-kernels of the whole kernel, for the rules in conv2d.cpp.
inline int64_t sub_kernel_count(const Conv2dParams& p) {
  return tile_kernel(p) == 5 ? sub_kernels<5>(p.kernel_h) * sub_kernels<5>(p.kernel_w)
                             : sub_kernels<3>(p.kernel_h) * sub_kernels<3>(p.kernel_w);
}

// The tile grid, per image: the output's 2x2 tiles plus one row and column per extra sub-kernel row
// and column (kernels past R, see forward_decomposed).
inline int64_t grid_rows(const Conv2dParams& p) {
  return ceil_div(p.out_h, 2) + (tile_kernel(p) == 5 ? sub_kernels<5>(p.kernel_h) : sub_kernels<3>(p.kernel_h)) - 1;
}
inline int64_t grid_cols(const Conv2dParams& p) {
  return ceil_div(p.out_w, 2) + (tile_kernel(p) == 5 ? sub_kernels<5>(p.kernel_w) : sub_kernels<3>(p.kernel_w)) - 1;
}

// Tiles of the grid the Winograd passes run over, all images.
inline int64_t grid_tiles(const Conv2dParams& p) { return p.batch * grid_rows(p) * grid_cols(p); }

// Tiles of F(4x4, 3x3)'s grid, all images.
inline int64_t tiles_4x4(const Conv2dParams& p) { return p.batch * ceil_div(p.out_h, 4) * ceil_div(p.out_w, 4); }

// Per-thread scratch shared by every Winograd pass: U (transformed weights, or backward-weight's
// grad_U), V (transformed input tiles) and M (products, or backward-weight's transformed grad_output).
// A layer's forward, backward-input and backward-weight, and every other layer's, reuse the same
// memory instead of each keeping its own set in L3 (10-30 MB a pass on AlexNet conv3-4 at batch 8):
// when passes alternate, as in training, each found its buffers evicted by the others'. Measured
// (2 threads, Intel host, forward + backward through autograd, interleaved against one set per pass):
// AlexNet conv3 and conv4 at batch 8 0.80x the time (0.92 -> 0.74x and 0.87 -> 0.70x torch), ResNet's
// 512 at 7x7 0.90x, MNIST conv2 and AlexNet conv5 at batch 32 1.00-1.01x. Nothing runs two passes at
// once on one thread, and no pass calls another.
enum class Scratch { kU = 0, kV = 1, kM = 2 };
inline float* scratch(Scratch s, int64_t n) {
  thread_local AlignedBuffer shared[3];
  return shared[static_cast<int>(s)].get(n);
}

// Whether a 3x3 forward runs on F(4x4, 3x3) rather than F(2x2, 3x3): from 128 of its 4x4 tiles
// (measured, Intel host, 2 threads, against F(2x2, 3x3): 0.67-0.75x the time at 64-128 channels on
// 28x28-56x56 planes at batch 8, 0.84x MNIST conv2 at batch 100, 0.83-0.89x AlexNet conv3-5 at batch
// 32, 0.88-0.96x at batch 8 (over whole tiles, below); behind under 128 tiles: 1.06x at batch 1 on
// 13x13, 1.16-1.42x on 7x7 and at batch 2 on 13x13). FASTCONV_WINOGRAD_TILE=2 or 4 forces one (tests
// run every 3x3 case on both).
inline bool four_by_four(const Conv2dParams& p) {
  if (p.kernel_h != 3 || p.kernel_w != 3) return false;
  if (const int f = forced("FASTCONV_WINOGRAD_TILE", '2', '4'); f >= 0) return f;
  return tiles_4x4(p) >= 128;
}

constexpr int64_t kWholeForwardBytes = int64_t(32) << 20;  // V and M of all tiles

// Whether a forward of `points` transform points over T tiles (items of `per_item`) runs over all tiles
// at once (forward_whole_tiles): where all tiles' V and M fit in kWholeForwardBytes and items would
// leave a thread fewer than 4, or the layer is wide for its tiles (C*OC >= 64 (C + OC): blocks of tiles
// re-read U, points*C*OC floats, per block; whole tiles write and read V and M, points*(C + OC) floats
// per tile, once). Measured (Intel host, 2 threads, against items): 0.71-0.85x the time on AlexNet
// conv3-4 at batch 8, 0.73x on VGG's 512 at 14x14, 0.64x on ResNet's 512 at 7x7 (batch 8), 0.82x at
// batch 1-2, 0.92x on 128 at 28x28 (batch 8); 1.09-2.4x on AlexNet conv2 (64->192), 1.3x on 64 at
// 56x56, 1.26-1.41x on MNIST conv2 (32->64). Past kWholeForwardBytes (AlexNet conv3-5 at batch 32:
// 41-51 MB) whole tiles took 0.95-1.05x the blocks' time when called back to back, but 1.04-1.07x
// (forward) and 1.05-1.09x (backward-input) when torch's convolution ran between calls, as other
// layers do in a network: their V and M come back from memory. FASTCONV_WINOGRAD_WHOLE_TILES=0 or 1
// forces it (tests cover both).
inline bool whole_tiles_forward(const Conv2dParams& p, int64_t points, int64_t T, int64_t per_item) {
  const int64_t C = p.in_channels, OC = p.out_channels, bytes = points * (C + OC) * (T + kTileCols) * 4;
  // forced (tests) up to the engine's bound on scratch that grows with the batch
  if (const int f = forced("FASTCONV_WINOGRAD_WHOLE_TILES", '0', '1'); f >= 0)
    return f == 1 && bytes <= engine::kMaxPaddedCopyBytes;
  if (bytes > kWholeForwardBytes) return false;
  if (ceil_div(T, per_item) < 4 * at::get_num_threads()) return true;
  return C * OC >= 64 * (C + OC);
}

// The tiles of the variant `forward` below runs these parameters on: transform points, tiles of its
// grid (all images), tiles per work item.
struct ForwardTiles {
  int64_t points, tiles, per_item;
};
inline ForwardTiles forward_tiles_of(const Conv2dParams& p) {
  if (tile_kernel(p) == 5) return {36, grid_tiles(p), tiles_per_item<5>(p)};
  if (four_by_four(p)) return {36, tiles_4x4(p), tiles_per_item<3, 4>(p)};
  return {16, grid_tiles(p), tiles_per_item<3>(p)};
}

// Whether the forward on these parameters runs over whole tiles (3x3 and 5x5 kernels; the sums of
// sub-kernels always run in items).
inline bool whole_tiles_forward(const Conv2dParams& p) {
  if (!((p.kernel_h == 3 && p.kernel_w == 3) || (p.kernel_h == 5 && p.kernel_w == 5))) return false;
  const ForwardTiles f = forward_tiles_of(p);
  return whole_tiles_forward(p, f.points, f.tiles, f.per_item);
}

// The same for backward-weight: from 64 input and output channels (measured, Intel host, 2 threads,
// against F(2x2, 3x3): 0.73-0.94x the time at 64-384 channels on 13x13-56x56 planes at batch 2-32;
// 1.37x at 32->64 channels (MNIST conv2), where transforming grad_output outweighs the products;
// 1.02-1.03x under 128 tiles of 4x4, as in the forward).
inline bool weight_grad_four_by_four(const Conv2dParams& p) {
  if (p.kernel_h != 3 || p.kernel_w != 3) return false;
  if (const int f = forced("FASTCONV_WINOGRAD_TILE", '2', '4'); f >= 0) return f;
  return p.in_channels >= 64 && p.out_channels >= 64 && tiles_4x4(p) >= 128;
}

// Work items of the forward pass in blocks of tiles (Winograd is not split over channels, so these are
// what the threads share).
inline int64_t work_items(const Conv2dParams& p) {
  const ForwardTiles f = forward_tiles_of(p);
  return ceil_div(f.tiles, f.per_item);
}

// Stride 1, dilation 1, one group, kernels from 3x3 up, padding at most kernel - 1 (a tile's patch reaches
// at most that far past the plane), from 8 channels. Nothing is copied per batch: the scratch (per item,
// or all tiles in bounded chunks) does not grow with it.
inline bool applicable(const Conv2dParams& p) {
  return p.kernel_h >= 3 && p.kernel_w >= 3 && p.stride_h == 1 && p.stride_w == 1 && p.dilation_h == 1 &&
         p.dilation_w == 1 && p.groups == 1 && p.pad_h < p.kernel_h && p.pad_w < p.kernel_w && p.in_channels >= 8 &&
         p.out_channels >= 8;
}

// Multiplications of the Winograd forward relative to the direct convolution's ((R+1)^2 per 2x2 tile
// and (sub-kernel, channel pair), tiles of the grid that includes the sub-kernels' extra row/column).
inline double multiplication_ratio(const Conv2dParams& p) {
  const int r = tile_kernel(p);
  const double tiles = double(grid_rows(p) * grid_cols(p));
  return double((r + 1) * (r + 1)) * double(sub_kernel_count(p)) * tiles /
         (double(p.out_h * p.out_w) * double(p.kernel_h * p.kernel_w));
}

// G of F(4x4, 3x3) on the same points (the B^T of both is input_points6).
constexpr float kG43[6][3] = {
    {1.f / 4, 0.f, 0.f},           {-1.f / 6, -1.f / 6, -1.f / 6}, {-1.f / 6, 1.f / 6, -1.f / 6},
    {1.f / 24, 1.f / 12, 1.f / 6}, {1.f / 24, -1.f / 12, 1.f / 6}, {0.f, 0.f, 1.f}};

// G of F(2x2, 5x5) on the points 0, 1, -1, 2, -2 and infinity (Toom-Cook): row i is (1, p, p^2, p^3,
// p^4) / prod over the other finite points q of (p - q); the infinity row takes the last tap.
constexpr float kG5[6][5] = {{1.f / 4, 0.f, 0.f, 0.f, 0.f},
                             {-1.f / 6, -1.f / 6, -1.f / 6, -1.f / 6, -1.f / 6},
                             {-1.f / 6, 1.f / 6, -1.f / 6, 1.f / 6, -1.f / 6},
                             {1.f / 24, 2.f / 24, 4.f / 24, 8.f / 24, 16.f / 24},
                             {1.f / 24, -2.f / 24, 4.f / 24, -8.f / 24, 16.f / 24},
                             {0.f, 0.f, 0.f, 0.f, 1.f}};

// (G g G^T)[xi] of a 6x6-point transform with a K-tap G (F(2x2, 5x5)'s kG5; F(4x4, 3x3) has its own
// explicit weight_points43_x8) for 8 kernels at once (g8[tap][lane]), lane r to u + xi*xi_step + r.
template <int K>
FASTCONV_AVX512 inline void weight_points_x8(const float (&G)[6][K], const float (*g8)[8], float* u, int64_t xi_step) {
  __m256 t[6][K];  // G g
  for (int i = 0; i < 6; ++i)
    for (int j = 0; j < K; ++j) {
      __m256 acc = _mm256_setzero_ps();
      for (int k = 0; k < K; ++k)
        if (G[i][k] != 0.f) acc = _mm256_fmadd_ps(_mm256_set1_ps(G[i][k]), _mm256_load_ps(g8[k * K + j]), acc);
      t[i][j] = acc;
    }
  for (int i = 0; i < 6; ++i)  // (G g) G^T
    for (int j = 0; j < 6; ++j) {
      __m256 acc = _mm256_setzero_ps();
      for (int k = 0; k < K; ++k)
        if (G[j][k] != 0.f) acc = _mm256_fmadd_ps(_mm256_set1_ps(G[j][k]), t[i][k], acc);
      _mm256_storeu_ps(u + (i * 6 + j) * xi_step, acc);
    }
}

// G x of F(4x4, 3x3) (kG43) for 8 kernels per vector: x0/4, -(x0 + x1 + x2)/6, -(x0 - x1 + x2)/6,
// (x0 + 2 x1 + 4 x2)/24, (x0 - 2 x1 + 4 x2)/24, x2.
FASTCONV_AVX512 inline void weight_points43(__m256 x0, __m256 x1, __m256 x2, __m256 y[6]) {
  const __m256 a = _mm256_add_ps(x0, x2), m6 = _mm256_set1_ps(-1.f / 6);
  const __m256 c = _mm256_fmadd_ps(_mm256_set1_ps(1.f / 24), x0, _mm256_mul_ps(_mm256_set1_ps(1.f / 6), x2));
  const __m256 d = _mm256_mul_ps(_mm256_set1_ps(1.f / 12), x1);
  y[0] = _mm256_mul_ps(_mm256_set1_ps(0.25f), x0);
  y[1] = _mm256_mul_ps(m6, _mm256_add_ps(a, x1));
  y[2] = _mm256_mul_ps(m6, _mm256_sub_ps(a, x1));
  y[3] = _mm256_add_ps(c, d);
  y[4] = _mm256_sub_ps(c, d);
  y[5] = x2;
}

// (G g G^T)[xi] of F(4x4, 3x3) for 8 kernels at once, as weight_points_x8 (which took 9.6% of AlexNet
// conv3's backward-input at batch 8 with its generic sums).
FASTCONV_AVX512 inline void weight_points43_x8(const float (*g8)[8], float* u, int64_t xi_step) {
  __m256 t[3][6];  // G g, column by column
  for (int j = 0; j < 3; ++j)
    weight_points43(_mm256_load_ps(g8[j]), _mm256_load_ps(g8[3 + j]), _mm256_load_ps(g8[6 + j]), t[j]);
  for (int i = 0; i < 6; ++i) {  // (G g) G^T, row by row
    __m256 y[6];
    weight_points43(t[0][i], t[1][i], t[2][i], y);
    for (int j = 0; j < 6; ++j) _mm256_storeu_ps(u + (i * 6 + j) * xi_step, y[j]);
  }
}

// (G g G^T)[xi] of F(2x2, 3x3) for 8 kernels at once: G x = x0, (x0 + x1 + x2)/2, (x0 - x1 + x2)/2, x2.
FASTCONV_AVX512 inline void weight_points23_x8(const float (*g8)[8], float* u, int64_t xi_step) {
  const __m256 half = _mm256_set1_ps(0.5f);
  __m256 t[4][3];  // G g
  for (int j = 0; j < 3; ++j) {
    const __m256 x0 = _mm256_load_ps(g8[j]), x1 = _mm256_load_ps(g8[3 + j]), x2 = _mm256_load_ps(g8[6 + j]);
    const __m256 a = _mm256_mul_ps(half, _mm256_add_ps(x0, x2)), b = _mm256_mul_ps(half, x1);
    t[0][j] = x0, t[1][j] = _mm256_add_ps(a, b), t[2][j] = _mm256_sub_ps(a, b), t[3][j] = x2;
  }
  for (int i = 0; i < 4; ++i) {  // (G g) G^T
    const __m256 a = _mm256_mul_ps(half, _mm256_add_ps(t[i][0], t[i][2])), b = _mm256_mul_ps(half, t[i][1]);
    _mm256_storeu_ps(u + (i * 4 + 0) * xi_step, t[i][0]);
    _mm256_storeu_ps(u + (i * 4 + 1) * xi_step, _mm256_add_ps(a, b));
    _mm256_storeu_ps(u + (i * 4 + 2) * xi_step, _mm256_sub_ps(a, b));
    _mm256_storeu_ps(u + (i * 4 + 3) * xi_step, t[i][2]);
  }
}

// (G g G^T)[xi] of the 8 kernels of g8 at u + xi*xi_step, 8 floats each.
template <int R, int M>
FASTCONV_AVX512 inline void weight_points(const float (*g8)[8], float* u, int64_t xi_step) {
  if constexpr (R == 5) {
    weight_points_x8<5>(kG5, g8, u, xi_step);
  } else if constexpr (M == 4) {
    weight_points43_x8(g8, u, xi_step);
  } else {
    weight_points23_x8(g8, u, xi_step);
  }
}

// Two channels' P transformed points (two[h][xi][8]) stored as one 64-byte run per point at
// u + xi*xi_step: whole-line stores.
template <int P>
FASTCONV_AVX512 inline void store_pairs(const float (*two)[P][8], float* u, int64_t xi_step) {
  for (int xi = 0; xi < P; ++xi)
    _mm512_storeu_ps(u + xi * xi_step, _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_load_ps(two[0][xi])),
                                                          _mm256_load_ps(two[1][xi]), 1));
}

// U[xi][ob][c][8] = (G g G^T)[xi] for g = w[ob*8 + r][c] (RxR), zero rows past OC. With `flipped`, g is
// the flipped, transposed kernel of a backward-input (flipped_conv.h) read straight from the forward
// weights w[c][oc] (taps reversed): no flipped copy (it, and zeroing it, took 7.6% of AlexNet conv3's
// Winograd backward-input at batch 8).
template <int R, int M = 2>
inline void transform_weights(const float* w, int64_t OC, int64_t C, float* U, bool flipped = false) {
  constexpr int P = kPoints<R, M>;
  const int64_t ob_count = ceil_div(OC, kTileRows);
  // Per block of 8 output channels and input channel: the 8 kernels gathered tap-major, transformed
  // 8 per vector, each of the P positions stored as one contiguous run of 8 floats (it was P scattered
  // floats per (oc, c): a quarter of AlexNet conv5's Winograd forward at batch 8, measured; and the
  // F(2x2, 3x3) transform in scalar code took 20-24% of ResNet's 512 at 7x7 over whole tiles).
  const int64_t xi_step = ob_count * C * kTileRows;
  const auto gather = [&](int64_t ob, int64_t c, float (*g8)[kTileRows]) {
    for (int64_t r = 0; r < kTileRows; ++r) {
      const int64_t oc = ob * kTileRows + r;
      if (oc >= OC) {
        for (int k = 0; k < R * R; ++k) g8[k][r] = 0.f;
      } else if (flipped) {
        for (int k = 0; k < R * R; ++k) g8[k][r] = w[(c * OC + oc) * R * R + R * R - 1 - k];
      } else {
        for (int k = 0; k < R * R; ++k) g8[k][r] = w[(oc * C + c) * R * R + k];
      }
    }
  };
  // Per block of 8 output channels: all C channels' kernels gathered first (a vector load of a g8 row
  // right after the scalar stores that wrote it waits for them to drain), then two channels at a time
  // transformed and stored as one 64-byte run per point (whole-line stores into U, which lives in L3:
  // with 32-byte runs, perf put the transform's time on its stores). Measured against gathering and
  // storing one channel at a time (2 threads, Intel host, interleaved): AlexNet conv3-4 and ResNet's
  // 512 at 7x7 forward at batch 8 0.94-0.97x the time, backward-input 0.97-1.01x.
  at::parallel_for(0, ob_count, engine::grain_for(P * C * kTileRows), [&](int64_t b0, int64_t b1) {
    thread_local AlignedBuffer gbuf;
    float* gathered = gbuf.get(C * R * R * kTileRows);
    const auto g8_of = [&](int64_t c) {
      return reinterpret_cast<float (*)[kTileRows]>(gathered + c * R * R * kTileRows);
    };
    for (int64_t ob = b0; ob < b1; ++ob) {
      for (int64_t c = 0; c < C; ++c) gather(ob, c, g8_of(c));
      int64_t c = 0;
      for (; c + 1 < C; c += 2) {
        alignas(64) float two[2][P][kTileRows];
        weight_points<R, M>(g8_of(c), &two[0][0][0], kTileRows);
        weight_points<R, M>(g8_of(c + 1), &two[1][0][0], kTileRows);
        store_pairs<P>(two, U + (ob * C + c) * kTileRows, xi_step);
      }
      if (c < C) weight_points<R, M>(g8_of(c), U + (ob * C + c) * kTileRows, xi_step);  // odd C
    }
  });
}

// A run of at most 16 tiles of one tile row that lands in one 48-tile panel.
struct TileRun {
  int64_t n, i, j0, len, t;  // image, tile row, first tile column, tiles, position in the item
};

// The runs of tiles [g0, g1) of a grid `width` tiles wide and `per_image` tiles per image (positions
// counted from g0), keeping only tiles in rows < rows and columns < cols (the output tiles of a grid
// wider than the output; rows = per_image / width and cols = width keep them all).
inline void tile_runs(int64_t g0, int64_t g1, int64_t per_image, int64_t width, int64_t rows, int64_t cols,
                      std::vector<TileRun>& runs) {
  runs.clear();
  for (int64_t g = g0; g < g1;) {
    const int64_t n = g / per_image, i = (g % per_image) / width, j = g % width, t = g - g0;
    if (i >= rows || j >= cols) {
      g += width - j;
      continue;
    }
    const int64_t len = std::min({16 - t % 16, cols - j, g1 - g});  // within one 16-tile window
    runs.push_back({n, i, j, len, t});
    g += len;
  }
}

FASTCONV_AVX512 inline __m512i even_lanes() {
  return _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
}
FASTCONV_AVX512 inline __m512i odd_lanes() {
  return _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
}

// A 16-tile window of an item is made of runs (one per tile row it touches). Each run's inputs are
// loaded as if its first tile sat in lane 0 of a window starting M*lane floats earlier, so the
// deinterleaved lanes line up, and merged under the run's lane mask: the transforms then work on
// dense 16-tile vectors however short the tile rows are.
// Both the input and grad_output are read in place, not from zero-padded copies (the input's had cost
// 10-14% of MNIST conv2's forward and backward-weight, grad_output's 20-25% of its backward-weight): a
// run knows which of its rows and columns lie inside the plane, and everything outside reads as zero.
struct WindowRun {
  const float* src;  // row 0 of the window-aligned patch: the run's first tile minus M*lane floats
  __mmask16 lanes;
  int row_lo, row_hi;  // the patch rows inside the plane
  int64_t width;       // grad_output: the pixels of each row inside the plane, counted from src
  __mmask16 cols[8];   // input: the lanes of each of load_row's loads inside the plane and the run's patch
};

// The column (from src) that load_row's load `idx` starts at: M floats per step of s, then 16 per vector.
template <int M>
constexpr int load_column(int idx) {
  return (idx / M) * M + (idx % M) * 16;
}

// Row r of the patches of the 16 tiles of a window (row r of run k at src + r*pitch + coff), tiles M
// pixels apart: tile lane l reads d[s] = src[r*pitch + coff + M*l + s] of its run, s < N, under the
// run's column masks (zero outside them and outside its rows).
template <int N, int M = 2>
FASTCONV_AVX512 inline void load_row(const WindowRun* runs, int count, int r, int64_t pitch, int64_t coff,
                                     __m512 d[N]) {
  for (int s = 0; s < N; ++s) d[s] = _mm512_setzero_ps();
  if constexpr (M == 2) {
    const __m512i ev = even_lanes(), od = odd_lanes();
    for (int k = 0; k < count; ++k) {
      if (r < runs[k].row_lo || r >= runs[k].row_hi) continue;
      const __mmask16 m = runs[k].lanes;
      const float* row = runs[k].src + coff + r * pitch;
      for (int s = 0; s < N; s += 2) {
        const __m512 a0 = _mm512_maskz_loadu_ps(runs[k].cols[s], row + s);
        const __m512 a1 = _mm512_maskz_loadu_ps(runs[k].cols[s + 1], row + s + 16);
        d[s] = _mm512_mask_mov_ps(d[s], m, _mm512_permutex2var_ps(a0, ev, a1));
        d[s + 1] = _mm512_mask_mov_ps(d[s + 1], m, _mm512_permutex2var_ps(a0, od, a1));
      }
    }
  } else {  // M = 4: tiles 0-7 from the first 32 floats, 8-15 from the next 32, joined by 128-bit blocks
    const __m512i every4 = _mm512_slli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2);
    for (int k = 0; k < count; ++k) {
      if (r < runs[k].row_lo || r >= runs[k].row_hi) continue;
      const __mmask16 m = runs[k].lanes;
      const float* row = runs[k].src + coff + r * pitch;
      for (int base = 0; base < N; base += 4) {
        const __mmask16* cm = runs[k].cols + base;  // loads base .. base + 3
        const __m512 a0 = _mm512_maskz_loadu_ps(cm[0], row + base), a1 = _mm512_maskz_loadu_ps(cm[1], row + base + 16);
        const __m512 a2 = _mm512_maskz_loadu_ps(cm[2], row + base + 32);
        const __m512 a3 = _mm512_maskz_loadu_ps(cm[3], row + base + 48);
        for (int q = 0; q < 4 && base + q < N; ++q) {
          const __m512i idx = _mm512_add_epi32(every4, _mm512_set1_epi32(q));
          const __m512 lo = _mm512_permutex2var_ps(a0, idx, a1), hi = _mm512_permutex2var_ps(a2, idx, a3);
          d[base + q] = _mm512_mask_mov_ps(d[base + q], m, _mm512_shuffle_f32x4(lo, hi, 0x44));
        }
      }
    }
  }
}

// y = B^T x for F(2x2, 5x5)'s B^T (6x6, points 0, +-1, +-2: the B^T of F(4x4, 3x3)):
//   [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
FASTCONV_AVX512 inline void input_points6(const __m512 x[6], __m512 y[6]) {
  const __m512 two = _mm512_set1_ps(2.f), four = _mm512_set1_ps(4.f), five = _mm512_set1_ps(5.f);
  const __m512 a = _mm512_fnmadd_ps(four, x[2], x[4]), b = _mm512_fnmadd_ps(four, x[1], x[3]);
  const __m512 c = _mm512_sub_ps(x[4], x[2]), e = _mm512_mul_ps(two, _mm512_sub_ps(x[3], x[1]));
  y[0] = _mm512_fmadd_ps(four, x[0], _mm512_fnmadd_ps(five, x[2], x[4]));
  y[1] = _mm512_add_ps(a, b);
  y[2] = _mm512_sub_ps(a, b);
  y[3] = _mm512_add_ps(c, e);
  y[4] = _mm512_sub_ps(c, e);
  y[5] = _mm512_fmadd_ps(four, x[1], _mm512_fnmadd_ps(five, x[3], x[5]));
}

// V = B^T d B for one window of one channel (runs from input_runs, rows `pitch` floats apart, the
// channel `coff` floats past them); 16 lanes per xi at v_out + xi*xi_stride.
template <int R, int M = 2>
FASTCONV_AVX512 inline void input_transform(const WindowRun* runs, int count, int64_t pitch, int64_t coff, float* v_out,
                                            int64_t xi_stride) {
  if constexpr (R == 3 && M == 2) {
    __m512 d[4][4];
    for (int r = 0; r < 4; ++r) load_row<4>(runs, count, r, pitch, coff, d[r]);
    __m512 t[4][4];
    for (int s = 0; s < 4; ++s) {
      t[0][s] = _mm512_sub_ps(d[0][s], d[2][s]);
      t[1][s] = _mm512_add_ps(d[1][s], d[2][s]);
      t[2][s] = _mm512_sub_ps(d[2][s], d[1][s]);
      t[3][s] = _mm512_sub_ps(d[1][s], d[3][s]);
    }
    for (int r = 0; r < 4; ++r) {
      _mm512_storeu_ps(v_out + (r * 4 + 0) * xi_stride, _mm512_sub_ps(t[r][0], t[r][2]));
      _mm512_storeu_ps(v_out + (r * 4 + 1) * xi_stride, _mm512_add_ps(t[r][1], t[r][2]));
      _mm512_storeu_ps(v_out + (r * 4 + 2) * xi_stride, _mm512_sub_ps(t[r][2], t[r][1]));
      _mm512_storeu_ps(v_out + (r * 4 + 3) * xi_stride, _mm512_sub_ps(t[r][1], t[r][3]));
    }
  } else {
    __m512 t[6][6];  // d B, row by row
    for (int r = 0; r < 6; ++r) {
      __m512 d[6];
      load_row<6, M>(runs, count, r, pitch, coff, d);
      input_points6(d, t[r]);
    }
    for (int j = 0; j < 6; ++j) {  // B^T (d B), column by column
      const __m512 col[6] = {t[0][j], t[1][j], t[2][j], t[3][j], t[4][j], t[5][j]};
      __m512 v[6];
      input_points6(col, v);
      for (int i = 0; i < 6; ++i) _mm512_storeu_ps(v_out + (i * 6 + j) * xi_stride, v[i]);
    }
  }
}

// The windows of an item's runs: window w holds runs[first[w] .. first[w+1]).
inline void make_windows(const std::vector<TileRun>& runs, std::vector<int>& first) {
  first.clear();
  for (size_t k = 0; k < runs.size(); ++k) {
    if (first.empty() || runs[k].t / 16 != runs[first.back()].t / 16) first.push_back(static_cast<int>(k));
  }
  first.push_back(static_cast<int>(runs.size()));
}

// The planes the input transform reads in place: C channels of H x W per image, padded by pad_h/pad_w
// (patch row r of tile row i is input row M*i + r - pad_h; column x of tile column j input column
// M*j + x - pad_w; zero outside the plane).
struct InputPlanes {
  const float* data;
  int64_t C, H, W, pad_h, pad_w;
};

// The window runs of all `runs` (out[k] for runs[k]) on channel 0 of `in`, for RxR kernels and MxM tiles
// (input_transform adds the channel's offset): each run's rows inside the plane and, per load of
// load_row, the lanes inside both the plane's columns and the run's patch (tiles [lane, lane + len):
// columns [M*lane, M*(lane + len) + R - 1) from src).
template <int R, int M>
inline void input_runs(const std::vector<TileRun>& runs, const InputPlanes& in, std::vector<WindowRun>& out) {
  constexpr int N = M + R - 1, loads = M == 2 ? N : 8;
  out.resize(runs.size());
  for (size_t k = 0; k < runs.size(); ++k) {
    const TileRun& r = runs[k];
    const int64_t lane = r.t % 16, x0 = M * (r.j0 - lane) - in.pad_w, y0 = M * r.i - in.pad_h;
    WindowRun& w = out[k];
    w.src = in.data + r.n * in.C * in.H * in.W + y0 * in.W + x0;
    w.lanes = lane_mask(lane, lane + r.len);
    w.row_lo = static_cast<int>(std::clamp<int64_t>(-y0, 0, N));
    w.row_hi = static_cast<int>(std::clamp<int64_t>(in.H - y0, 0, N));
    w.width = 0;
    const int64_t lo = std::max(M * lane, -x0), hi = std::min(M * (lane + r.len) + R - 1, in.W - x0);
    for (int idx = 0; idx < 8; ++idx)
      w.cols[idx] = idx < loads ? lane_mask(lo - load_column<M>(idx), hi - load_column<M>(idx)) : 0;
  }
}

// The window runs of runs[k0, k1), MxM output tiles of H x W planes read in place (image n's plane at
// plane0 + n*image_stride, rows W apart): each run's rows inside the plane (M, or fewer at the bottom)
// and its pixels per row inside it, counted from src; the parts of the tiles past the plane's last row
// or column are not read (they count as zeros).
inline int grad_output_runs(const std::vector<TileRun>& runs, int k0, int k1, const float* plane0, int64_t image_stride,
                            int64_t H, int64_t W, WindowRun* out, int64_t M) {
  int count = 0;
  for (int k = k0; k < k1; ++k) {
    const TileRun& r = runs[k];
    const int64_t lane = r.t % 16;
    WindowRun& w = out[count++];
    w.src = plane0 + r.n * image_stride + M * r.i * W + M * (r.j0 - lane);
    w.lanes = lane_mask(lane, lane + r.len);
    w.row_lo = 0;
    w.row_hi = static_cast<int>(std::min(M, H - M * r.i));
    w.width = W - M * (r.j0 - lane);
  }
  return count;
}

// A^T x of F(2x2, 5x5): x0 + x1 + x2 + x3 + x4 and x1 - x2 + 2 (x3 - x4) + x5.
FASTCONV_AVX512 inline void output_points6(const __m512 x[6], __m512& first, __m512& second) {
  first = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(x[0], x[1]), _mm512_add_ps(x[2], x[3])), x[4]);
  second =
      _mm512_fmadd_ps(_mm512_set1_ps(2.f), _mm512_sub_ps(x[3], x[4]), _mm512_add_ps(_mm512_sub_ps(x[1], x[2]), x[5]));
}

// A (x, y) of F(2x2, 5x5), A = (A^T)^T: [x, x + y, x - y, x + 2y, x - 2y, y].
FASTCONV_AVX512 inline void grad_points6(__m512 x, __m512 y, __m512 v[6]) {
  const __m512 two = _mm512_set1_ps(2.f);
  v[0] = x, v[1] = _mm512_add_ps(x, y), v[2] = _mm512_sub_ps(x, y);
  v[3] = _mm512_fmadd_ps(two, y, x), v[4] = _mm512_fnmadd_ps(two, y, x), v[5] = y;
}

// A^T x of F(4x4, 3x3) (4x6, points 0, +-1, +-2, infinity): x0 + x1 + x2 + x3 + x4,
// x1 - x2 + 2 (x3 - x4), x1 + x2 + 4 (x3 + x4), x1 - x2 + 8 (x3 - x4) + x5.
FASTCONV_AVX512 inline void output_points4(const __m512 x[6], __m512 y[4]) {
  const __m512 d12 = _mm512_sub_ps(x[1], x[2]), s12 = _mm512_add_ps(x[1], x[2]);
  const __m512 d34 = _mm512_sub_ps(x[3], x[4]), s34 = _mm512_add_ps(x[3], x[4]);
  y[0] = _mm512_add_ps(_mm512_add_ps(x[0], s12), s34);
  y[1] = _mm512_fmadd_ps(_mm512_set1_ps(2.f), d34, d12);
  y[2] = _mm512_fmadd_ps(_mm512_set1_ps(4.f), s34, s12);
  y[3] = _mm512_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(8.f), d34, d12), x[5]);
}

// A x of F(4x4, 3x3), A = (A^T)^T (6x4): [x0, x0 + x1 + x2 + x3, x0 - x1 + x2 - x3, x0 + 2x1 + 4x2 + 8x3,
// x0 - 2x1 + 4x2 - 8x3, x3].
FASTCONV_AVX512 inline void grad_points4(__m512 x0, __m512 x1, __m512 x2, __m512 x3, __m512 v[6]) {
  const __m512 e = _mm512_add_ps(x0, x2), o = _mm512_add_ps(x1, x3);
  const __m512 e4 = _mm512_fmadd_ps(_mm512_set1_ps(4.f), x2, x0);
  const __m512 o4 = _mm512_mul_ps(_mm512_set1_ps(2.f), _mm512_fmadd_ps(_mm512_set1_ps(4.f), x3, x1));
  v[0] = x0, v[1] = _mm512_add_ps(e, o), v[2] = _mm512_sub_ps(e, o);
  v[3] = _mm512_add_ps(e4, o4), v[4] = _mm512_sub_ps(e4, o4), v[5] = x3;
}

// Y = A^T m A (+ bias, ReLU) for 16 consecutive tiles of an item, m[xi] at m + xi*xi_stride:
// y[M*r + q] is pixel (r, q) of each tile (for M = 2: y[0], y[1] its top row, y[2], y[3] its bottom).
// A^T is [1 1 1 0; 0 1 -1 -1] for F(2x2, 3x3), [1 1 1 1 1 0; 0 1 -1 2 -2 1] for F(2x2, 5x5),
// output_points4 for F(4x4, 3x3).
template <int R, int M = 2>
FASTCONV_AVX512 inline void output_transform(const float* m, int64_t xi_stride, float bias, bool relu,
                                             __m512 y[M * M]) {
  const __m512 bv = _mm512_set1_ps(bias);
  if constexpr (M == 4) {
    __m512 a[6][4];
    for (int s = 0; s < 6; ++s) {  // A^T m: rows
      __m512 col[6];
      for (int i = 0; i < 6; ++i) col[i] = _mm512_loadu_ps(m + (i * 6 + s) * xi_stride);
      output_points4(col, a[s]);
    }
    for (int r = 0; r < 4; ++r) {  // (A^T m) A
      const __m512 row[6] = {a[0][r], a[1][r], a[2][r], a[3][r], a[4][r], a[5][r]};
      output_points4(row, y + 4 * r);
    }
    for (int r = 0; r < 16; ++r) y[r] = _mm512_add_ps(y[r], bv);
  } else if constexpr (R == 3) {
    __m512 a[4], b[4];
    for (int s = 0; s < 4; ++s) {  // A^T m: rows
      const __m512 m0 = _mm512_loadu_ps(m + (0 * 4 + s) * xi_stride), m1 = _mm512_loadu_ps(m + (1 * 4 + s) * xi_stride);
      const __m512 m2 = _mm512_loadu_ps(m + (2 * 4 + s) * xi_stride), m3 = _mm512_loadu_ps(m + (3 * 4 + s) * xi_stride);
      a[s] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
      b[s] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
    }
    y[0] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), a[2]), bv);
    y[1] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(a[1], a[2]), a[3]), bv);
    y[2] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(b[0], b[1]), b[2]), bv);
    y[3] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(b[1], b[2]), b[3]), bv);
  } else {
    __m512 a[6], b[6];
    for (int s = 0; s < 6; ++s) {  // A^T m: rows
      __m512 col[6];
      for (int i = 0; i < 6; ++i) col[i] = _mm512_loadu_ps(m + (i * 6 + s) * xi_stride);
      output_points6(col, a[s], b[s]);
    }
    output_points6(a, y[0], y[1]);
    output_points6(b, y[2], y[3]);
    for (int r = 0; r < 4; ++r) y[r] = _mm512_add_ps(y[r], bv);
  }
  if (relu) {
    for (int r = 0; r < M * M; ++r) y[r] = _mm512_max_ps(_mm512_setzero_ps(), y[r]);  // NaN stays NaN
  }
}

// Writes the tiles of lanes [lane, lane + len) of y (one tile-row run) interleaved into output rows
// 2i (and 2i+1 when `second_row`) from column 2*j0; `cols` of them are inside the output.
FASTCONV_AVX512 inline void store_run(const __m512 y[4], int64_t lane, float* out, int64_t OW, int64_t cols,
                                      bool second_row) {
  const __m512i shift = _mm512_set1_epi32(static_cast<int>(lane));
  const __m512i lo = _mm512_add_epi32(interleave_lo(), shift), hi = _mm512_add_epi32(interleave_hi(), shift);
  const __mmask16 m_lo = lane_mask(0, cols), m_hi = lane_mask(0, cols - 16);
  for (int r = 0; r < (second_row ? 2 : 1); ++r) {
    _mm512_mask_storeu_ps(out + r * OW, m_lo, _mm512_permutex2var_ps(y[2 * r], lo, y[2 * r + 1]));
    if (m_hi) _mm512_mask_storeu_ps(out + r * OW + 16, m_hi, _mm512_permutex2var_ps(y[2 * r], hi, y[2 * r + 1]));
  }
}

// The same for 4x4 tiles: output rows 4i .. 4i + rows - 1, `cols` pixels of each from column 4*j0.
// Per row, the run's tiles are moved to lane 0 and their four pixels interleaved (pairs, then pairs of
// pairs): 16 tiles are 64 pixels, four vectors.
FASTCONV_AVX512 inline void store_run4(const __m512 y[16], int64_t lane, float* out, int64_t OW, int64_t cols,
                                       int64_t rows) {
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i shift = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(lane)));
  const __m512i pairs_lo = interleave_lo(), pairs_hi = interleave_hi();
  const __m512i quads_lo = _mm512_set_epi32(23, 22, 7, 6, 21, 20, 5, 4, 19, 18, 3, 2, 17, 16, 1, 0);
  const __m512i quads_hi = _mm512_set_epi32(31, 30, 15, 14, 29, 28, 13, 12, 27, 26, 11, 10, 25, 24, 9, 8);
  for (int64_t r = 0; r < rows; ++r) {
    __m512 q[4];
    for (int j = 0; j < 4; ++j) q[j] = lane ? _mm512_permutexvar_ps(shift, y[4 * r + j]) : y[4 * r + j];
    const __m512 p01[2] = {_mm512_permutex2var_ps(q[0], pairs_lo, q[1]), _mm512_permutex2var_ps(q[0], pairs_hi, q[1])};
    const __m512 p23[2] = {_mm512_permutex2var_ps(q[2], pairs_lo, q[3]), _mm512_permutex2var_ps(q[2], pairs_hi, q[3])};
    for (int v = 0; v < 4; ++v) {  // pixels 16v .. 16v + 15: tiles 4v .. 4v + 3
      const __mmask16 m = lane_mask(0, cols - 16 * v);
      if (!m) break;
      const __m512 px = _mm512_permutex2var_ps(p01[v / 2], v % 2 ? quads_hi : quads_lo, p23[v / 2]);
      _mm512_mask_storeu_ps(out + r * OW + 16 * v, m, px);
    }
  }
}

// Y = A^T M A (+ bias, ReLU) of an item's output tiles, M[xi][oc][NT] (xi `m_xi_stride` apart), stored
// into NCHW `out`: per output channel in [oc_begin, oc_end) (default: all), one 16-tile window of M at a
// time, then each run in it.
template <int R, int M = 2>
FASTCONV_AVX512 inline void store_outputs(const float* prod, int64_t NT, int64_t m_xi_stride,
                                          const std::vector<TileRun>& runs, const float* bias, bool relu, float* out,
                                          const Conv2dParams& p, int64_t oc_begin = 0, int64_t oc_end = -1) {
  const int64_t OC = p.out_channels, OW = p.out_w, L = p.out_plane();
  for (int64_t oc = oc_begin; oc < (oc_end < 0 ? OC : oc_end); ++oc) {
    const float bias_oc = bias ? bias[oc] : 0.f;
    for (size_t k = 0; k < runs.size();) {
      const int64_t window = runs[k].t / 16;
      __m512 y[M * M];
      output_transform<R, M>(prod + oc * NT + window * 16, m_xi_stride, bias_oc, relu, y);
      for (; k < runs.size() && runs[k].t / 16 == window; ++k) {
        const TileRun& r = runs[k];
        float* dst = out + (r.n * OC + oc) * L + M * r.i * OW + M * r.j0;
        const int64_t cols = std::min(M * r.len, OW - M * r.j0);
        if constexpr (M == 2) {
          store_run(y, r.t % 16, dst, OW, cols, 2 * r.i + 1 < p.out_h);
        } else {
          store_run4(y, r.t % 16, dst, OW, cols, std::min<int64_t>(4, p.out_h - 4 * r.i));
        }
      }
    }
  }
}

// M_xi = (Init::kZero) or += (Init::kAccumulate) U_xi V_xi for the output-channel blocks [ob0, ob1) and
// the first `tiles` columns: U[xi][ob][c][8] from input channel c0, kc deep; V_xi in 48-tile panels
// `panel_stride` floats apart from v (kc rows of 48 each); M_xi rows NT floats apart from m.
inline void transformed_products(const float* U, int64_t xi, int64_t ob_count, int64_t C, int64_t c0, int64_t kc,
                                 int64_t OC, int64_t ob0, int64_t ob1, const float* v, int64_t panel_stride,
                                 int64_t tiles, float* m, int64_t NT, Init init) {
  for (int64_t ob = ob0; ob < ob1; ++ob) {
    const int mr = static_cast<int>(std::min<int64_t>(kTileRows, OC - ob * kTileRows));
    const float* a = U + ((xi * ob_count + ob) * C + c0) * kTileRows;
    for (int64_t j = 0; j < ceil_div(tiles, kTileCols); ++j) {
      const int nv = static_cast<int>(std::min<int64_t>(kTileVectors, ceil_div(tiles - j * kTileCols, 16)));
      TileDest d;
      d.ldc = NT;
      for (int q = 0; q < kTileVectors; ++q) {
        d.ptr[q][0] = d.ptr[q][1] = m + ob * kTileRows * NT + j * kTileCols + 16 * q;
        d.mask[q][0] = q < nv ? __mmask16(0xFFFF) : __mmask16(0);
        d.mask[q][1] = 0;
      }
      run_micro_kernel(mr, nv, kc, a, 1, kTileRows, PanelB{v + j * panel_stride, kTileCols}, d, init, nullptr);
    }
  }
}

template <int R>
inline void forward_decomposed(const float* input, const float* weight, const float* bias, float* out,
                               const Conv2dParams& p, bool relu, bool flipped);

// The forward over all tiles at once (few tiles: small planes, small batches): every tile's V first
// (the threads split 16-tile windows and channel chunks), then one task per (transform point, group of
// output-channel blocks) multiplies U_xi by all of V_xi (U is read once in all, and the threads share
// the work however few tiles there are), then the output transforms (the threads split the channels).
template <int R, int M>
inline void forward_whole_tiles(const float* U, const InputPlanes& in, int64_t th, int64_t tw, const float* bias,
                                bool relu, float* out, const Conv2dParams& p) {
  constexpr int P = kPoints<R, M>;
  const int64_t C = p.in_channels, OC = p.out_channels, per_image = th * tw, T = p.batch * per_image;
  const int64_t ob_count = ceil_div(OC, kTileRows);
  const int64_t NT = ceil_div(T, kTileCols) * kTileCols, npanels = NT / kTileCols;
  const int64_t panel_stride = C * kTileCols + 16, xi_stride = npanels * panel_stride;  // V[xi][panel][c][48]
  float* V = scratch(Scratch::kV, P * xi_stride);
  float* prod = scratch(Scratch::kM, P * ob_count * kTileRows * NT + 16);
  const int64_t windows = ceil_div(T, 16);
  const int64_t c_chunks = std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), windows), 1, ceil_div(C, 16));
  at::parallel_for(0, windows * c_chunks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<TileRun> runs;
    std::vector<WindowRun> wr;
    for (int64_t task = b0; task < b1; ++task) {
      const int64_t t0 = task / c_chunks * 16, cc = task % c_chunks;
      tile_runs(t0, std::min(T, t0 + 16), per_image, tw, th, tw, runs);
      input_runs<R, M>(runs, in, wr);
      for (int64_t c = cc * C / c_chunks; c < (cc + 1) * C / c_chunks; ++c) {
        input_transform<R, M>(wr.data(), static_cast<int>(wr.size()), in.W, c * in.H * in.W,
                              V + (t0 / kTileCols) * panel_stride + c * kTileCols + t0 % kTileCols, xi_stride);
      }
    }
  });
  const int64_t kb_count = ceil_div(C, kMaxBlockC), kc_max = ceil_div(C, kb_count);
  const int64_t o_groups = std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), P), 1, ob_count);
  at::parallel_for(0, P * o_groups, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t task = b0; task < b1; ++task) {
      const int64_t xi = task / o_groups, og = task % o_groups;
      for (int64_t cb = 0; cb < kb_count; ++cb) {
        const int64_t c0 = cb * kc_max, kc = std::min(kc_max, C - c0);
        transformed_products(U, xi, ob_count, C, c0, kc, OC, og * ob_count / o_groups, (og + 1) * ob_count / o_groups,
                             V + xi * xi_stride + c0 * kTileCols, panel_stride, T,
                             prod + xi * ob_count * kTileRows * NT, NT, cb == 0 ? Init::kZero : Init::kAccumulate);
      }
    }
  });
  std::vector<TileRun> runs;
  tile_runs(0, T, per_image, tw, th, tw, runs);
  at::parallel_for(0, OC, engine::grain_for(P * 16 * ceil_div(T, 16)), [&](int64_t o0, int64_t o1) {
    store_outputs<R, M>(prod, NT, ob_count * kTileRows * NT, runs, bias, relu, out, p, o0, o1);
  });
}

// F(MxM, RxR) on an RxR kernel (other sizes: forward_decomposed, M = 2).
template <int R, int M = 2>
inline void forward_tiles(const float* input, const float* weight, const float* bias, float* out, const Conv2dParams& p,
                          bool relu, bool flipped) {
  if constexpr (M == 2) {
    if (p.kernel_h != R || p.kernel_w != R) return forward_decomposed<R>(input, weight, bias, out, p, relu, flipped);
  }
  constexpr int P = kPoints<R, M>;
  const int64_t C = p.in_channels, OC = p.out_channels, H = p.in_h, W = p.in_w, OW = p.out_w;
  const int64_t th = ceil_div(p.out_h, M), tw = ceil_div(OW, M), per_image = th * tw, T = p.batch * per_image;
  const int64_t ob_count = ceil_div(OC, kTileRows);
  float* U = scratch(Scratch::kU, P * ob_count * C * kTileRows);  // not zeroed: every row is written
  transform_weights<R, M>(weight, OC, C, U, flipped);
  const InputPlanes in{input, C, H, W, p.pad_h, p.pad_w};  // tiles read patch rows [Mi, Mi + M + R - 1)
  if (whole_tiles_forward(p, P, T, tiles_per_item<R, M>(p))) {
    return forward_whole_tiles<R, M>(U, in, th, tw, bias, relu, out, p);
  }
  // items of whole 16-tile windows, balanced over the threads; NT: the largest, in whole panels
  const engine::BalancedItems items(T, tiles_per_item<R, M>(p), 16);
  const int64_t NT = ceil_div(items.largest(), kTileCols) * kTileCols, npanels = NT / kTileCols;
  const int64_t kb_count = ceil_div(C, kMaxBlockC), kc_max = ceil_div(C, kb_count);
  const int64_t panel_stride_max = kc_max * kTileCols + 16;  // +16: room for the last row's junk lanes
  at::parallel_for(0, items.count, 1, [&](int64_t begin, int64_t end) {
    float* V = scratch(Scratch::kV, P * npanels * panel_stride_max);
    float* prod = scratch(Scratch::kM, P * ob_count * kTileRows * NT + 16);
    std::vector<TileRun> runs;
    std::vector<int> windows;
    std::vector<WindowRun> wr;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t0 = items.begin(item), t1 = items.end(item);
      tile_runs(t0, t1, per_image, tw, th, tw, runs);
      make_windows(runs, windows);
      input_runs<R, M>(runs, in, wr);
      for (int64_t cb = 0; cb < kb_count; ++cb) {
        const int64_t c0 = cb * kc_max, kc = std::min(kc_max, C - c0);
        // V[xi][panel][c][48]
        const int64_t panel_stride = kc * kTileCols + 16, xi_stride = npanels * panel_stride;
        for (int64_t c = 0; c < kc; ++c) {
          for (size_t w = 0; w + 1 < windows.size(); ++w) {
            const int64_t t = runs[windows[w]].t / 16 * 16;
            input_transform<R, M>(wr.data() + windows[w], windows[w + 1] - windows[w], W, (c0 + c) * H * W,
                                  V + (t / kTileCols) * panel_stride + c * kTileCols + t % kTileCols, xi_stride);
          }
        }
        for (int64_t xi = 0; xi < P; ++xi) {
          transformed_products(U, xi, ob_count, C, c0, kc, OC, 0, ob_count, V + xi * xi_stride, panel_stride, t1 - t0,
                               prod + xi * ob_count * kTileRows * NT, NT, cb == 0 ? Init::kZero : Init::kAccumulate);
        }
      }
      store_outputs<R, M>(prod, NT, ob_count * kTileRows * NT, runs, bias, relu, out, p);
    }
  });
}

// ---- larger kernels: sums of RxR sub-kernels ------------------------------------------------------
// A KH x KW kernel is the sum of na x nb RxR sub-kernels at offsets (2a, 2b): sub-kernel a takes kernel
// rows 2a and 2a+1, the last one also rows 2a+2 .. 2a+R-1 (zeros past the kernel); columns likewise. An
// offset of two pixels is one tile, so every sub-kernel reads the transformed input V of one tile grid,
// shifted:
//   M_xi[oc][t] = sum over (c, a, b) of U_{ab,xi}[oc][c] * V_xi[c][t + a*TW + b]
// on a grid of TH x TW tiles per image (the output's th x tw plus na-1 rows and nb-1 columns, whose
// results are not stored). One GEMM per xi with the reduction over (c, a, b), B read through OffsetB;
// same float32 error as one RxR kernel (the sums over sub-kernels are plain additions). A kernel smaller
// than RxR (4x4 on F(2x2, 5x5)) is one sub-kernel, zero-padded.
template <int R>
inline void forward_decomposed(const float* input, const float* weight, const float* bias, float* out,
                               const Conv2dParams& p, bool relu, bool flipped) {
  constexpr int P = kPoints<R>;
  const int64_t C = p.in_channels, OC = p.out_channels, OW = p.out_w, OH = p.out_h;
  const int64_t KH = p.kernel_h, KW = p.kernel_w, na = sub_kernels<R>(KH), nb = sub_kernels<R>(KW), nab = na * nb;
  const int64_t th = ceil_div(OH, 2), tw = ceil_div(OW, 2), TH = th + na - 1, TW = tw + nb - 1;
  const int64_t per_image = TH * TW, T = p.batch * per_image, halo = (na - 1) * TW + (nb - 1);
  const int64_t ob_count = ceil_div(OC, kTileRows);
  // the sub-kernels as RxR kernels of C*nab "channels" (c, a, b), then their transforms U[xi][ob][k][8]
  std::vector<float> sub(OC * C * nab * R * R);
  std::vector<SubKernel<R>> subs;
  for (int64_t ab = 0; ab < nab; ++ab) subs.emplace_back(KH, KW, ab / nb, ab % nb);
  at::parallel_for(0, OC, engine::grain_for(C * nab * R * R), [&](int64_t o0, int64_t o1) {
    std::fill(sub.begin() + o0 * C * nab * R * R, sub.begin() + o1 * C * nab * R * R, 0.f);
    for (int64_t oc = o0; oc < o1; ++oc)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t ab = 0; ab < nab; ++ab) {
          const SubKernel<R>& sk = subs[ab];
          for (int j = 0; j < sk.count; ++j)
            sub[((oc * C + c) * nab + ab) * R * R + sk.tap[j]] =
                flipped ? weight[(c * OC + oc) * KH * KW + KH * KW - 1 - sk.dst[j]]
                        : weight[(oc * C + c) * KH * KW + sk.dst[j]];
        }
  });
  float* U = scratch(Scratch::kU, P * ob_count * C * nab * kTileRows);  // not zeroed: every row is written
  transform_weights<R>(sub.data(), OC, C * nab, U);
  const InputPlanes in{input, C, p.in_h, p.in_w, p.pad_h, p.pad_w};
  const engine::BalancedItems items(T, tiles_per_item<R>(p), 16);  // as in forward()
  const int64_t NT = ceil_div(items.largest(), kTileCols) * kTileCols, npanels = NT / kTileCols;
  const int64_t NTV = ceil_div(NT + halo, 16) * 16 + 16;  // V tiles of an item: its own, the halo, junk lanes
  const int64_t per_block = std::clamp<int64_t>(engine::kMaxBlockK / nab, 1, kMaxBlockC);
  const int64_t kb_count = ceil_div(C, per_block), kc_max = ceil_div(C, kb_count);
  std::vector<int64_t> koff(kc_max * nab);  // row k = (c, a, b) of a channel block: V row c, shifted
  for (int64_t k = 0; k < kc_max * nab; ++k) koff[k] = (k / nab) * NTV + ((k % nab) / nb) * TW + (k % nb);
  at::parallel_for(0, items.count, 1, [&](int64_t begin, int64_t end) {
    float* V = scratch(Scratch::kV, P * kc_max * NTV);
    float* M = scratch(Scratch::kM, P * ob_count * kTileRows * NT + 16);
    std::vector<TileRun> runs, out_runs;
    std::vector<int> windows;
    std::vector<WindowRun> wr;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t0 = items.begin(item), t1 = items.end(item), tv1 = std::min(T, t1 + halo);
      tile_runs(t0, tv1, per_image, TW, TH, TW, runs);     // every grid tile whose V the item reads
      tile_runs(t0, t1, per_image, TW, th, tw, out_runs);  // the item's output tiles
      if (out_runs.empty()) continue;
      make_windows(runs, windows);
      input_runs<R, 2>(runs, in, wr);
      for (int64_t cb = 0; cb < kb_count; ++cb) {
        const int64_t c0 = cb * kc_max, kc = std::min(kc_max, C - c0), xi_stride = kc * NTV;
        for (int64_t c = 0; c < kc; ++c) {  // V[xi][c][NTV]
          for (size_t w = 0; w + 1 < windows.size(); ++w) {
            input_transform<R>(wr.data() + windows[w], windows[w + 1] - windows[w], in.W, (c0 + c) * in.H * in.W,
                               V + c * NTV + runs[windows[w]].t / 16 * 16, xi_stride);
          }
        }
        const int64_t live_panels = std::min(npanels, ceil_div(t1 - t0, kTileCols));
        for (int64_t xi = 0; xi < P; ++xi) {
          for (int64_t ob = 0; ob < ob_count; ++ob) {
            const int mr = static_cast<int>(std::min<int64_t>(kTileRows, OC - ob * kTileRows));
            const float* a = U + ((xi * ob_count + ob) * C * nab + c0 * nab) * kTileRows;
            for (int64_t j = 0; j < live_panels; ++j) {
              const int nv = static_cast<int>(std::min<int64_t>(kTileVectors, ceil_div(t1 - t0 - j * kTileCols, 16)));
              OffsetB bs;
              bs.koff = koff.data();
              TileDest d;
              d.ldc = NT;
              for (int v = 0; v < kTileVectors; ++v) {
                bs.base[v] = V + xi * xi_stride + j * kTileCols + 16 * v;
                d.ptr[v][0] = d.ptr[v][1] =
                    M + (xi * ob_count * kTileRows + ob * kTileRows) * NT + j * kTileCols + 16 * v;
                d.mask[v][0] = v < nv ? __mmask16(0xFFFF) : __mmask16(0);
                d.mask[v][1] = 0;
              }
              run_micro_kernel(mr, nv, kc * nab, a, 1, kTileRows, bs, d, cb == 0 ? Init::kZero : Init::kAccumulate,
                               nullptr);
            }
          }
        }
      }
      store_outputs<R>(M, NT, ob_count * kTileRows * NT, out_runs, bias, relu, out, p);
    }
  });
}

// `flipped_weights`: p is a backward-input's flipped convolution (flipped_conv.h) and `weight` the forward
// convolution's weights, flipped and transposed on the fly.
inline void forward(const float* input, const float* weight, const float* bias, float* out, const Conv2dParams& p,
                    bool relu = false, bool flipped_weights = false) {
  if (tile_kernel(p) == 5) return forward_tiles<5>(input, weight, bias, out, p, relu, flipped_weights);
  if (four_by_four(p)) return forward_tiles<3, 4>(input, weight, bias, out, p, relu, flipped_weights);
  forward_tiles<3>(input, weight, bias, out, p, relu, flipped_weights);
}

// ---- backward-weight -------------------------------------------------------------------------
// grad_U[xi][oc][c] = sum over tiles of grad_M[xi][oc][t] * V[xi][c][t], grad_M = A gY A^T the
// transform of each MxM block of grad_output, then grad_W = G^T grad_U G. The tile sum is the GEMM's
// long reduction (as in the engine's backward-weight). Kernels past 3x3 as in forward_decomposed: the
// tiles run over the larger grid, grad_M is zero on its extra tiles, and sub-kernel (a, b) reduces
// grad_M[t] against V[t + a*TW + b] (the A operand shifted along its row), one grad_U per sub-kernel;
// each kernel tap takes its gradient from the sub-kernel that owns it (SubKernel).

// gMT[xi][t][o] for one 16-tile window x 16 channels: grad_output blocks read in place (channel o of
// run k at runs[k].src + o*plane). The raw pixels are transposed first (per half window
// and row: 16 channels x 16 pixels -> one vector of channels per pixel, 4 transposes per window), then
// each tile is transformed on vectors of channels and stored as is: 4x fewer shuffles than
// transforming per channel and transposing each of the 16 results (that took 1.01-1.06x the time of
// Winograd backward-weight, interleaved A/B on the Intel host). Writes `tiles` rows per xi. 4x4 tiles
// (F(4x4, 3x3)): a quarter window (4 tiles, 16 pixels) per row, four rows.
// Pixels 16h .. 16h+15 of rows 0 .. M-1 of a window's runs (tiles M pixels wide) for `channels` channels
// (channel o of run k at runs[k].src + o*plane; zero past them, outside the runs and past each run's
// rows and width), transposed: px[r][p] holds the 16 channels of pixel 16h + p of row r.
template <int M>
FASTCONV_AVX512 inline void load_grad_output_pixels(const WindowRun* runs, int count, int64_t plane, int64_t Wq,
                                                    int64_t channels, int h, __m512 px[M][16]) {
  for (int r = 0; r < M; ++r)
    for (int o = 0; o < 16; ++o) px[r][o] = _mm512_setzero_ps();
  for (int k = 0; k < count; ++k) {
    // each tile's M pixels
    const uint64_t pm = M == 4 ? _pdep_u64(runs[k].lanes, 0x1111111111111111ull) * 15u
                               : uint64_t(_pdep_u32(runs[k].lanes, 0x55555555u)) * 3u;
    const __mmask16 m = static_cast<__mmask16>(pm >> (16 * h)) & lane_mask(0, runs[k].width - 16 * h);
    if (!m) continue;
    const int rows = runs[k].row_hi;
    for (int64_t o = 0; o < channels; ++o) {
      const float* row = runs[k].src + o * plane + 16 * h;
      for (int r = 0; r < M; ++r)
        if (r < rows) px[r][o] = _mm512_mask_loadu_ps(px[r][o], m, row + r * Wq);
    }
  }
  for (int r = 0; r < M; ++r) engine::transpose16(px[r]);
}

template <int R, int M = 2>
FASTCONV_AVX512 inline void grad_output_transform(const WindowRun* runs, int count, int64_t plane, int64_t Wq,
                                                  int64_t channels, float* gmt, int64_t xi_stride, int64_t ld,
                                                  int64_t tiles) {
  const __m512 zero = _mm512_setzero_ps();
  if constexpr (M == 4) {
    for (int h = 0; h < 4 && 4 * h < tiles; ++h) {  // tiles 4h .. 4h+3: pixels 16h .. 16h+15 of each row
      __m512 px[4][16];
      load_grad_output_pixels<4>(runs, count, plane, Wq, channels, h, px);
      for (int l = 0; l < 4 && 4 * h + l < tiles; ++l) {
        float* out = gmt + (4 * h + l) * ld;
        __m512 col[4][6];  // A gy, column by column
        for (int q = 0; q < 4; ++q)
          grad_points4(px[0][4 * l + q], px[1][4 * l + q], px[2][4 * l + q], px[3][4 * l + q], col[q]);
        for (int i = 0; i < 6; ++i) {  // then (A gy) A^T, row by row
          __m512 v[6];
          grad_points4(col[0][i], col[1][i], col[2][i], col[3][i], v);
          for (int j = 0; j < 6; ++j) _mm512_storeu_ps(out + (i * 6 + j) * xi_stride, v[j]);
        }
      }
    }
    return;
  }
  for (int h = 0; h < 2 && 8 * h < tiles; ++h) {  // tiles 8h .. 8h+7: pixels 16h .. 16h+15 of each row
    __m512 px[2][16];
    load_grad_output_pixels<2>(runs, count, plane, Wq, channels, h, px);
    for (int l = 0; l < 8 && 8 * h + l < tiles; ++l) {
      const __m512 g00 = px[0][2 * l], g01 = px[0][2 * l + 1], g10 = px[1][2 * l], g11 = px[1][2 * l + 1];
      float* out = gmt + (8 * h + l) * ld;
      if constexpr (R == 3 && M == 2) {
        // A gy: rows [g0, g0 + g1, g0 - g1, -g1]; then each row (x, y) -> [x, x + y, x - y, -y]
        const __m512 rows[4][2] = {{g00, g01},
                                   {_mm512_add_ps(g00, g10), _mm512_add_ps(g01, g11)},
                                   {_mm512_sub_ps(g00, g10), _mm512_sub_ps(g01, g11)},
                                   {_mm512_sub_ps(zero, g10), _mm512_sub_ps(zero, g11)}};
        for (int i = 0; i < 4; ++i) {
          const __m512 x = rows[i][0], y = rows[i][1];
          _mm512_storeu_ps(out + (i * 4 + 0) * xi_stride, x);
          _mm512_storeu_ps(out + (i * 4 + 1) * xi_stride, _mm512_add_ps(x, y));
          _mm512_storeu_ps(out + (i * 4 + 2) * xi_stride, _mm512_sub_ps(x, y));
          _mm512_storeu_ps(out + (i * 4 + 3) * xi_stride, _mm512_sub_ps(zero, y));
        }
      } else {
        __m512 c0[6], c1[6];  // A gy, on rows then columns
        grad_points6(g00, g10, c0);
        grad_points6(g01, g11, c1);
        for (int i = 0; i < 6; ++i) {
          __m512 v[6];
          grad_points6(c0[i], c1[i], v);
          for (int j = 0; j < 6; ++j) _mm512_storeu_ps(out + (i * 6 + j) * xi_stride, v[j]);
        }
      }
    }
  }
}

// y = G^T x for a 6-point transform's G (kG5: K = 5, kG43: K = 3).
template <int K>
FASTCONV_AVX512 inline void weight_points6(const float (&G)[6][K], const __m512 x[6], __m512 y[K]) {
  for (int k = 0; k < K; ++k) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < 6; ++i)
      if (G[i][k] != 0.f) acc = _mm512_fmadd_ps(_mm512_set1_ps(G[i][k]), x[i], acc);
    y[k] = acc;
  }
}

// grad_W[:, c] = G^T grad_U G for input channel c and the taps that sub-kernel sk owns (of a kernel of
// KK taps), grad_U summed over `slots` partials [xi][c][ldo] (`part` floats apart) in slot order; 16
// output channels per vector: the rows of every xi are read along the output channels (contiguous)
// (done element by element, this pass took a fifth of AlexNet conv5's backward-weight on an Intel host).
template <int R, int M = 2>
FASTCONV_AVX512 inline void weight_grad_from_slots(const float* parts, int64_t slots, int64_t part, int64_t C,
                                                   int64_t OC, int64_t ldo, int64_t c, const SubKernel<R>& sk,
                                                   int64_t KK, float* grad_weight) {
  constexpr int P = kPoints<R, M>;
  alignas(64) float taps[R * R][16];
  const __m512 half = _mm512_set1_ps(0.5f);
  for (int64_t o0 = 0; o0 < OC; o0 += 16) {
    const int64_t n = std::min<int64_t>(16, OC - o0);
    const __mmask16 m = lane_mask(0, n);
    __m512 u[P];
    for (int xi = 0; xi < P; ++xi) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t s = 0; s < slots; ++s)
        sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(m, parts + s * part + (xi * C + c) * ldo + o0));
      u[xi] = sum;
    }
    if constexpr (R == 3 && M == 2) {
      __m512 t[3][4];  // G^T u
      for (int j = 0; j < 4; ++j) {
        const __m512 a = _mm512_mul_ps(half, _mm512_add_ps(u[4 + j], u[8 + j]));
        t[0][j] = _mm512_add_ps(u[j], a);
        t[1][j] = _mm512_mul_ps(half, _mm512_sub_ps(u[4 + j], u[8 + j]));
        t[2][j] = _mm512_add_ps(a, u[12 + j]);
      }
      for (int i = 0; i < 3; ++i) {  // (G^T u) G
        const __m512 a = _mm512_mul_ps(half, _mm512_add_ps(t[i][1], t[i][2]));
        _mm512_store_ps(taps[i * 3 + 0], _mm512_add_ps(t[i][0], a));
        _mm512_store_ps(taps[i * 3 + 1], _mm512_mul_ps(half, _mm512_sub_ps(t[i][1], t[i][2])));
        _mm512_store_ps(taps[i * 3 + 2], _mm512_add_ps(a, t[i][3]));
      }
    } else {
      __m512 t[R][6];  // G^T u, column by column (kG5 or kG43)
      for (int j = 0; j < 6; ++j) {
        const __m512 col[6] = {u[j], u[6 + j], u[12 + j], u[18 + j], u[24 + j], u[30 + j]};
        __m512 y[R];
        if constexpr (R == 5) {
          weight_points6<5>(kG5, col, y);
        } else {
          weight_points6<3>(kG43, col, y);
        }
        for (int k = 0; k < R; ++k) t[k][j] = y[k];
      }
      for (int k = 0; k < R; ++k) {  // (G^T u) G, row by row
        __m512 y[R];
        if constexpr (R == 5) {
          weight_points6<5>(kG5, t[k], y);
        } else {
          weight_points6<3>(kG43, t[k], y);
        }
        for (int l = 0; l < R; ++l) _mm512_store_ps(taps[k * R + l], y[l]);
      }
    }
    for (int64_t l = 0; l < n; ++l) {
      float* gw = grad_weight + ((o0 + l) * C + c) * KK;
      for (int j = 0; j < sk.count; ++j) gw[sk.dst[j]] = taps[sk.tap[j]][l];
    }
  }
}

// The geometry of backward-weight: the tile grid (TH x TW per image: the output's th x tw tiles plus
// na-1 rows and nb-1 columns for kernels past RxR, see forward_decomposed) and the input and grad_output
// the transforms read in place.
template <int R, int M = 2>
struct WeightGradGrid {
  int64_t C, OC, na, nb, nab, th, tw, TH, TW, per_image, T, halo, OH, OW, ldo;
  InputPlanes in;            // the input, read in place
  const float* grad_output;  // read in place too (the transform's loads are masked to the plane)
  WeightGradGrid(const float* grad_output, const float* input, const Conv2dParams& p)
      : C(p.in_channels),
        OC(p.out_channels),
        na(sub_kernels<R>(p.kernel_h)),
        nb(sub_kernels<R>(p.kernel_w)),
        nab(na * nb),
        th(ceil_div(p.out_h, M)),
        tw(ceil_div(p.out_w, M)),
        TH(th + na - 1),
        TW(tw + nb - 1),
        per_image(TH * TW),
        T(p.batch * per_image),
        halo((na - 1) * TW + (nb - 1)),
        OH(p.out_h),
        OW(p.out_w),
        ldo(ceil_div(OC, 16) * 16),
        in{input, C, p.in_h, p.in_w, p.pad_h, p.pad_w},
        // grad_output had been copied zero-padded to rows M*tw wide: 20-25% of MNIST conv2's
        // backward-weight (interleaved A/B, Intel host, 2 threads: 0.77x the time without it, 0.92x on
        // 128 at 28x28)
        grad_output(grad_output) {}
};

// V[xi][c][t] (channel rows `ntv` apart, xi planes `v_xi` apart) of the grid tiles [t0, t0 + v_len)
// (the products over tiles [t0, t0 + len) read len + halo of them), and grad_M^T[xi][t][o] (rows ldo
// apart, xi planes `m_xi` apart) of the output tiles among [t0, t0 + len), positions counted from t0.
// V is zero from the batch's end up to v_len (grad_M is zero there, but 0 * a stale NaN is not),
// grad_M^T on the grid's extra tiles.
template <int R, int M = 2>
inline void transform_tiles(const WeightGradGrid<R, M>& g, int64_t t0, int64_t len, int64_t v_len, float* V,
                            int64_t ntv, int64_t v_xi, float* GMT, int64_t m_xi, std::vector<TileRun>& runs,
                            std::vector<int>& windows, std::vector<WindowRun>& in_runs) {
  const int64_t tv = std::min(g.T, t0 + v_len) - t0;
  tile_runs(t0, t0 + tv, g.per_image, g.TW, g.TH, g.TW, runs);
  make_windows(runs, windows);
  input_runs<R, M>(runs, g.in, in_runs);
  for (size_t w = 0; w + 1 < windows.size(); ++w) {
    const int64_t t = runs[windows[w]].t / 16 * 16;
    for (int64_t c = 0; c < g.C; ++c) {
      input_transform<R, M>(in_runs.data() + windows[w], windows[w + 1] - windows[w], g.in.W, c * g.in.H * g.in.W,
                            V + c * ntv + t, v_xi);
    }
  }
  if (tv < v_len) {
    for (int64_t xi = 0; xi < kPoints<R, M>; ++xi)
      for (int64_t c = 0; c < g.C; ++c) std::fill(V + xi * v_xi + c * ntv + tv, V + xi * v_xi + c * ntv + v_len, 0.f);
  }
  if (g.nab > 1) {
    for (int64_t xi = 0; xi < kPoints<R, M>; ++xi) std::fill(GMT + xi * m_xi, GMT + xi * m_xi + len * g.ldo, 0.f);
  }
  tile_runs(t0, t0 + len, g.per_image, g.TW, g.th, g.tw, runs);  // the output tiles
  make_windows(runs, windows);
  WindowRun wr[16];
  for (size_t w = 0; w + 1 < windows.size(); ++w) {
    const int64_t t = runs[windows[w]].t / 16 * 16, tiles = std::min<int64_t>(16, len - t);
    for (int64_t o0 = 0; o0 < g.OC; o0 += 16) {  // 16 channels at a time
      const int cnt = grad_output_runs(runs, windows[w], windows[w + 1], g.grad_output + o0 * g.OH * g.OW,
                                       g.OC * g.OH * g.OW, g.OH, g.OW, wr, M);
      grad_output_transform<R, M>(wr, cnt, g.OH * g.OW, g.OW, std::min<int64_t>(16, g.OC - o0), GMT + t * g.ldo + o0,
                                  m_xi, g.ldo, tiles);
    }
  }
}

// acc[ab][xi][c][o] = init + sum over t < len of V[xi][c][t + shift(ab)] * grad_M^T[xi][t][o], for one
// xi, every sub-kernel ab and output channels [o_begin, o_end) (whole tiles of vectors_of_tile).
template <int R, int M = 2>
inline void weight_grad_products(const WeightGradGrid<R, M>& g, int64_t xi, int64_t o_begin, int64_t o_end, int64_t len,
                                 const float* V, int64_t ntv, int64_t v_xi, const float* GMT, int64_t m_xi, float* acc,
                                 Init init) {
  for (int64_t o0 = o_begin, nv = 0; o0 < o_end; o0 += 16 * nv) {
    nv = engine::vectors_of_tile(g.ldo / 16, o0 / 16);
    for (int64_t ab = 0; ab < g.nab; ++ab) {
      const int64_t shift = (ab / g.nb) * g.TW + ab % g.nb;
      for (int64_t c0 = 0; c0 < g.C; c0 += kTileRows) {
        TileDest d;
        d.ldc = g.ldo;
        for (int v = 0; v < kTileVectors; ++v) {
          d.ptr[v][0] = d.ptr[v][1] = acc + ((ab * kPoints<R, M> + xi) * g.C + c0) * g.ldo + o0 + 16 * v;
          d.mask[v][0] = v < nv ? __mmask16(0xFFFF) : __mmask16(0);
          d.mask[v][1] = 0;
        }
        run_micro_kernel(static_cast<int>(std::min<int64_t>(kTileRows, g.C - c0)), static_cast<int>(nv), len,
                         V + xi * v_xi + c0 * ntv + shift, ntv, 1, PanelB{GMT + xi * m_xi + o0, g.ldo}, d, init,
                         nullptr);
      }
    }
  }
}

// grad_W from grad_U^T [ab][xi][c][ldo] (`slots` partials `part` floats apart, summed in order): G^T
// grad_U G per sub-kernel, each kernel tap from the sub-kernel that owns it.
template <int R, int M = 2>
inline void write_weight_grad(const WeightGradGrid<R, M>& g, const float* parts, int64_t slots, int64_t part,
                              const Conv2dParams& p, float* grad_weight) {
  std::vector<SubKernel<R>> subs;
  for (int64_t ab = 0; ab < g.nab; ++ab) subs.emplace_back(p.kernel_h, p.kernel_w, ab / g.nb, ab % g.nb);
  at::parallel_for(0, g.C, engine::grain_for(kPoints<R, M> * g.OC * slots * g.nab), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t ab = 0; ab < g.nab; ++ab) {
        weight_grad_from_slots<R, M>(parts + ab * kPoints<R, M> * g.C * g.ldo, slots, part, g.C, g.OC, g.ldo, c,
                                     subs[ab], p.kernel_h * p.kernel_w, grad_weight);
      }
    }
  });
}

constexpr int64_t kWholeTilesBytes = int64_t(16) << 20;  // backward-weight's V and grad_M^T of all tiles

// Backward-weight over all tiles at once, in at most two chunks of kWholeTilesBytes: every tile's V and
// grad_M^T are transformed first (the threads split the tiles), then each task (xi, block of output
// channels) reduces over all tiles into its own rows of grad_U, which stay in L2: no per-thread partials
// to sum, and the bits do not depend on the thread count. Measured (2 threads, Intel host, interleaved
// A/B against the per-slot form below): 0.82-0.89x its time on AlexNet conv3-4 and ResNet 256 at 14x14
// at batch 8, 0.79x on VGG's 512 at 14x14, 0.80-0.86x at batch 1-2; 1.1x with four chunks (AlexNet conv3
// at batch 32), 1.02-1.23x with 128 channels or fewer (ResNet 128 at 28x28, batch 8: 1.08x). Kernels
// past 3x3 (four products per transform point) gain at any width: AlexNet conv2 at batch 8 0.94x,
// 5x5 128->128 at 28x28 0.90x. F(2x2, 5x5) (36 points: its grad_M^T of a 48-tile item alone outgrows
// L2 beside the per-slot grad_U) gains in any number of chunks: AlexNet conv2 at batch 2/8/32 0.84x/
// 0.92x/0.92x, 5x5 128->128 at 28x28 0.93x (four chunks at batch 8 and up). F(4x4, 3x3) (36 points
// too) always takes it as well.
template <int R, int M = 2>
inline bool whole_tiles_wanted(const WeightGradGrid<R, M>& g) {
  const int64_t per_tile = kPoints<R, M> * (g.C + g.ldo) * 4;
  if (R == 5 || M == 4) return true;  // 36 points: in any number of chunks (see above)
  return (g.nab > 1 || (g.C >= 192 && g.OC >= 192)) && g.T * per_tile <= 2 * kWholeTilesBytes;
}

template <int R, int M = 2>
inline void backward_weight_whole_tiles(WeightGradGrid<R, M>& g, const Conv2dParams& p, float* grad_weight) {
  constexpr int P = kPoints<R, M>;
  const int64_t chunk = std::min(g.T, std::max<int64_t>(16, kWholeTilesBytes / (P * (g.C + g.ldo) * 4) / 16 * 16));
  const int64_t NT = ceil_div(chunk, 16) * 16, m_xi = NT * g.ldo + 16;
  const int64_t NTV = ceil_div(chunk + g.halo, 16) * 16 + 16, v_xi = g.C * NTV + 16;  // (+16: junk lanes)
  float* V = scratch(Scratch::kV, P * v_xi);
  float* GMT = scratch(Scratch::kM, P * m_xi);
  float* acc = scratch(Scratch::kU, g.nab * P * g.C * g.ldo);  // grad_U^T[ab][xi][c][o]
  // tasks: (xi, a group of output-channel tiles), at least four per thread
  std::vector<int64_t> o_tiles;  // tile starts, then ldo
  for (int64_t o0 = 0, nv = 0; o0 < g.ldo; o0 += 16 * nv) {
    nv = engine::vectors_of_tile(g.ldo / 16, o0 / 16);
    o_tiles.push_back(o0);
  }
  const int64_t n_ot = static_cast<int64_t>(o_tiles.size());
  o_tiles.push_back(g.ldo);
  const int64_t o_groups = std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), P), 1, n_ot);
  for (int64_t c0 = 0; c0 < g.T; c0 += chunk) {
    const int64_t len = std::min(chunk, g.T - c0);
    const engine::BalancedItems pieces(len, 64, 16);
    at::parallel_for(0, pieces.count, 1, [&](int64_t b0, int64_t b1) {
      std::vector<TileRun> runs;
      std::vector<int> windows;
      std::vector<WindowRun> in_runs;
      for (int64_t item = b0; item < b1; ++item) {
        const int64_t s0 = pieces.begin(item), n = pieces.end(item) - s0;  // the last piece adds the halo
        transform_tiles(g, c0 + s0, n, item + 1 == pieces.count ? n + g.halo : n, V + s0, NTV, v_xi, GMT + s0 * g.ldo,
                        m_xi, runs, windows, in_runs);
      }
    });
    at::parallel_for(0, P * o_groups, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t task = b0; task < b1; ++task) {
        const int64_t xi = task / o_groups, og = task % o_groups;
        weight_grad_products(g, xi, o_tiles[og * n_ot / o_groups], o_tiles[(og + 1) * n_ot / o_groups], len, V, NTV,
                             v_xi, GMT, m_xi, acc, c0 == 0 ? Init::kZero : Init::kAccumulate);
      }
    });
  }
  write_weight_grad(g, acc, 1, 0, p, grad_weight);
}

// Backward-weight, per slot of tile items: each thread reduces its items into its own partial grad_U
// (P x C x OC floats per sub-kernel), summed in slot order at the end.
template <int R, int M = 2>
inline void backward_weight_tiles(const float* grad_output, const float* input, float* grad_weight,
                                  const Conv2dParams& p) {
  constexpr int P = kPoints<R, M>;
  WeightGradGrid<R, M> g(grad_output, input, p);
  if (whole_tiles_wanted(g)) return backward_weight_whole_tiles(g, p, grad_weight);
  const engine::BalancedItems tile_items(g.T, tiles_per_item<R, M>(p), 16);  // as in forward()
  const int64_t NT = ceil_div(tile_items.largest(), kTileCols) * kTileCols, items = tile_items.count;
  const int64_t NTV = ceil_div(NT + g.halo, 16) * 16 + 16;  // V tiles of an item: its own, the halo, junk lanes
  const int64_t slots = std::min<int64_t>(at::get_num_threads(), items);
  const int64_t part = g.nab * P * g.C * g.ldo;  // grad_U^T per slot: [a*nb + b][xi][c][ldo]
  // not zeroed: the first item of each slot writes its whole partial (Init::kZero)
  std::unique_ptr<float[]> parts(new float[slots * part]);
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    const int64_t v_xi = g.C * NTV + 16, m_xi = NT * g.ldo + 16;  // V[xi][c][NTV] (+16: junk lanes), [xi][t][ldo]
    float* V = scratch(Scratch::kV, P * v_xi);
    float* GMT = scratch(Scratch::kM, P * m_xi + 16);
    std::vector<TileRun> runs;
    std::vector<int> windows;
    std::vector<WindowRun> in_runs;
    for (int64_t s = s0; s < s1; ++s) {
      for (int64_t item = s * items / slots; item < (s + 1) * items / slots; ++item) {
        const int64_t t0 = tile_items.begin(item), len = tile_items.end(item) - t0;
        transform_tiles(g, t0, len, len + g.halo, V, NTV, v_xi, GMT, m_xi, runs, windows, in_runs);
        for (int64_t xi = 0; xi < P; ++xi) {
          weight_grad_products(g, xi, 0, g.ldo, len, V, NTV, v_xi, GMT, m_xi, parts.get() + s * part,
                               item == s * items / slots ? Init::kZero : Init::kAccumulate);
        }
      }
    }
  });
  write_weight_grad(g, parts.get(), slots, part, p, grad_weight);
}

inline void backward_weight(const float* grad_output, const float* input, float* grad_weight, const Conv2dParams& p) {
  if (tile_kernel(p) == 5) return backward_weight_tiles<5>(grad_output, input, grad_weight, p);
  if (weight_grad_four_by_four(p)) return backward_weight_tiles<3, 4>(grad_output, input, grad_weight, p);
  backward_weight_tiles<3>(grad_output, input, grad_weight, p);
}

}  // namespace winograd
}  // namespace cpu
}  // namespace fastconv
#endif  // FASTCONV_HAVE_AVX512_KERNELS
