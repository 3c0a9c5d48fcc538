// Grouped convolutions with 16 or more output channels per group (ResNeXt's 16-64, RegNet's group
// widths) on AVX-512: a direct kernel with a group's output channels in the vector lanes. Groups of 8 or 4
// output channels share the lanes, 2 or 4 groups a vector (their input copied interleaved, each step
// broadcasting the groups' floats of a pixel together: forward_groups_per_vector), and backward-weight of
// groups of at most 16 channels puts input channels, of up to 8 groups, in the lanes.
//
// The engine's GEMM (conv2d_avx512.h) puts pixels in the lanes and 8 output channels in the rows of its
// tile. Per group that is a small GEMM (ResNeXt-50's last stage: 32 output channels, 288 taps, 49 pixels
// an image), whose per-tile work (packing the columns, or the padded planes' partial vectors: 49
// pixels of a 7x7 plane fill 64 lanes) weighs as much as its FMAs. Here a tile is up to 48 output
// channels (1-3 vectors) x a few output pixels of one or two rows, the accumulators stay in registers
// over the group's taps (or k-blocks of them), and each step loads 1-3 weight vectors and broadcasts one
// input float per pixel, straight from a zero-padded copy of the planes (no im2col):
//
//   per (image, group, block of <= 48 output channels), per tile of R rows x P pixels:
//     for k = (c, kh, kw) in the group's taps:  acc[px][v] += input[c][oh*SH + kh*DH][ow*SW + kw*DW] * w[k][v]
//     then 16x16 register transposes turn acc[pixel][channel] into rows of NCHW planes.
//
// A row of OW pixels is cut into near-equal segments of P <= 16/14/9 pixels (for 1/2/3 vectors:
// at most 28 accumulators); the last segment of a row is shifted back onto the row, recomputing a few
// pixels (same values, same order), and an odd last row of pairs runs the one-row kernel.
// The weights are packed once per call, [g][block][k][lanes], flipped and transposed for a stride-1
// backward-input, which is this forward over grad_output (flipped_conv.h); a strided one runs it once
// per phase of grad_input. Backward-weight has kernels of its own at the end of this file.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "conv_params.h"
#include "cpu/conv2d_avx512.h"
#include "cpu/flipped_conv.h"
#include "cpu/gemm.h"
#include "cpu/phase_backward_input.h"

#if FASTCONV_HAVE_AVX512_KERNELS
namespace fastconv {
namespace cpu {
namespace engine {

constexpr int kGroupedMaxVectors = 3;  // output channels per block: up to 48 (grouped_block_channels)
// Weights of a block's k-block, in L1 with the tile's inputs: the taps of a block whose weights are more
// (32-channel blocks past 21 input channels per group) run in k-blocks, each tile's accumulators kept in
// memory in between (measured, 2 threads, Intel host, batch 8, groups of 48-128 channels: 0.95-0.99x
// the time of one pass over all taps)
constexpr int64_t kGroupedWeightBlockBytes = 24 * 1024;

// Pixels per tile for NV vectors of output channels: NV*P accumulators + NV weight vectors + one
// broadcast within the 32 zmm registers.
constexpr int grouped_max_pixels(int nv) { return nv == 1 ? 16 : nv == 2 ? 14 : 9; }

// Groups sharing a vector in the forward kernel (grouped_tile's GI): 2 groups of 8 or 4 of 4 output
// channels, whose vectors would otherwise be half or a quarter full.
inline int64_t forward_groups_per_vector(const Conv2dParams& p) {
  const int64_t OCg = p.out_channels_per_group();
  return p.groups > 1 && (OCg == 8 || OCg == 4) ? 16 / OCg : 1;
}

// Whether a grouped convolution runs on the channel-lane kernel (FASTCONV_GROUPED_DIRECT=0/1 forces
// it off/on where it applies: tests and benchmarks).
inline bool use_grouped_direct(const Conv2dParams& p, bool weight_grad = false) {
  if (p.stride_w > 2) return false;
  if (padded_input_bytes(p) > kMaxPaddedCopyBytes) return false;
  if (const int f = forced("FASTCONV_GROUPED_DIRECT", '0', '1'); f >= 0) return f == 1;
  // From 16 output channels per group, where the vectors of channels are mostly full: past 32 channels a
  // group, a last vector under 90% full leaves the GEMM ahead (measured, 2 threads, Intel host, batch 8,
  // against the engine's GEMM: 32 groups of 32 at 7x7 0.70x the time, 16 at 14x14 0.85x, groups of 24,
  // 48, 64, 96, 128 channels 0.83-0.96x; groups of 40 and 56 1.00-1.13x; one group of 64 (MNIST conv2)
  // 1.06x)
  // 1x1 layers stay on the GEMM, whose panels of a group's few input channels pack cheaply (ShuffleNet's
  // 3 groups of 80 at 28x28, batch 8: 0.90x the time forward, 0.85x backward-input)
  // Groups of 8-15 (half-empty vectors, RegNet's 8 a group) only where the GEMM's per-group overhead
  // weighs most: the strided forward up to 16x16 outputs (its columns packed; stride 1 packs nothing)
  // and backward-weight on planes of at most 64 pixels (now only past 16 input channels a group, see
  // below). Measured, 2 threads, Intel host, batch 8, 8
  // channels a group, against the GEMM: forward 3x3/2 from 14x14 0.63x the time, from 28x28 0.90x,
  // from 56x56 0.94-1.08x, from 112x112 1.07x; stride 1 at 14x14-56x56 1.13-1.22x; backward-weight at
  // 7x7 0.58-0.67x, 3x3/2 from 14x14 0.83x, larger planes 0.91-1.85x.
  const int64_t OCg = p.out_channels_per_group(), lanes = ceil_div(OCg, 16) * 16;
  // Backward-weight of groups of at most 16 input and output channels runs on the channel-lane kernel
  // (grouped_backward_weight), several groups to a vector where they fit, at any plane size. Measured, 2
  // threads, Zen 4, batch 8, against the GEMM, the two alternating in one process: ResNeXt's 32 groups of
  // 8 at 3x3/2 from 56x56 0.39x the time, at 28x28 0.62x, 14x14 0.67x, 7x7 0.45x; 32 groups of 4 at
  // 56x56 0.75x; 64 groups of 16 at 7x7 0.53x.
  if (weight_grad && OCg <= 16 && p.in_channels_per_group() <= 16) return p.groups > 1 && p.kernel_h * p.kernel_w > 1;
  const bool strided = p.stride_h > 1 || p.stride_w > 1;
  // Forward (and stride-1 backward-input) where 2 groups of 8 or 4 of 4 output channels share the vectors
  // (forward_groups_per_vector). Measured, 2 threads, Zen 4, batch 8, against the GEMM, the two
  // alternating in one process: 4 a group (ResNeXt's first stage) at 56x56 0.90x the time forward, 0.88x
  // backward-input, at 28x28 0.89x; 8 a group at 3x3/2 from 56x56 0.74x, at 56x56 0.76x (0.74x
  // backward-input), at 7x7 0.81-0.87x (both passes; RegNet's 55 groups and ResNeXt's 32); but at 14x14
  // 1.01-1.03x and 28x28 0.93x forward, 1.05x backward-input, where the GEMM's 8-row tiles are full.
  if (!weight_grad && forward_groups_per_vector(p) > 1 && p.kernel_h * p.kernel_w > 1 &&
      (OCg == 4 || strided || p.out_plane() <= 64 || p.out_plane() >= 2048))
    return true;
  const bool wide = OCg >= 16 && (OCg < 32 || OCg * 10 >= lanes * 9);
  const bool small = OCg >= 8 && OCg < 16 && (weight_grad ? p.out_plane() <= 64 : strided && p.out_plane() <= 256);
  return p.groups > 1 && p.kernel_h * p.kernel_w > 1 && (wide || small);
}

// Output channels per block: a group of up to 48 in one (1-3 vectors), past that blocks of 32. Two
// vectors a tile take 14 pixels (two rows of a 7x7 plane, a row of 14, halves of 28 and quarters of 56),
// where four take 6 (rows of 7 and 14 in segments of 4 and 5: 16-20 accumulators); each input float
// broadcast then feeds 2 FMAs instead of 4, which the load ports still keep up with (measured, 2
// threads, Intel host, batch 8, blocks of 32 against 64: groups of 64 at 14x14 0.87x the time, of 96
// and 128 at 7x7 0.85x, ResNeXt-101's 64 at 7x7 0.84x).
inline int64_t grouped_block_channels(int64_t OCg) { return OCg <= 48 ? ceil_div(OCg, 16) * 16 : 32; }

// GI floats from p in every GI lanes (lane l: p[l % GI]): one input or grad_output float of each of the
// GI groups that share a vector (see grouped_tile and grouped_weight_grad_channel_lanes).
template <int GI>
FASTCONV_AVX512 inline __m512 broadcast_lanes(const float* p) {
  if constexpr (GI == 1) {
    return _mm512_set1_ps(*p);
  } else if constexpr (GI == 2) {
    double d;
    std::memcpy(&d, p, sizeof d);
    return _mm512_castpd_ps(_mm512_set1_pd(d));
  } else if constexpr (GI == 4) {
    return _mm512_maskz_broadcast_f32x4(__mmask16(0xFFFF), _mm_loadu_ps(p));  // (unmasked: gcc warns of its undefined)
  } else {
    return _mm512_castpd_ps(_mm512_maskz_broadcast_f64x4(__mmask8(0xFF), _mm256_castps_pd(_mm256_loadu_ps(p))));
  }
}

// Floats of one group's packed weights: K rows of ceil(OCg/16) vectors, block after block.
inline int64_t grouped_weight_floats(int64_t OCg, int64_t K) { return ceil_div(OCg, 16) * 16 * K; }

// The weights of p's groups, packed[g][k][o] in blocks of grouped_block_channels (bc): block b of group g
// at g*grouped_weight_floats + b*bc*K, row k of it nv_b*16 floats (nv_b = the block's vectors), lanes past
// OCg zero. With `fwd`, p is a convolution over fwd's grad_output (output channels: fwd's input channels)
// whose kernel taps are fwd's taps taps[j]: row k = (o, j) of output channel c is fwd's w[g*OCg + o][c][taps[j]]
// (a stride-1 backward-input: every tap, reversed; one phase of a strided one: its taps, reversed).
// With gi > 1 (forward_groups_per_vector), gi groups of 16/gi output channels share each vector: set s
// at s*16*K, row k of it lane o*gi + i = output channel o of group s*gi + i (zero past G).
inline const float* pack_grouped_weights(const float* weight, const Conv2dParams& p, const Conv2dParams* fwd,
                                         const std::vector<int64_t>& taps, AlignedBuffer& buf, int64_t gi = 1) {
  const int64_t G = p.groups, OCg = p.out_channels_per_group(), K = p.col_rows_per_group();
  if (gi > 1) {  // lane by lane: a set's block zeroed, then each present group's channels written in
    const int64_t sets = ceil_div(G, gi), KK = fwd ? fwd->kernel_h * fwd->kernel_w : 0;
    const int64_t T = static_cast<int64_t>(taps.size()), OCf = fwd ? fwd->out_channels_per_group() : 0;
    float* packed = buf.get(sets * 16 * K);
    at::parallel_for(0, sets, grain_for(16 * K), [&](int64_t s0, int64_t s1) {
      for (int64_t set = s0; set < s1; ++set) {
        float* dst = packed + set * K * 16;
        std::fill(dst, dst + K * 16, 0.f);
        for (int64_t i = 0; i < std::min(gi, G - set * gi); ++i) {
          const int64_t g = set * gi + i;
          for (int64_t o = 0; o < std::min(OCg, 16 / gi); ++o) {
            float* lane = dst + o * gi + i;
            if (!fwd) {
              const float* src = weight + (g * OCg + o) * K;
              for (int64_t k = 0; k < K; ++k) lane[k * 16] = src[k];
              continue;
            }
            for (int64_t of = 0; of < OCf; ++of) {  // row (of, j): fwd's w[g*OCf + of][o][taps[j]]
              const float* src = weight + ((g * OCf + of) * OCg + o) * KK;
              for (int64_t j = 0; j < T; ++j) lane[(of * T + j) * 16] = src[taps[j]];
            }
          }
        }
      }
    });
    return packed;
  }
  const int64_t per_group = grouped_weight_floats(OCg, K), chunks = ceil_div(OCg, 16), bc = grouped_block_channels(OCg);
  float* packed = buf.get(G * per_group);
  std::vector<int64_t> row_of_tap;  // fwd's tap -> j (-1: not one of p's)
  if (fwd) {
    row_of_tap.assign(fwd->kernel_h * fwd->kernel_w, -1);
    for (size_t j = 0; j < taps.size(); ++j) row_of_tap[taps[j]] = static_cast<int64_t>(j);
  }
  at::parallel_for(0, G * chunks, grain_for(16 * K), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / chunks, o0 = (t % chunks) * 16, rows = std::min<int64_t>(16, OCg - o0);
      const int64_t b = o0 / bc, ld = std::min<int64_t>(bc, ceil_div(OCg - b * bc, 16) * 16);
      float* dst = packed + g * per_group + b * bc * K + (o0 - b * bc);
      if (!fwd) {
        columns_to_lanes(weight + (g * OCg + o0) * K, K, rows, K, [&](int64_t k) { return dst + k * ld; });
        continue;
      }
      // lanes: fwd's input channels o0.. of group g; rows: (fwd output channel o, tap j)
      const int64_t KK = fwd->kernel_h * fwd->kernel_w, Cf = fwd->in_channels_per_group(), T = taps.size();
      for (int64_t o = 0; o < fwd->out_channels_per_group(); ++o) {
        const float* src = weight + ((g * fwd->out_channels_per_group() + o) * Cf + o0) * KK;
        columns_to_lanes(src, KK, rows, KK, [&](int64_t tap) {
          return row_of_tap[tap] < 0 ? nullptr : dst + (o * T + row_of_tap[tap]) * ld;
        });
      }
    }
  });
  return packed;
}

// One tile: R rows x P pixels (SW apart, row starts row_stride apart in the padded input) x NV vectors
// of output channels, over the K taps at in + koff[k]; stored to `channels` NCHW planes at out
// (out_plane floats apart, rows out_w apart), with bias and ReLU. For k-blocks: acc_in, the partial sums
// of the blocks before (instead of the bias); acc_out, where this block's partial sums go instead of
// the planes (every block but the last).
// With GI > 1 (NV = 1), GI groups of 16/GI output channels share the vector (pack_grouped_weights' gi):
// the input is interleaved ([c][row][column][GI], pad_planes_interleaved), each step broadcasts the GI
// groups' floats of a pixel, and lane l is channel (l % GI)*(16/GI) + l/GI of the block's planes (the
// set's groups' channels in NCHW order; `channels` of them there).
template <int GI>
constexpr int64_t channel_of_lane(int64_t l) {
  return GI == 1 ? l : (l % GI) * (16 / GI) + l / GI;
}

template <int NV, int R, int P, int SW, int GI = 1, bool NHWC = false, int PS = 0>
FASTCONV_AVX512 void grouped_tile(const float* in, int64_t row_stride, const int64_t* koff, int64_t K, const float* w,
                                  const float* bias, bool relu, float* out, int64_t out_w, int64_t out_plane,
                                  int64_t channels, const float* acc_in, float* acc_out, bool stream) {
  static_assert(GI == 1 || NV == 1, "groups share one vector");
  constexpr int PX = R * P;
  __m512 acc[PX][NV];
  for (int v = 0; v < NV; ++v) {
    __m512 init = _mm512_setzero_ps();
    if (bias && GI == 1) {
      init = _mm512_maskz_loadu_ps(lane_mask(0, channels - 16 * v), bias + 16 * v);
    } else if (bias) {
      alignas(64) float b[16];
      for (int64_t l = 0; l < 16; ++l) b[l] = channel_of_lane<GI>(l) < channels ? bias[channel_of_lane<GI>(l)] : 0.f;
      init = _mm512_load_ps(b);
    }
    for (int px = 0; px < PX; ++px) acc[px][v] = acc_in ? _mm512_load_ps(acc_in + (px * NV + v) * 16) : init;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* q = in + koff[k];
    const float* wk = w + k * (NV * 16);
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_load_ps(wk + 16 * v);
    for (int r = 0; r < R; ++r) {
      const float* qr = in_register(q + r * row_stride);  // each pixel's broadcast one uop on Intel cores
      for (int i = 0; i < P; ++i) {
        const __m512 x = broadcast_lanes<GI>(qr + i * SW * (PS > 0 ? PS : GI));
        for (int v = 0; v < NV; ++v) acc[r * P + i][v] = _mm512_fmadd_ps(x, wv[v], acc[r * P + i][v]);
      }
    }
  }
  if (acc_out) {  // a partial sum over some of the taps, kept as it is for the next ones
    for (int px = 0; px < PX; ++px)
      for (int v = 0; v < NV; ++v) _mm512_store_ps(acc_out + (px * NV + v) * 16, acc[px][v]);
    return;
  }
  if constexpr (NHWC) {  // each pixel's channels are consecutive: its vectors stored as they are
    // (groups sharing the vector: lane l holds channel channel_of_lane(l), permuted into lane order)
    alignas(64) int32_t order[16];
    for (int j = 0; j < 16; ++j) order[j] = (j % (16 / GI)) * GI + j / (16 / GI);
    const __m512i perm = _mm512_load_si512(order);
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < P; ++i) {
        float* o = out + (r * out_w + i) * out_plane;
        for (int v = 0; v < NV; ++v) {
          __m512 y = relu ? _mm512_max_ps(_mm512_setzero_ps(), acc[r * P + i][v]) : acc[r * P + i][v];
          if (GI > 1) y = _mm512_permutexvar_ps(perm, y);
          store_vector(o + 16 * v, lane_mask(0, channels - 16 * v), y, stream);
        }
      }
    }
    return;
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t lanes = std::min<int64_t>(16, channels - 16 * v);
    for (int px0 = 0; px0 < PX; px0 += 16) {
      __m512 t[16];
      for (int j = 0; j < 16; ++j) {
        t[j] = px0 + j < PX ? acc[px0 + j][v] : _mm512_setzero_ps();
        if (relu) t[j] = _mm512_max_ps(_mm512_setzero_ps(), t[j]);  // NaN (the second operand) stays NaN
      }
      transpose16(t);  // t[l]: channel 16v + l over pixels px0..px0+15
      for (int r = 0; r < R; ++r) {
        const int a = std::max(r * P, px0), b = std::min(r * P + P, std::min(px0 + 16, PX));
        if (a >= b) continue;
        const __mmask16 m = lane_mask(a - px0, b - px0);
        float* row = out + 16 * v * out_plane + r * out_w + (px0 - r * P);  // lane j: column px0 + j - rP
        if (GI == 1) {
          for (int64_t l = 0; l < lanes; ++l) _mm512_mask_storeu_ps(row + l * out_plane, m, t[l]);
        } else {
          for (int64_t l = 0; l < 16; ++l) {
            if (channel_of_lane<GI>(l) < channels)
              _mm512_mask_storeu_ps(row + channel_of_lane<GI>(l) * out_plane, m, t[l]);
          }
        }
      }
    }
  }
}

using GroupedTileFn = void (*)(const float*, int64_t, const int64_t*, int64_t, const float*, const float*, bool, float*,
                               int64_t, int64_t, int64_t, const float*, float*, bool);

template <int NV, int R, int SW, int GI, bool NHWC, int PS, int... Ps>
constexpr std::array<GroupedTileFn, sizeof...(Ps)> grouped_tiles(std::integer_sequence<int, Ps...>) {
  return {&grouped_tile<NV, R, Ps + 1, SW, GI, NHWC, PS>...};
}

// The kernel for nv vectors, r rows of p pixels (p <= grouped_max_pixels(nv) / r, r <= 2), stride sw <= 2,
// GI groups a vector.
template <int NV, int SW, int GI, bool NHWC, int PS>
GroupedTileFn grouped_tile_for(int r, int p) {
  constexpr int Pm = grouped_max_pixels(NV);
  static constexpr auto one = grouped_tiles<NV, 1, SW, GI, NHWC, PS>(std::make_integer_sequence<int, Pm>());
  static constexpr auto two = grouped_tiles<NV, 2, SW, GI, NHWC, PS>(std::make_integer_sequence<int, Pm / 2>());
  return r == 1 ? one[p - 1] : two[p - 1];
}

template <int SW, int GI, bool NHWC, int PS>
GroupedTileFn grouped_tile_for(int nv, int r, int p) {
  if constexpr (GI > 1) {
    return grouped_tile_for<1, SW, GI, NHWC, PS>(r, p);
  } else {
    switch (nv) {
      case 1:
        return grouped_tile_for<1, SW, 1, NHWC, PS>(r, p);
      case 2:
        return grouped_tile_for<2, SW, 1, NHWC, PS>(r, p);
      default:
        return grouped_tile_for<3, SW, 1, NHWC, PS>(r, p);
    }
  }
}

// nhwc: the tiles store NHWC pixels rather than NCHW planes; ps > 0: they read pixel-major padded copies,
// a pixel's floats ps apart (grouped_pixel_stride), rather than planes.
template <int SW>
GroupedTileFn grouped_tile_for(int nv, int r, int p, int64_t gi, bool nhwc, int64_t ps) {
  if (ps == 32) return grouped_tile_for<SW, 1, true, 32>(nv, r, p);
  if (ps == 16) {
    return gi == 2   ? grouped_tile_for<SW, 2, true, 16>(nv, r, p)
           : gi == 4 ? grouped_tile_for<SW, 4, true, 16>(nv, r, p)
                     : grouped_tile_for<SW, 1, true, 16>(nv, r, p);
  }
  if (gi == 2) return nhwc ? grouped_tile_for<SW, 2, true, 0>(nv, r, p) : grouped_tile_for<SW, 2, false, 0>(nv, r, p);
  if (gi == 4) return nhwc ? grouped_tile_for<SW, 4, true, 0>(nv, r, p) : grouped_tile_for<SW, 4, false, 0>(nv, r, p);
  return nhwc ? grouped_tile_for<SW, 1, true, 0>(nv, r, p) : grouped_tile_for<SW, 1, false, 0>(nv, r, p);
}

// Zero-padded copies of `planes` H x W planes into Hp x Wp planes (input at row top, column left; H + top
// <= Hp, W + left <= Wp), written front to back with whole-vector stores: dst needs 16 floats of slack.
// (copy_padded's masked row stores and per-row calls took 4x a plain copy's time on 7x7 planes.)
FASTCONV_AVX512 inline void pad_planes(const float* src, int64_t planes, int64_t H, int64_t W, float* dst, int64_t Hp,
                                       int64_t Wp, int64_t top, int64_t left) {
  const __m512 zero = _mm512_setzero_ps();
  const int64_t plane = Hp * Wp, chunks = ceil_div(W + left, 16);
  for (int64_t c = 0; c < planes; ++c) {
    float* d = dst + c * plane;
    const float* s = src + c * H * W;
    for (int64_t i = 0; i < top * Wp; i += 16) _mm512_storeu_ps(d + i, zero);
    for (int64_t h = 0; h < H; ++h) {
      float* row = d + (top + h) * Wp;
      for (int64_t j = 0; j < chunks; ++j) {  // lanes [left, left + W) of the row's chunks hold the input row
        const __mmask16 m = lane_mask(left - 16 * j, left + W - 16 * j);
        _mm512_storeu_ps(row + 16 * j, _mm512_maskz_loadu_ps(m, s + h * W + 16 * j - left));
      }
      for (int64_t i = 16 * chunks; i < Wp; i += 16) _mm512_storeu_ps(row + i, zero);
    }
    for (int64_t i = (top + H) * Wp; i < plane; i += 16) _mm512_storeu_ps(d + i, zero);
  }
}

// How tiles cover an out_h x out_w plane for nv vectors of channels: rows of `segments` segments of p
// pixels, or pairs of rows where a row is at most half a tile (an odd last row on its own: `one`, the
// one-row kernel).
struct GroupedShape {
  GroupedTileFn fn, one;
  int64_t rows, p, segments, row_tiles;
};

inline GroupedShape grouped_shape(int nv, int64_t out_h, int64_t out_w, int64_t stride_w, int64_t gi = 1,
                                  bool nhwc = false, int64_t ps = 0) {
  const int pm = grouped_max_pixels(nv);
  GroupedShape s;
  s.segments = ceil_div(out_w, pm);
  s.p = ceil_div(out_w, s.segments);
  s.rows = 2 * s.p <= pm && out_h >= 2 ? 2 : 1;
  s.row_tiles = ceil_div(out_h, s.rows);
  const auto pick = [&](int r) {
    return stride_w == 1 ? grouped_tile_for<1>(nv, r, int(s.p), gi, nhwc, ps)
                         : grouped_tile_for<2>(nv, r, int(s.p), gi, nhwc, ps);
  };
  s.fn = pick(int(s.rows));
  s.one = pick(1);
  return s;
}

// Row tiles [t0, t1) of one block of `channels` output channels over the taps koff[0, K) (weights w):
// output pixel (oh, ow) reads the input at img + oh*row_stride + ow*stride_w (+ koff[k]); out: the block's
// first plane (out_w x out_h planes, out_plane floats apart; NHWC tiles: the block's first channel of pixel
// (0, 0), pixels out_plane floats apart). With `partial` (a k-block of the taps), tile i's accumulators
// start from partial[i] unless `first` and are kept there unless `last`.
inline void grouped_row_tiles(const GroupedShape& s, int64_t t0, int64_t t1, const float* img, int64_t row_stride,
                              int64_t stride_w, const int64_t* koff, int64_t K, const float* w, const float* bias,
                              bool relu, float* out, int64_t out_h, int64_t out_w, int64_t out_plane, int64_t channels,
                              float* partial = nullptr, bool first = true, bool last = true, bool nhwc = false,
                              bool stream = false) {
  const int64_t tile_floats = s.rows * s.p * ceil_div(channels, 16) * 16;
  for (int64_t rt = t0; rt < t1; ++rt) {
    const int64_t oh = rt * s.rows;
    const GroupedTileFn fn = oh + s.rows <= out_h ? s.fn : s.one;
    for (int64_t seg = 0; seg < s.segments; ++seg) {
      const int64_t ow = std::min(seg * s.p, out_w - s.p);  // the last segment shifted back onto the row
      float* acc = partial ? partial + ((rt - t0) * s.segments + seg) * tile_floats : nullptr;
      fn(img + oh * row_stride + ow * stride_w, row_stride, koff, K, w, bias, relu,
         out + (oh * out_w + ow) * (nhwc ? out_plane : 1), out_w, out_plane, channels, first ? nullptr : acc,
         last ? nullptr : acc, stream);
    }
  }
}

// pad_planes over many planes on every thread: runs of planes, each run's last planes (those whose
// vectors could run past the run: up to 15 floats past a plane's end) through copy_padded (exact stores),
// so that no vector reaches a plane another thread writes.
inline void pad_planes_parallel(const float* src, int64_t planes, int64_t H, int64_t W, float* dst, int64_t Hp,
                                int64_t Wp, int64_t top, int64_t left) {
  const int64_t plane = Hp * Wp, tail = ceil_div(15, plane);
  at::parallel_for(0, planes, std::max(tail + 1, grain_for(plane)), [&](int64_t b0, int64_t b1) {
    const int64_t exact = std::max(b0, b1 - tail);
    pad_planes(src + b0 * H * W, exact - b0, H, W, dst + b0 * plane, Hp, Wp, top, left);
    copy_padded(src + exact * H * W, b1 - exact, H, W, dst + exact * plane, Hp, Wp, top, left);
  });
}

// out[0, GI): the GI vectors v[0, GI) interleaved lane by lane (out as one run of 16*GI floats: v[0][0],
// v[1][0], ..., v[GI-1][0], v[0][1], ...): the even and the odd vectors interleaved, then the two runs.
template <int GI>
FASTCONV_AVX512 inline void interleave_vectors(const __m512* v, __m512* out) {
  if constexpr (GI == 1) {
    out[0] = v[0];
  } else {
    __m512 even[GI / 2], odd[GI / 2], e[GI / 2], o[GI / 2];
    for (int i = 0; i < GI / 2; ++i) even[i] = v[2 * i], odd[i] = v[2 * i + 1];
    interleave_vectors<GI / 2>(even, e);
    interleave_vectors<GI / 2>(odd, o);
    for (int k = 0; k < GI / 2; ++k) {
      out[2 * k] = _mm512_permutex2var_ps(e[k], interleave_lo(), o[k]);
      out[2 * k + 1] = _mm512_permutex2var_ps(e[k], interleave_hi(), o[k]);
    }
  }
}

// The zero-padded planes of GI groups, interleaved: dst[c][hp][wp][i] (Hp x Wp planes, the input at row
// top, column left) = channel c of the planes of group i at src + i*group_stride (zero for i >= present).
// Exact stores: runs written by different threads may adjoin.
template <int GI>
FASTCONV_AVX512 void pad_planes_interleaved(const float* src, int64_t group_stride, int64_t present, int64_t channels,
                                            int64_t H, int64_t W, float* dst, int64_t Hp, int64_t Wp, int64_t top,
                                            int64_t left) {
  const __m512 zero = _mm512_setzero_ps();
  const int64_t row_floats = Wp * GI;
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t hp = 0; hp < Hp; ++hp) {
      float* d = dst + (c * Hp + hp) * row_floats;
      const int64_t h = hp - top;
      if (h < 0 || h >= H) {
        for (int64_t i = 0; i < row_floats; i += 16) _mm512_mask_storeu_ps(d + i, lane_mask(0, row_floats - i), zero);
        continue;
      }
      for (int64_t j = 0; j < Wp; j += 16) {  // padded columns j..j+15: input columns j - left..
        const __mmask16 m = lane_mask(left - j, left + W - j);
        __m512 v[GI], out[GI];
        for (int64_t i = 0; i < GI; ++i)
          v[i] = i < present ? _mm512_maskz_loadu_ps(m, src + i * group_stride + (c * H + h) * W + j - left) : zero;
        interleave_vectors<GI>(v, out);
        const int64_t floats = std::min<int64_t>(16, Wp - j) * GI;
        for (int64_t q = 0; q < GI; ++q)
          _mm512_mask_storeu_ps(d + j * GI + 16 * q, lane_mask(0, floats - 16 * q), out[q]);
      }
    }
  }
}

// Zero-padded planes from NHWC pixels, as pad_planes (GI = 1) and pad_planes_interleaved (GI > 1) make
// them from NCHW planes: dst[c][hp][wp][i] = channel c of group i of the `present` groups at src (the
// first group's first channel at pixel (0, 0); groups `channels` floats apart, pixels C floats apart;
// the input at row top, column left). GI = 1: any channel count, 16 channels a load; GI > 1: GI *
// channels <= 16, one masked load a pixel. 16 columns per register transpose, every padded row written
// whole; exact stores.
template <int GI>
FASTCONV_AVX512 void pad_planes_from_nhwc(const float* src, int64_t C, int64_t present, int64_t channels, int64_t H,
                                          int64_t W, float* dst, int64_t Hp, int64_t Wp, int64_t top, int64_t left) {
  const int64_t row_floats = Wp * GI, block = GI == 1 ? 16 : channels;  // channels a load
  for (int64_t c0 = 0; c0 < channels; c0 += block) {
    const int64_t nc = std::min(block, channels - c0);
    const __mmask16 cm = lane_mask(0, GI == 1 ? nc : present * channels);
    for (int64_t hp = 0; hp < Hp; ++hp) {
      const int64_t h = hp - top;
      const bool inside = h >= 0 && h < H;
      for (int64_t j = 0; j < Wp; j += 16) {  // padded columns j..j+15: input columns j - left..
        __m512 r[16];
        bool any = false;
        for (int x = 0; x < 16; ++x) {
          const int64_t w = j + x - left;
          const bool real = inside && w >= 0 && w < W;
          r[x] = real ? _mm512_maskz_loadu_ps(cm, src + (h * W + w) * C + c0) : _mm512_setzero_ps();
          any |= real;
        }
        if (any) transpose16(r);  // r[i * channels + c]: group i's channel c0 + c over the 16 columns
        const int64_t floats = std::min<int64_t>(16, Wp - j) * GI;
        for (int64_t c = 0; c < nc; ++c) {
          __m512 v[GI], out[GI];
          for (int64_t i = 0; i < GI; ++i) v[i] = r[i * channels + c];
          interleave_vectors<GI>(v, out);
          float* d = dst + ((c0 + c) * Hp + hp) * row_floats + j * GI;
          for (int64_t q = 0; q < GI; ++q) _mm512_mask_storeu_ps(d + 16 * q, lane_mask(0, floats - 16 * q), out[q]);
        }
      }
    }
  }
}

// The pixel stride of grouped_direct_forward's pixel-major padded copies for NHWC tensors (the set's input
// channels, GI * in_channels_per_group: 16, or 32 with one group a vector), else 0 (planes, transposed).
inline int64_t grouped_pixel_stride(const Conv2dParams& p, int64_t gi) {
  const int64_t floats = gi * p.in_channels_per_group();
  return floats == 16 || (floats == 32 && gi == 1) ? floats : 0;
}

// A zero-padded pixel-major copy of a set's channels from NHWC pixels: dst[hp][wp][c][i] (the input at row
// top, column left; PS = GI * channels floats a pixel) = channel c of group i of the `present` groups at
// src (the first group's first channel of pixel (0, 0); groups `channels` floats apart, pixels C floats
// apart). One group: the pixel's floats copied; GI groups: their lanes (i, c) permuted to (c, i). Lanes
// past GI * channels (at most PS) are zero.
template <int GI, int PS>
FASTCONV_AVX512 void pad_pixels_from_nhwc(const float* src, int64_t C, int64_t present, int64_t channels, int64_t H,
                                          int64_t W, float* dst, int64_t Hp, int64_t Wp, int64_t top, int64_t left) {
  alignas(64) int32_t order[16];  // lane 15 is zero where GI * channels < 16 (the load's mask)
  for (int j = 0; j < 16; ++j) order[j] = static_cast<int32_t>(j < GI * channels ? (j % GI) * channels + j / GI : 15);
  const __m512i perm = _mm512_load_si512(order);
  const __mmask16 real_lanes = lane_mask(0, present * channels);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t hp = 0; hp < Hp; ++hp) {
    const int64_t h = hp - top;
    float* d = dst + hp * Wp * PS;
    if (h < 0 || h >= H) {
      for (int64_t i = 0; i < Wp * PS; i += 16) _mm512_storeu_ps(d + i, zero);
      continue;
    }
    for (int64_t wp = 0; wp < Wp; ++wp, d += PS) {
      const int64_t w = wp - left;
      if (w < 0 || w >= W) {
        for (int q = 0; q < PS; q += 16) _mm512_storeu_ps(d + q, zero);
        continue;
      }
      const float* s = src + (h * W + w) * C;
      if constexpr (GI > 1) {
        _mm512_storeu_ps(d, _mm512_permutexvar_ps(perm, _mm512_maskz_loadu_ps(real_lanes, s)));
      } else {
        for (int q = 0; q < PS; q += 16)
          _mm512_storeu_ps(d + q, _mm512_maskz_loadu_ps(lane_mask(0, channels - q), s + q));
      }
    }
  }
}

// Whether grouped_direct_forward's NHWC form applies to p: one group a vector, or GI groups sharing it
// whose input channels fit one vector (GI * in_channels_per_group <= 16, as ResNeXt's).
inline bool grouped_nhwc_applicable(const Conv2dParams& p) {
  const int64_t gi = forward_groups_per_vector(p);
  return p.groups > 1 && (gi == 1 || gi * p.in_channels_per_group() <= 16);
}

// A set's zero-padded input in the layout grouped_direct_forward's NHWC form reads, from NHWC pixels (src:
// the set's first channel at pixel (0, 0), pixels C floats apart; `present` of its gi groups of
// `channels` channels): pixel-major with ps floats a pixel (grouped_pixel_stride), else planes,
// interleaved where groups share the vectors.
inline void pad_set_from_nhwc(const float* src, int64_t C, int64_t present, int64_t gi, int64_t ps, int64_t channels,
                              int64_t H, int64_t W, float* dst, int64_t Hp, int64_t Wp, int64_t top, int64_t left) {
  if (ps > 0) {
    const auto pad = ps == 32  ? &pad_pixels_from_nhwc<1, 32>
                     : gi == 2 ? &pad_pixels_from_nhwc<2, 16>
                     : gi == 4 ? &pad_pixels_from_nhwc<4, 16>
                               : &pad_pixels_from_nhwc<1, 16>;
    return pad(src, C, present, channels, H, W, dst, Hp, Wp, top, left);
  }
  (gi == 1   ? &pad_planes_from_nhwc<1>
   : gi == 2 ? &pad_planes_from_nhwc<2>
             : &pad_planes_from_nhwc<4>)(src, C, present, channels, H, W, dst, Hp, Wp, top, left);
}

// Whether a channels_last grouped convolution (forward, or the forward of a stride-1 backward-input) runs
// on grouped_direct_forward's NHWC form: wherever the NCHW rule takes the grouped kernel, and also for
// groups that share the vectors (8 or 4 channels) at the plane sizes where the NCHW route's GEMM is as
// fast as the grouped kernel, since there the GEMM pays the whole-tensor transposes and this does not
// (measured in-process, 2 threads, Zen 4, batch 8, ResNeXt's 32 groups of 8 at 28x28: see
// benchmarks/README.md). FASTCONV_GROUPED_DIRECT=0 turns it off with the NCHW kernel.
inline bool use_grouped_direct_nhwc(const Conv2dParams& p) {
  if (!grouped_nhwc_applicable(p)) return false;
  if (use_grouped_direct(p)) return true;
  return forward_groups_per_vector(p) > 1 && p.kernel_h * p.kernel_w > 1 && p.stride_w <= 2 &&
         padded_input_bytes(p) <= kMaxPaddedCopyBytes && forced("FASTCONV_GROUPED_DIRECT", '0', '1') != 0;
}

// pad_planes_interleaved for gi = 2, 4 or 8.
inline void pad_planes_interleaved(const float* src, int64_t group_stride, int64_t present, int64_t gi,
                                   int64_t channels, int64_t H, int64_t W, float* dst, int64_t Hp, int64_t Wp,
                                   int64_t top, int64_t left) {
  const auto fn = gi == 2   ? &pad_planes_interleaved<2>
                  : gi == 4 ? &pad_planes_interleaved<4>
                            : &pad_planes_interleaved<8>;
  fn(src, group_stride, present, channels, H, W, dst, Hp, Wp, top, left);
}

// NHWC outputs from this size are stored non-temporally (grouped_direct_forward).
constexpr int64_t kStreamGroupedOutputBytes = int64_t(1) << 20;

// The forward convolution of p (any stride_h, stride_w <= 2, any dilation) with weights packed by
// pack_grouped_weights (gi = forward_groups_per_vector(p)). nhwc (grouped_nhwc_applicable): input and
// output NHWC, each item's zero-padded input made from the input's pixels (pad_set_from_nhwc) and the
// tiles' pixels stored as they are (lanes permuted into channel order where groups share them), where
// the NCHW route transposed the whole input in and the output back.
inline void grouped_direct_forward(const float* input, const float* packed, const float* bias, float* out,
                                   const Conv2dParams& p, bool relu, bool nhwc = false) {
  const int64_t G = p.groups, OCg = p.out_channels_per_group(), K = p.col_rows_per_group();
  const int64_t C = p.in_channels, Cg = p.in_channels_per_group(), L = p.out_plane();
  const int64_t H = p.in_h, W = p.in_w, Hp = H + 2 * p.pad_h, Wp = W + 2 * p.pad_w, plane = Hp * Wp;
  // A set of gi groups shares the vectors (gi = 1: one group), its input read from an interleaved copy
  const int64_t gi = forward_groups_per_vector(p), sets = ceil_div(G, gi), OCs = gi * OCg;
  TORCH_INTERNAL_ASSERT(!nhwc || grouped_nhwc_applicable(p), "grouped_direct_forward: no NHWC form for these groups");
  // NHWC: a pixel-major padded copy where a set's input channels are 16 or 32 floats (ps), else planes
  const int64_t ps = nhwc ? grouped_pixel_stride(p, gi) : 0, step = ps > 0 ? ps : gi;
  std::vector<int64_t> koff = padded_tap_offsets(p, K, plane, Wp);
  for (int64_t& o : koff) o *= gi;
  if (ps > 0) {  // tap (c, kh, kw): pixel (kh, kw) of the window, then channel c's GI floats
    const int64_t KK = p.kernel_h * p.kernel_w;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t t = k % KK;
      koff[k] = ((t / p.kernel_w) * p.dilation_h * Wp + (t % p.kernel_w) * p.dilation_w) * ps + (k / KK) * gi;
    }
  }
  const int64_t bc = grouped_block_channels(OCs), blocks = ceil_div(OCs, bc), per_set = grouped_weight_floats(OCs, K);
  std::array<GroupedShape, kGroupedMaxVectors + 1> shapes;
  for (int nv = 1; nv <= kGroupedMaxVectors; ++nv)
    shapes[nv] = grouped_shape(nv, p.out_h, p.out_w, p.stride_w, gi, nhwc, ps);
  // Work items: (set, image, run of row tiles), the rows split where sets x images give fewer than 4
  // items a thread. An item of whole planes copies its set's planes, zero-padded, into a buffer of its
  // own, which the kernel then reads from L1/L2 (one padded copy of the whole input first: 1.2x the time
  // on ResNeXt's 7x7 planes); split rows read one shared padded copy.
  const int64_t units = sets * p.batch, max_tiles = shapes[1].row_tiles;
  const int64_t splits = std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), units), 1, max_tiles);
  const bool padding = p.pad_h > 0 || p.pad_w > 0 || gi > 1 || nhwc, shared_copy = padding && splits > 1;
  const int64_t set_floats = Cg * plane * gi;  // a set's (interleaved) padded planes of one image
  thread_local AlignedBuffer pad_buf(false);   // written in full; kept (fresh buffers page-fault on every call)
  const float* padded = input;
  const auto pad_set = [&](int64_t set, int64_t n, float* dst) {
    if (nhwc) {
      return pad_set_from_nhwc(input + n * H * W * C + set * gi * Cg, C, std::min(gi, G - set * gi), gi, ps, Cg, H, W,
                               dst, Hp, Wp, p.pad_h, p.pad_w);
    }
    const float* src = input + (n * C + set * gi * Cg) * H * W;
    if (gi == 1) return pad_planes(src, Cg, H, W, dst, Hp, Wp, p.pad_h, p.pad_w);
    pad_planes_interleaved(src, Cg * H * W, std::min(gi, G - set * gi), gi, Cg, H, W, dst, Hp, Wp, p.pad_h, p.pad_w);
  };
  if (shared_copy) {  // [n][set][set_floats]
    float* copy = pad_buf.get(p.batch * sets * set_floats);
    if (gi == 1 && !nhwc) {
      pad_planes_parallel(input, p.batch * C, H, W, copy, Hp, Wp, p.pad_h, p.pad_w);
    } else {
      at::parallel_for(0, p.batch * sets, grain_for(set_floats), [&](int64_t b0, int64_t b1) {
        for (int64_t t = b0; t < b1; ++t) pad_set(t % sets, t / sets, copy + t * set_floats);
      });
    }
    padded = copy;
  }
  // NHWC: each item writes its set's channels of every output pixel, a line or two of each pixel's, so
  // the lines go out to memory long before the other sets fill them in: from kStreamGroupedOutputBytes of
  // output they are written whole and non-temporally. Measured in-process, 2 threads, Zen 4, channels_last,
  // ResNeXt-50's grouped 3x3 layers against ordinary stores, forward: 32 groups of 4 at 56x56, batch 8
  // (13 MB) 0.74x the time, 8 at 28x28 (6.4 MB) 0.78x, 8 at 3x3/2 0.86x, 16 at 14x14 (3.2 MB) 0.97x, 32 at
  // 7x7 (1.6 MB) 0.92x; batch 1-2 (0.4-1.6 MB) 0.93-0.98x; backward-input (the same kernel) 0.86-0.93x.
  // With an eval BatchNorm and a ReLU reading the output after it: 0.76x (13 MB), 0.81x (batch 2, 1.6 MB),
  // 0.89x (3.2 MB), 1.00x (1.6 MB at 7x7). Below the bound the output stays in cache for the layer after.
  const bool stream = nhwc && p.batch * L * p.out_channels * 4 >= kStreamGroupedOutputBytes;
  at::parallel_for(0, units * splits, 1, [&](int64_t begin, int64_t end) {
    thread_local AlignedBuffer own(false), partial_buf(false);  // written in full before read
    for (int64_t item = begin; item < end; ++item) {
      const int64_t u = item / splits, part = item % splits, set = u / p.batch, n = u % p.batch;
      const int64_t g0 = set * gi, set_channels = std::min(OCs, (G - g0) * OCg);
      const float* img = padded + (n * sets + set) * set_floats;
      if (padding && !shared_copy) {
        float* dst = own.get(set_floats + 16);
        pad_set(set, n, dst);
        img = dst;
      }
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t ch0 = b * bc, channels = std::min<int64_t>(bc, set_channels - ch0);
        const int64_t nv = ceil_div(channels, 16);
        const GroupedShape& s = shapes[nv];
        const int64_t t0 = s.row_tiles * part / splits, t1 = s.row_tiles * (part + 1) / splits;
        // k-blocks where the block's weights outgrow L1: every tile's partial sums kept in `partial`
        const int64_t kc =
            std::min(K, std::max<int64_t>(p.kernel_h * p.kernel_w, kGroupedWeightBlockBytes / (nv * 64)));
        float* partial = kc < K ? partial_buf.get((t1 - t0) * s.segments * s.rows * s.p * nv * 16) : nullptr;
        const float* w = packed + set * per_set + b * bc * K;
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
          grouped_row_tiles(
              s, t0, t1, img, p.stride_h * Wp * step, p.stride_w * step, koff.data() + k0, std::min(kc, K - k0),
              w + k0 * nv * 16, bias ? bias + g0 * OCg + ch0 : nullptr, relu,
              nhwc ? out + n * L * p.out_channels + g0 * OCg + ch0 : out + (n * p.out_channels + g0 * OCg + ch0) * L,
              p.out_h, p.out_w, nhwc ? p.out_channels : L, channels, partial, k0 == 0, k0 + kc >= K, nhwc, stream);
        }
      }
    }
    if (stream) _mm_sfence();
  });
}

// Forward pass: weights packed, then the direct kernel.
inline void grouped_forward(const float* input, const float* weight, const float* bias, float* out,
                            const Conv2dParams& p, bool relu, bool nhwc = false) {
  thread_local AlignedBuffer buf(false);  // every lane written (zero past OCg)
  grouped_direct_forward(input, pack_grouped_weights(weight, p, nullptr, {}, buf, forward_groups_per_vector(p)), bias,
                         out, p, relu, nhwc);
}

// Backward-input of a stride-1 grouped convolution p: the forward over grad_output with the flipped,
// transposed weights.
inline void grouped_backward_input_stride1(const float* grad_output, const float* weight, float* grad_input,
                                           const Conv2dParams& p, bool nhwc = false) {
  const Conv2dParams q = backward_input_params(p);
  const int64_t KK = p.kernel_h * p.kernel_w;
  std::vector<int64_t> reversed(KK);
  for (int64_t j = 0; j < KK; ++j) reversed[j] = KK - 1 - j;
  thread_local AlignedBuffer buf(false);
  grouped_direct_forward(grad_output, pack_grouped_weights(weight, q, &p, reversed, buf, forward_groups_per_vector(q)),
                         nullptr, grad_input, q, false, nhwc);
}

// Whether backward-input of a strided grouped convolution runs here, one stride-1 correlation per phase
// of grad_input: from 8 input channels per group, half-full vectors included (measured, 2 threads, Intel
// host, batch 8, against col2im: ResNeXt's 32 groups of 8 at 56x56 stride 2 0.56x the time, 16 at 28x28
// 0.5x, 32 at 14x14 0.5x).
inline bool grouped_backward_input_by_phases(const Conv2dParams& p) {
  if ((p.stride_h == 1 && p.stride_w == 1) || p.dilation_h != 1 || p.dilation_w != 1) return false;
  Conv2dParams q = backward_input_params(p);
  q.stride_h = q.stride_w = 1;
  q.pad_h = q.pad_w = 0;
  if (padded_input_bytes(q) > kMaxPaddedCopyBytes) return false;
  if (const int f = forced("FASTCONV_GROUPED_DIRECT", '0', '1'); f >= 0) return f == 1;
  return p.groups > 1 && p.in_channels_per_group() >= 8;
}

// Rows a + SH i (i0 <= i < i1) of `channels` grad_input planes from the phase planes of their column phases
// b < SW (plane[b]: channels x ci x cj[b], null where no tap reaches the phase: zeros). Stride 2 writes
// whole rows, 8 pixels of each phase interleaved per vector (one masked store per phase had written every
// cache line twice, half each time: as long as the phases' kernel); other strides element by element.
FASTCONV_AVX512 inline void write_phase_rows(const float* const* plane, const int64_t* cj, int64_t channels, int64_t ci,
                                             int64_t i0, int64_t i1, float* dst, int64_t H, int64_t W, int64_t a,
                                             int64_t SH, int64_t SW) {
  const __m512i low = interleave_lo(), high = interleave_hi();
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t i = i0; i < i1; ++i) {
      float* row = dst + c * H * W + (a + SH * i) * W;
      const auto src = [&](int64_t b) { return plane[b] + (c * ci + i) * cj[b]; };
      if (SW == 2) {  // 16 pixels of each phase, 32 of the row
        for (int64_t j = 0; 2 * j < W; j += 16) {
          const __m512 v0 = plane[0] ? _mm512_maskz_loadu_ps(lane_mask(0, cj[0] - j), src(0) + j) : _mm512_setzero_ps();
          const __m512 v1 = plane[1] ? _mm512_maskz_loadu_ps(lane_mask(0, cj[1] - j), src(1) + j) : _mm512_setzero_ps();
          _mm512_mask_storeu_ps(row + 2 * j, lane_mask(0, W - 2 * j), _mm512_permutex2var_ps(v0, low, v1));
          _mm512_mask_storeu_ps(row + 2 * j + 16, lane_mask(0, W - 2 * j - 16), _mm512_permutex2var_ps(v0, high, v1));
        }
        continue;
      }
      for (int64_t b = 0; b < SW; ++b) {
        for (int64_t j = 0; j < cj[b]; ++j) row[b + SW * j] = plane[b] ? src(b)[j] : 0.f;
      }
    }
  }
}

constexpr int64_t kStreamPhasePixelBytes = int64_t(4) << 20;

// write_phase_rows for NHWC: the phases' pixel-major results (plane[b]: ci x cj[b] pixels of `channels`
// floats, null: zeros) into grad_input's pixels (a + SH i, b + SW j), i0 <= i < i1, `channels` floats
// each at dst (pixels C floats apart, rows W pixels); stream_ok: whole 64-byte aligned vectors
// non-temporally (the caller fences).
FASTCONV_AVX512 inline void write_phase_pixels(const float* const* plane, const int64_t* cj, int64_t channels,
                                               int64_t i0, int64_t i1, float* dst, int64_t W, int64_t C, int64_t a,
                                               int64_t SH, int64_t SW, bool stream_ok) {
  const bool stream = stream_ok && C % 16 == 0 && channels % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0;
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t b = 0; b < SW; ++b) {
      for (int64_t j = 0; j < cj[b]; ++j) {
        float* d = dst + ((a + SH * i) * W + b + SW * j) * C;
        const float* s = plane[b] ? plane[b] + (i * cj[b] + j) * channels : nullptr;
        for (int64_t c = 0; c < channels; c += 16) {
          const __mmask16 m = lane_mask(0, channels - c);
          store_vector(d + c, m, s ? _mm512_maskz_loadu_ps(m, s + c) : _mm512_setzero_ps(), stream);
        }
      }
    }
  }
}

// Backward-input of a strided grouped convolution p (dilation 1): grad_input's phase (a, b), its rows
// a + SH i and columns b + SW j, gets gradient only from the kernel taps r_a + SH t, r_b + SW u
// (PhaseDim, phase_backward_input.h), a stride-1 correlation of grad_output with those taps reversed.
// Each runs on the direct kernel into a per-item phase plane, which is then spread into grad_input; all
// phases read one zero-padded copy of the item's grad_output planes, padded for every phase's window.
// (col2im, which this replaces for these layers, reduced over a group's 16-32
// output channels per GEMM: 1.8-2.2x torch's time.)
inline void grouped_backward_input_phases(const float* grad_output, const float* weight, float* grad_input,
                                          const Conv2dParams& p, bool nhwc = false) {
  const int64_t N = p.batch, G = p.groups, C = p.in_channels, OC = p.out_channels, Cg = p.in_channels_per_group();
  const int64_t OCg = p.out_channels_per_group(), H = p.in_h, W = p.in_w, OH = p.out_h, OW = p.out_w;
  const int64_t SH = p.stride_h, SW = p.stride_w, KW = p.kernel_w;
  std::vector<PhaseDim> rows, cols;
  for (int64_t a = 0; a < SH; ++a) rows.emplace_back(a, H, p.kernel_h, SH, p.pad_h);
  for (int64_t b = 0; b < SW; ++b) cols.emplace_back(b, W, KW, SW, p.pad_w);
  // grad_output rows [-top, OH + bottom) and columns [-left, OW + right): every phase's window
  int64_t top = 0, bottom = 0, left = 0, right = 0;
  for (const PhaseDim& d : rows)
    if (d.count > 0 && d.taps > 0) top = std::max(top, -d.shift), bottom = std::max(bottom, d.shift + d.span() - OH);
  for (const PhaseDim& d : cols)
    if (d.count > 0 && d.taps > 0) left = std::max(left, -d.shift), right = std::max(right, d.shift + d.span() - OW);
  const int64_t Hq = OH + top + bottom, Wq = OW + left + right, plane = Hq * Wq;
  // gi groups of a set share the vectors where they are 2 of 8 or 4 of 4 input channels (the phases'
  // output channels): grad_output's planes interleaved, offsets in the padded planes gi times larger
  Conv2dParams whole = backward_input_params(p);
  whole.stride_h = whole.stride_w = 1;
  const int64_t gi = forward_groups_per_vector(whole), sets = ceil_div(G, gi), Cs = gi * Cg;
  // NHWC (grouped_nhwc_applicable(whole)): grad_output's pixels padded pixel-major where a set's channels
  // are 16 or 32 floats, else into planes; each phase's tiles store NHWC pixels, copied into grad_input's
  TORCH_INTERNAL_ASSERT(!nhwc || grouped_nhwc_applicable(whole), "grouped_backward_input_phases: no NHWC form");
  const int64_t ps = nhwc ? grouped_pixel_stride(whole, gi) : 0, step = ps > 0 ? ps : gi;
  struct Phase {
    int64_t a, b, count_i, count_j, origin;  // origin: phase pixel (0, 0)'s window in the padded planes
    bool zero;                               // no tap reaches it
    std::vector<int64_t> koff;
    std::array<GroupedShape, kGroupedMaxVectors + 1> shapes;
    const float* packed = nullptr;
  };
  std::vector<Phase> phases(SH * SW);
  thread_local std::vector<AlignedBuffer> weight_bufs;  // kept across calls
  while (static_cast<int64_t>(weight_bufs.size()) < SH * SW) weight_bufs.emplace_back(false);
  int64_t scratch = 0;
  for (int64_t a = 0; a < SH; ++a) {
    for (int64_t b = 0; b < SW; ++b) {
      const PhaseDim &dh = rows[a], &dw = cols[b];
      Phase& ph = phases[a * SW + b];
      ph.a = a, ph.b = b, ph.count_i = dh.count, ph.count_j = dw.count;
      ph.zero = dh.taps == 0 || dw.taps == 0;
      if (ph.count_i == 0 || ph.count_j == 0 || ph.zero) continue;
      ph.origin = ((dh.shift + top) * Wq + dw.shift + left) * step;
      Conv2dParams q{};
      q.batch = N, q.in_channels = OC, q.in_h = Hq, q.in_w = Wq, q.out_channels = C, q.groups = G;
      q.kernel_h = dh.taps, q.kernel_w = dw.taps, q.out_h = dh.count, q.out_w = dw.count;
      q.stride_h = q.stride_w = q.dilation_h = q.dilation_w = 1;
      std::vector<int64_t> taps;  // (u, v) -> the forward's tap, reversed
      for (int64_t u = 0; u < dh.taps; ++u)
        for (int64_t v = 0; v < dw.taps; ++v)
          taps.push_back((dh.r + SH * (dh.taps - 1 - u)) * KW + dw.r + SW * (dw.taps - 1 - v));
      ph.packed = pack_grouped_weights(weight, q, &p, taps, weight_bufs[a * SW + b], gi);
      ph.koff = padded_tap_offsets(q, q.col_rows_per_group(), plane, Wq);
      for (int64_t& o : ph.koff) o *= gi;
      if (ps > 0) {  // tap (c, u, v): pixel (u, v) of the window, then channel c's GI floats
        const int64_t KKq = dh.taps * dw.taps;
        for (int64_t k = 0; k < static_cast<int64_t>(ph.koff.size()); ++k) {
          const int64_t t = k % KKq;
          ph.koff[k] = ((t / dw.taps) * Wq + t % dw.taps) * ps + (k / KKq) * gi;
        }
      }
      for (int nv = 1; nv <= kGroupedMaxVectors; ++nv)
        ph.shapes[nv] = grouped_shape(nv, dh.count, dw.count, 1, gi, nhwc, ps);
      scratch = std::max(scratch, dh.count * dw.count);
    }
  }
  const int64_t bc = grouped_block_channels(Cs), blocks = ceil_div(Cs, bc), block_scratch = std::min(bc, Cs) * scratch;
  // Items: (group, image, part of the phase rows), rows split in pairs only where groups x images are
  // fewer than the threads: each part pads the item's grad_output planes again (at 4 items a thread,
  // batch 1 with 2 groups on 2 threads took 1.07-1.11x the time of one item per group)
  int64_t max_rows = 1;
  for (const PhaseDim& d : rows) max_rows = std::max(max_rows, d.count);
  const int64_t parts = std::clamp<int64_t>(ceil_div(at::get_num_threads(), sets * N), 1, ceil_div(max_rows, 2));
  // NHWC: each item writes its set's channels of every pixel, a line or two of each pixel's C floats, so
  // the lines go out to memory long before the other sets fill them in: past kStreamPhasePixelBytes of
  // grad_input they are written whole and non-temporally (no read of the line first). Measured
  // in-process, 2 threads, Zen 4, channels_last, against ordinary stores: ResNeXt's 32 groups of 8 at 3x3/2
  // from 56x56, batch 8 (26 MB), 0.66x the time; 16 a group from 28x28 (13 MB) 0.81x, 32 from 14x14
  // (6.4 MB) 0.79x; at batch 1 (3.2 MB) 1.03x, hence the bound.
  const bool stream = nhwc && N * H * W * C * 4 >= kStreamPhasePixelBytes;
  at::parallel_for(0, sets * N * parts, 1, [&](int64_t begin, int64_t end) {
    thread_local AlignedBuffer padded_buf(false), phase_buf(false);  // written in full before read
    float* padded = padded_buf.get(OCg * plane * gi + 16);
    float* out = phase_buf.get(SW * block_scratch);
    std::vector<const float*> planes(SW);
    std::vector<int64_t> cj(SW);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t set = item / (N * parts), n = (item / parts) % N, part = item % parts, g0 = set * gi;
      const float* src = grad_output + (n * OC + g0 * OCg) * OH * OW;
      if (nhwc) {
        pad_set_from_nhwc(grad_output + n * OH * OW * OC + g0 * OCg, OC, std::min(gi, G - g0), gi, ps, OCg, OH, OW,
                          padded, Hq, Wq, top, left);
      } else if (gi == 1) {
        pad_planes(src, OCg, OH, OW, padded, Hq, Wq, top, left);
      } else {
        pad_planes_interleaved(src, OCg * OH * OW, std::min(gi, G - g0), gi, OCg, OH, OW, padded, Hq, Wq, top, left);
      }
      const int64_t set_channels = std::min(Cs, (G - g0) * Cg);
      float* gi_planes = grad_input + (n * C + g0 * Cg) * H * W;
      for (int64_t a = 0; a < SH; ++a) {
        const int64_t pairs = ceil_div(rows[a].count, 2);
        const int64_t i0 = 2 * (pairs * part / parts), i1 = std::min(rows[a].count, 2 * (pairs * (part + 1) / parts));
        if (i0 >= i1) continue;
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t ch0 = b * bc, channels = std::min<int64_t>(bc, set_channels - ch0);
          for (int64_t bb = 0; bb < SW; ++bb) {
            const Phase& ph = phases[a * SW + bb];
            cj[bb] = ph.count_j;
            planes[bb] = nullptr;
            if (ph.zero || ph.count_j == 0) continue;
            const int64_t K = static_cast<int64_t>(ph.koff.size()), L = ph.count_i * ph.count_j;
            float* o = out + bb * block_scratch;
            const GroupedShape& s = ph.shapes[ceil_div(channels, 16)];
            grouped_row_tiles(s, i0 / s.rows, ceil_div(i1, s.rows), padded + ph.origin, Wq * step, step, ph.koff.data(),
                              K, ph.packed + set * grouped_weight_floats(Cs, K) + b * bc * K, nullptr, false, o,
                              ph.count_i, ph.count_j, nhwc ? channels : L, channels, nullptr, true, true, nhwc);
            planes[bb] = o;
          }
          if (nhwc) {
            write_phase_pixels(planes.data(), cj.data(), channels, i0, i1, grad_input + n * H * W * C + g0 * Cg + ch0,
                               W, C, a, SH, SW, stream);
          } else {
            write_phase_rows(planes.data(), cj.data(), channels, rows[a].count, i0, i1, gi_planes + ch0 * H * W, H, W,
                             a, SH, SW);
          }
        }
      }
    }
    if (stream) _mm_sfence();  // write_phase_pixels' non-temporal stores
  });
}

// Backward-weight of grouped 3x3 convolutions (16+ output channels per group, dilation 1, stride_w <= 2)
// with the output channels in the lanes: grad_w[o][c][kh][kw] = sum over images and output pixels of
// grad_output[o][pixel] x input[c][pixel's tap (kh, kw)]. A register block is CB input channels x 9
// taps x NV vectors of output channels (<= 27 accumulators); each step of the reduction (one output
// pixel) loads NV vectors of grad_output, transposed to pixel-major once per call, and broadcasts
// CB x 9 input floats from zero-padded planes. The reduction runs over every image inside one block,
// so each grad_w element is one sum in a fixed order: no per-thread partials, any thread count gives
// the same bits.
inline bool grouped_weight_grad_wanted(const Conv2dParams& p) {
  if (p.kernel_h != 3 || p.kernel_w != 3 || p.dilation_h != 1 || p.dilation_w != 1 || p.stride_w > 2) return false;
  return use_grouped_direct(p, true);
}

template <int CB, int NV, int SW>
FASTCONV_AVX512 void grouped_weight_grad_block(const float* x, int64_t x_channel, int64_t x_image, int64_t Wp,
                                               int64_t row_step, const float* go, int64_t go_pixel, int64_t go_image,
                                               int64_t N, int64_t OH, int64_t OW, float* dst, int64_t dst_o,
                                               int64_t channels) {
  __m512 acc[CB][9][NV];
  for (int cb = 0; cb < CB; ++cb)
    for (int t = 0; t < 9; ++t)
      for (int v = 0; v < NV; ++v) acc[cb][t][v] = _mm512_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t oh = 0; oh < OH; ++oh) {
      const float* row = x + n * x_image + oh * row_step;
      const float* g = go + n * go_image + oh * OW * go_pixel;
      for (int64_t ow = 0; ow < OW; ++ow, g += go_pixel) {
        __m512 gv[NV];
        for (int v = 0; v < NV; ++v) gv[v] = _mm512_load_ps(g + 16 * v);
        const float* px = row + ow * SW;
        for (int cb = 0; cb < CB; ++cb) {
          for (int kh = 0; kh < 3; ++kh) {
            const float* tap_row = in_register(px + cb * x_channel + kh * Wp);  // base + displacement loads
            for (int kw = 0; kw < 3; ++kw) {
              const __m512 b = _mm512_set1_ps(tap_row[kw]);
              for (int v = 0; v < NV; ++v) acc[cb][kh * 3 + kw][v] = _mm512_fmadd_ps(b, gv[v], acc[cb][kh * 3 + kw][v]);
            }
          }
        }
      }
    }
  }
  alignas(64) float lanes[16];
  for (int cb = 0; cb < CB; ++cb) {
    for (int t = 0; t < 9; ++t) {
      for (int v = 0; v < NV; ++v) {
        _mm512_store_ps(lanes, acc[cb][t][v]);
        for (int64_t l = 0; l < std::min<int64_t>(16, channels - 16 * v); ++l)
          dst[(16 * v + l) * dst_o + cb * 9 + t] = lanes[l];
      }
    }
  }
}

using GroupedWeightGradFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                                     int64_t, int64_t, int64_t, float*, int64_t, int64_t);

template <int SW>
GroupedWeightGradFn grouped_weight_grad_for(int cb, int nv) {
  if (nv == 1)
    return cb == 1   ? &grouped_weight_grad_block<1, 1, SW>
           : cb == 2 ? &grouped_weight_grad_block<2, 1, SW>
                     : &grouped_weight_grad_block<3, 1, SW>;
  return nv == 2 ? &grouped_weight_grad_block<1, 2, SW> : &grouped_weight_grad_block<1, 3, SW>;
}

// dst[n][pixel][o] (rows of `ld` floats, lanes past OCg zero) = grad_output[n][g*OCg + o][pixel] for
// group g.
inline void transpose_group_grad_output(const float* go, const Conv2dParams& p, int64_t g, int64_t n, float* dst,
                                        int64_t ld) {
  const int64_t OCg = p.out_channels_per_group(), L = p.out_plane();
  const float* src = go + (n * p.out_channels + g * OCg) * L;
  for (int64_t o0 = 0; o0 < ld; o0 += 16) {
    columns_to_lanes(src + o0 * L, L, std::min<int64_t>(16, OCg - o0), L,
                     [&](int64_t px) { return dst + px * ld + o0; });
  }
}

// The same sum with the input channels in the lanes, for groups of at most 16 input channels (one vector)
// whose few output channels would leave the block above short of accumulators and heavy on broadcasts
// (9 per 9 FMAs at 16 output channels): a block is OB output channels x 9 taps (27 accumulators at OB =
// 3), each step loads the 9 taps' channel vectors from a pixel-major padded copy of the input and
// broadcasts OB grad_output floats. GI groups share the lanes where a group's channels fill at most
// 16 / GI of them (ResNeXt's 8 a group: 2 groups a vector, not half-empty vectors): lane c*GI + i is
// input channel c of group i of the set, and each broadcast puts the GI groups' grad_output floats, which
// lie side by side ([o][pixel][GI], pad_planes_interleaved), in every GI lanes. grad_output's float of
// output channel o and pixel p is at go + o go_o + p go_px (the set's planes: go_px = GI, go_o = GI
// times the pixels; NHWC read in place, GI = 1: go_px = the channels, go_o = 1).

template <int OB, int SW, int GI>
FASTCONV_AVX512 void grouped_weight_grad_channel_lanes(const float* xt, int64_t x_image, int64_t Wp, int64_t row_step,
                                                       const float* go, int64_t go_o, int64_t go_px, int64_t go_image,
                                                       int64_t N, int64_t OH, int64_t OW, float* dst, int64_t dst_o,
                                                       int64_t dst_group, int64_t channels, int64_t groups) {
  __m512 acc[OB][9];
  for (int ob = 0; ob < OB; ++ob)
    for (int t = 0; t < 9; ++t) acc[ob][t] = _mm512_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t oh = 0; oh < OH; ++oh) {
      const float* row = xt + n * x_image + oh * row_step;
      const float* g = go + n * go_image + oh * OW * go_px;
      for (int64_t ow = 0; ow < OW; ++ow) {
        __m512 b[OB];
        if (go_px > 16) _mm_prefetch(reinterpret_cast<const char*>(g + (ow + 8) * go_px), _MM_HINT_T0);
        for (int ob = 0; ob < OB; ++ob) b[ob] = broadcast_lanes<GI>(g + ob * go_o + ow * go_px);
        // The pixel's pointer opaque and each tap's vector pinned in a register: GCC had carried the
        // loaded vectors of stride-1 neighbours from one pixel to the next (two pixels a loop), which
        // spilled accumulators to the stack (perf: FMAs on stack operands; measured in-process, one thread,
        // Zen 4, ResNeXt's groups of 16, 8 and 4, batch 8: 0.90-0.92x the time with the pin)
        const float* px = in_register(row + ow * SW * 16);
        for (int kh = 0; kh < 3; ++kh) {
          for (int kw = 0; kw < 3; ++kw) {
            __m512 xv = _mm512_load_ps(px + kh * Wp * 16 + kw * 16);
            __asm__("" : "+v"(xv));
            for (int ob = 0; ob < OB; ++ob) acc[ob][kh * 3 + kw] = _mm512_fmadd_ps(b[ob], xv, acc[ob][kh * 3 + kw]);
          }
        }
      }
    }
  }
  alignas(64) float lanes[16];
  for (int ob = 0; ob < OB; ++ob) {
    for (int t = 0; t < 9; ++t) {
      _mm512_store_ps(lanes, acc[ob][t]);
      for (int64_t i = 0; i < groups; ++i)
        for (int64_t c = 0; c < channels; ++c) dst[i * dst_group + ob * dst_o + c * 9 + t] = lanes[c * GI + i];
    }
  }
}

using GroupedChannelLanesFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                                       int64_t, int64_t, int64_t, float*, int64_t, int64_t, int64_t, int64_t);

template <int SW, int GI>
GroupedChannelLanesFn grouped_channel_lanes_for(int ob) {
  return ob == 1   ? &grouped_weight_grad_channel_lanes<1, SW, GI>
         : ob == 2 ? &grouped_weight_grad_channel_lanes<2, SW, GI>
                   : &grouped_weight_grad_channel_lanes<3, SW, GI>;
}

template <int SW>
GroupedChannelLanesFn grouped_channel_lanes_for(int ob, int64_t gi) {
  switch (gi) {
    case 1:
      return grouped_channel_lanes_for<SW, 1>(ob);
    case 2:
      return grouped_channel_lanes_for<SW, 2>(ob);
    case 4:
      return grouped_channel_lanes_for<SW, 4>(ob);
    default:
      return grouped_channel_lanes_for<SW, 8>(ob);
  }
}

// Groups sharing the lanes of the channel-lane backward-weight: the most (1, 2, 4 or 8) whose input
// channels fit in 16 lanes together, no more than there are groups.
inline int64_t groups_per_vector(int64_t Cg, int64_t G) {
  int64_t gi = 1;
  while (gi < 8 && 2 * gi * Cg <= 16 && gi < G) gi *= 2;
  return gi;
}

// dst[hp][wp][16] = the zero-padded input of groups g0 .. g0 + gi - 1 (those below G), image n, input
// channel c of group i in lane c*gi + i (zero in the lanes past them and in the padding).
FASTCONV_AVX512 inline void transpose_group_input_padded(const float* input, const Conv2dParams& p, int64_t g0,
                                                         int64_t gi, int64_t n, float* dst) {
  const int64_t Cg = p.in_channels_per_group(), H = p.in_h, W = p.in_w, Wp = W + 2 * p.pad_w;
  const int64_t Hp = H + 2 * p.pad_h, rows = Cg * std::min(gi, p.groups - g0);
  const float* src = input + (n * p.in_channels + g0 * Cg) * H * W;
  // transpose_columns puts channel i*Cg + c of the set in lane i*Cg + c: lane c*gi + i takes it from there
  alignas(64) int32_t from[16];
  for (int64_t l = 0; l < 16; ++l) from[l] = static_cast<int32_t>(l < Cg * gi ? (l % gi) * Cg + l / gi : rows % 16);
  const __m512i order = _mm512_load_si512(from);
  const bool permute = gi > 1;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t hp = 0; hp < Hp; ++hp) {
    float* row = dst + hp * Wp * 16;
    const int64_t h = hp - p.pad_h;
    if (h < 0 || h >= H) {
      for (int64_t i = 0; i < Wp; ++i) _mm512_store_ps(row + i * 16, zero);
      continue;
    }
    for (int64_t i = 0; i < p.pad_w; ++i) {
      _mm512_store_ps(row + i * 16, zero);
      _mm512_store_ps(row + (p.pad_w + W + i) * 16, zero);
    }
    float* out = row + p.pad_w * 16;
    transpose_columns(src + h * W, H * W, rows, W, [&](int64_t w, __m512 v) FASTCONV_AVX512 {
      _mm512_store_ps(out + w * 16, permute ? _mm512_permutexvar_ps(order, v) : v);
    });
  }
}

// Whether grouped_backward_weight's NHWC form applies: the input channels in the lanes, the set's grad_output
// channels in one vector too (GI * out_channels_per_group <= 16: ResNeXt's 4, 8 and 16 a group).
inline bool grouped_weight_grad_nhwc_applicable(const Conv2dParams& p) {
  const int64_t OCg = p.out_channels_per_group(), Cg = p.in_channels_per_group();
  return OCg <= 16 && Cg <= 16 && groups_per_vector(Cg, p.groups) * OCg <= 16;
}

// nhwc (grouped_weight_grad_nhwc_applicable): grad_output and the input NHWC, each item's padded input
// pixels and its grad_output planes made from their pixels (no whole-tensor transposes).
inline void grouped_backward_weight(const float* grad_output, const float* input, float* grad_weight,
                                    const Conv2dParams& p, bool nhwc = false) {
  TORCH_INTERNAL_ASSERT(!nhwc || grouped_weight_grad_nhwc_applicable(p), "grouped_backward_weight: no NHWC form");
  const int64_t N = p.batch, G = p.groups, C = p.in_channels, Cg = p.in_channels_per_group();
  const int64_t OCg = p.out_channels_per_group(), L = p.out_plane();
  const int64_t H = p.in_h, W = p.in_w, Hp = H + 2 * p.pad_h, Wp = W + 2 * p.pad_w, plane = Hp * Wp;
  thread_local AlignedBuffer pad_buf(false), go_buf(false);  // written in full; kept across calls
  if (OCg <= 16 && Cg <= 16) {  // the input channels in the lanes: output channels 3 a block
    // Items: (set of gi groups, chunk of images), each transposing its images' padded planes into a
    // buffer of its own (in L2 for the blocks of output channels that follow) and summing into a partial
    // grad_weight of the chunk; the partials are then added chunk after chunk. Chunks of at least 1024
    // output pixels, whatever the thread count (the same bits at any): per block and chunk the kernel
    // stores 27 vectors lane by lane, which at one 7x7 image a chunk took 1.2x the time of the GEMM.
    const int64_t gi = groups_per_vector(Cg, G), sets = ceil_div(G, gi), weight_floats = G * OCg * Cg * 9;
    const int64_t chunk = std::min(N, ceil_div(1024, L)), chunks = ceil_div(N, chunk);
    float* partial = chunks > 1 ? go_buf.get(chunks * weight_floats) : grad_weight;
    at::parallel_for(0, sets * chunks, 1, [&](int64_t b0, int64_t b1) {
      thread_local AlignedBuffer xt_buf(false), go_set_buf(false);  // written in full before read
      float* xt = xt_buf.get(chunk * plane * 16);
      for (int64_t t = b0; t < b1; ++t) {
        const int64_t set = t / chunks, part = t % chunks, n0 = part * chunk, images = std::min(chunk, N - n0);
        const int64_t g0 = set * gi, present = std::min(gi, G - g0);
        for (int64_t i = 0; i < images; ++i) {
          float* x = xt + i * plane * 16;
          if (nhwc) {
            const float* src = input + (n0 + i) * H * W * C + g0 * Cg;
            const auto pad = gi == 1   ? &pad_pixels_from_nhwc<1, 16>
                             : gi == 2 ? &pad_pixels_from_nhwc<2, 16>
                             : gi == 4 ? &pad_pixels_from_nhwc<4, 16>
                                       : &pad_pixels_from_nhwc<8, 16>;
            pad(src, C, present, Cg, H, W, x, Hp, Wp, p.pad_h, p.pad_w);
          } else {
            transpose_group_input_padded(input, p, g0, gi, n0 + i, x);
          }
        }
        // grad_output: the set's [o][pixel] planes, or with gi > 1 (or NHWC) interleaved [n][o][pixel][gi];
        // NHWC with one group a vector: read in place, a pixel's OCg floats side by side, each pixel's line
        // prefetched 8 pixels ahead (the set's copy had been 14% of the samples; without the prefetch the
        // broadcasts waited on those lines as long; measured in-process, Zen 4, ResNeXt's 16 a group, batch
        // 8: 14x14 0.93x the time on one thread, 0.94x on two, 3x3/2 from 28x28 0.97x, batch 1 0.93x)
        const float* go = grad_output + (n0 * p.out_channels + g0 * OCg) * L;
        int64_t go_o = L, go_px = gi, go_image = p.out_channels * L;
        if (nhwc && gi == 1) {
          go = grad_output + n0 * L * p.out_channels + g0 * OCg;
          go_o = 1, go_px = p.out_channels, go_image = L * p.out_channels;
        } else if (nhwc) {
          float* dst = go_set_buf.get(images * OCg * L * gi);
          const auto interleave = gi == 2   ? &pad_planes_from_nhwc<2>
                                  : gi == 4 ? &pad_planes_from_nhwc<4>
                                            : &pad_planes_from_nhwc<8>;
          for (int64_t i = 0; i < images; ++i) {  // each image's pixels as rows of L pixels
            interleave(grad_output + ((n0 + i) * L * p.out_channels + g0 * OCg), p.out_channels, present, OCg, 1, L,
                       dst + i * OCg * L * gi, 1, L, 0, 0);
          }
          go = dst, go_o = L * gi, go_image = OCg * L * gi;
        } else if (gi > 1) {
          float* dst = go_set_buf.get(images * OCg * L * gi);
          for (int64_t i = 0; i < images; ++i) {  // each image's OCg planes of the set's groups: rows of L pixels
            pad_planes_interleaved(grad_output + ((n0 + i) * p.out_channels + g0 * OCg) * L, OCg * L, present, gi, OCg,
                                   1, L, dst + i * OCg * L * gi, 1, L, 0, 0);
          }
          go = dst, go_o = L * gi, go_image = OCg * L * gi;
        }
        for (int64_t o0 = 0; o0 < OCg; o0 += 3) {
          const int ob = static_cast<int>(std::min<int64_t>(3, OCg - o0));
          const GroupedChannelLanesFn fn =
              p.stride_w == 1 ? grouped_channel_lanes_for<1>(ob, gi) : grouped_channel_lanes_for<2>(ob, gi);
          fn(xt, plane * 16, Wp, p.stride_h * Wp * 16, go + o0 * go_o, go_o, go_px, go_image, images, p.out_h, p.out_w,
             partial + part * weight_floats + (g0 * OCg + o0) * Cg * 9, Cg * 9, OCg * Cg * 9, Cg, present);
        }
      }
    });
    if (chunks > 1) {
      at::parallel_for(0, weight_floats, 4096, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          float sum = partial[e];
          for (int64_t c = 1; c < chunks; ++c) sum += partial[c * weight_floats + e];
          grad_weight[e] = sum;
        }
      });
    }
    return;
  }
  const float* padded = input;
  if (p.pad_h > 0 || p.pad_w > 0) {
    float* copy = pad_buf.get(N * C * plane);
    pad_planes_parallel(input, N * C, H, W, copy, Hp, Wp, p.pad_h, p.pad_w);
    padded = copy;
  }
  const int64_t ld = ceil_div(OCg, 16) * 16;  // grad_output transposed: [g][n][pixel][ld]
  float* got = go_buf.get(G * N * L * ld);
  at::parallel_for(0, G * N, grain_for(ld * L), [&](int64_t b0, int64_t b1) {
    for (int64_t t = b0; t < b1; ++t) transpose_group_grad_output(grad_output, p, t / N, t % N, got + t * L * ld, ld);
  });
  // blocks of output channels: <= 3 vectors each, near-equal; one vector: 3 input channels a block
  const int64_t vectors = ld / 16, o_blocks = ceil_div(vectors, 3), per_block = ceil_div(vectors, o_blocks);
  const int64_t cb = per_block == 1 ? 3 : 1, c_blocks = ceil_div(Cg, cb);
  at::parallel_for(0, G * o_blocks * c_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t t = b0; t < b1; ++t) {
      const int64_t g = t / (o_blocks * c_blocks), ob = (t / c_blocks) % o_blocks, c0 = (t % c_blocks) * cb;
      const int64_t v0 = ob * per_block, nv = std::min(per_block, vectors - v0), o0 = 16 * v0;
      const int64_t ncb = std::min(cb, Cg - c0), channels = std::min<int64_t>(16 * nv, OCg - o0);
      const GroupedWeightGradFn fn = p.stride_w == 1 ? grouped_weight_grad_for<1>(int(ncb), int(nv))
                                                     : grouped_weight_grad_for<2>(int(ncb), int(nv));
      fn(padded + (g * Cg + c0) * plane, plane, C * plane, Wp, p.stride_h * Wp, got + g * N * L * ld + o0, ld, L * ld,
         N, p.out_h, p.out_w, grad_weight + ((g * OCg + o0) * Cg + c0) * 9, Cg * 9, channels);
    }
  });
}

}  // namespace engine
}  // namespace cpu
}  // namespace fastconv
#endif
