// Forward of channels_last tensors, float32 on AVX-512: a direct
// convolution that reads the NHWC input and writes the NHWC output in place, with output channels in
// the vector lanes, output pixels as the broadcast rows and (tap, input channel) as the reduction, the
// way oneDNN's direct kernels block it:
//
//   out[n][px][o] = bias[o] + sum over taps t, channels c of x[n][px's position + tap t][c] * W[o][c][t]
//
// A tile is 8 pixels x 1-3 vectors of 16 output channels (up to 24 accumulators): per step one
// broadcast of an input float per pixel (each pixel's channels are consecutive floats, so every pixel
// has its own row pointer and a tile runs across output rows and images) and 1-3 loads of the weights,
// packed once per call as [group][channel block of 1-3 vectors][reduction block][tap][channel][48].
// The tile's sums are stored straight into the NHWC output: no transposes at all, where the NCHW engines
// transpose the input in and the output back (1x1 256->64 at 56x56, batch 8: 1.9x torch's
// channels_last time that way, the transposes more than the GEMM).
//
// Padding: a zero-padded NHWC copy of the input (rows copied whole, borders zeroed: no transposes);
// unpadded layers read the input in place. Tasks are (group, block of about 96 pixels, balanced over
// the threads); inside one, the reduction runs in blocks of `kc` channels x every tap (their packed
// weights for all the group's output channels in L2) and each output-channel block over the pixel
// block's tiles (its input rows in L1/L2), the tiles' partial sums kept in the output in between. The
// sums run in a fixed order: the same bits at any thread count. Large outputs written in one reduction
// block are stored non-temporally (kClStreamBytes).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_params.h"
#include "cpu/conv2d_avx512.h"
#include "cpu/gemm.h"

#if FASTCONV_HAVE_AVX512_KERNELS
namespace fastconv {
namespace cpu {
namespace engine {

constexpr int kClRows = 8;     // pixels a tile broadcasts
constexpr int kClVectors = 3;  // vectors of 16 output channels a tile holds
constexpr int64_t kClWidth = 16 * kClVectors;
// Input and output together past this (half the L3 of a Zen 4 CCD): an output written in one
// reduction block is stored non-temporally, without reading its lines in first. Measured in-process,
// 2 threads, Zen 4, batch 8, the conv alone: 1x1 64->256 at 56x56 (32 MB together) 0.83x the time,
// 256->128 at 56x56 (38 MB) 0.95x, 128->512 at 28x28 (16 MB) 0.97x; 256->64 at 28x28 and 64->64 at
// 56x56 (8 MB, streamed under a 4 MiB threshold) 1.00x. With the next op reading the output (a ReLU,
// a second 1x1 conv): 0.87-0.88x and 0.94x for the first two, 0.99-1.03x for the 16 MB one, which
// stays below.
constexpr int64_t kClStreamBytes = int64_t(16) << 20;

// Where a tile's results go: pixel i's channels at out + i*ldc (pointers per pixel: tiles cross rows and
// images), the last vector's lanes under `last`; init: zero, or the bias, or what is there (accumulate);
// relu on the last block of the reduction; stream: whole, 64-byte aligned vectors stored non-temporally
// (outputs written once and too large to stay in cache, see kClStreamBytes).
struct ClTileDest {
  float* const* rows;
  __mmask16 last;
  Init init;
  const float* bias;
  bool relu;
  bool stream;
};

// A tile's sums into the NHWC output (ClTileDest: init, bias, ReLU, the last vector's lanes).
template <int MR, int NV>
FASTCONV_AVX512 __attribute__((always_inline)) inline void store_channels_last_tile(__m512 (&acc)[MR][NV],
                                                                                    const ClTileDest& d) {
  _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) {
    const __mmask16 m = v == NV - 1 ? d.last : __mmask16(0xFFFF);
    const __m512 bias = d.init == Init::kBias ? _mm512_maskz_loadu_ps(m, d.bias + 16 * v) : _mm512_setzero_ps();
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      float* c = d.rows[i] + 16 * v;
      __m512 r = _mm512_add_ps(acc[i][v], d.init == Init::kAccumulate ? _mm512_maskz_loadu_ps(m, c) : bias);
      if (d.relu) r = _mm512_max_ps(_mm512_setzero_ps(), r);  // NaN (the second operand) stays NaN, as torch.relu
      store_vector(c, m, r, d.stream);
    }
  }
}

// acc[i][v] = init + sum over the taps t and channels c < len of rows[i][aoff[t] + c] * b[(t*len + c)*48 + 16v].
template <int MR, int NV>
FASTCONV_AVX512 inline void channels_last_tile(const float* const* rows, const int64_t* aoff, int64_t taps, int64_t len,
                                               const float* b, const ClTileDest& d) {
  __m512 acc[MR][NV];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < taps; ++t) {
    const float* ar[MR];
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) ar[i] = rows[i] + aoff[t];
    const float* bt = b + t * len * kClWidth;
    for (int64_t k = 0; k < len; ++k) {
      __m512 bv[NV];
      _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_ps(bt + k * kClWidth + 16 * v);
      _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
        const __m512 av = _mm512_set1_ps(ar[i][k]);
        _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
      }
    }
  }
  store_channels_last_tile<MR, NV>(acc, d);
}

// The same over a flat reduction (one block of few channels: rows r = t*len + c at roff[r] from each
// pixel's top-left tap): the tile's pixel pointers stay in registers, with no per-tap pointer updates,
// which weigh against 8 x NV FMAs per tap at 1-4 channels.
template <int MR, int NV>
FASTCONV_AVX512 inline void channels_last_tile_flat(const float* const* rows, const int64_t* roff, int64_t R,
                                                    const float* b, const ClTileDest& d) {
  __m512 acc[MR][NV];
  const float* rp[MR];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    rp[i] = rows[i];
    _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t off = roff[r];
    __m512 bv[NV];
    _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_ps(b + r * kClWidth + 16 * v);
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(rp[i][off]);
      _Pragma("GCC unroll 3") for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
  store_channels_last_tile<MR, NV>(acc, d);
}

// flat: channels_last_tile_flat over taps rows at aoff (len unused), else channels_last_tile.
FASTCONV_AVX512 inline void run_channels_last_tile(int mr, int nv, const float* const* rows, const int64_t* aoff,
                                                   int64_t taps, int64_t len, const float* b, const ClTileDest& d,
                                                   bool flat = false) {
#define FASTCONV_CL_NV(MR, NV)                               \
  if (flat)                                                  \
    channels_last_tile_flat<MR, NV>(rows, aoff, taps, b, d); \
  else                                                       \
    channels_last_tile<MR, NV>(rows, aoff, taps, len, b, d);
#define FASTCONV_CL_CASE(MR) \
  case MR:                   \
    if (nv == 3) {           \
      FASTCONV_CL_NV(MR, 3)  \
    } else if (nv == 2) {    \
      FASTCONV_CL_NV(MR, 2)  \
    } else {                 \
      FASTCONV_CL_NV(MR, 1)  \
    }                        \
    break;
  switch (mr) {
    FASTCONV_CL_CASE(8)
    FASTCONV_CL_CASE(7)
    FASTCONV_CL_CASE(6)
    FASTCONV_CL_CASE(5)
    FASTCONV_CL_CASE(4)
    FASTCONV_CL_CASE(3)
    FASTCONV_CL_CASE(2)
    default:
      FASTCONV_CL_CASE(1)
  }
#undef FASTCONV_CL_CASE
#undef FASTCONV_CL_NV
}

// Channels per block of the reduction: a block's packed weights (taps x kc x 48 floats) within 128 KiB,
// in L2, in near-equal blocks (measured, one thread, Zen 4, 3x3 64->64 at 56x56: 24 / 48 / 128 / 512
// KiB 75 / 86 / 101 / 96 GFLOP/s).
inline int64_t channels_last_kc(const Conv2dParams& q) {
  const int64_t KK = q.kernel_h * q.kernel_w, Cg = q.in_channels_per_group();
  const int64_t most = std::max<int64_t>(1, (128 * 1024) / (KK * kClWidth * 4));
  return ceil_div(Cg, ceil_div(Cg, most));
}

// A group's output channels in blocks of 1-3 vectors, the vectors spread evenly (64: 2 + 2, 256: 3+3+3+3
// +2+2): a 1-vector block broadcasts one input float per FMA. Block j: vectors [first(j), first(j + 1)).
struct ClBlocks {
  int64_t vectors, count;
  explicit ClBlocks(int64_t OCg) : vectors(ceil_div(OCg, 16)), count(ceil_div(vectors, kClVectors)) {}
  int64_t first(int64_t j) const { return vectors * j / count; }
};

// How forward_channels_last finds element (o, c, t) of group g's weights (o < OCg, c < Cg, tap t < KK of
// the convolution q it computes):
//   kOIT: [g*OCg + o][c][t], NCHW-contiguous weights;
//   kOTI: [g*OCg + o][t][c], channels_last weights as they are;
//   kFlippedOTI: q is a backward-input as a forward (flipped_conv.h, or one phase of a strided one) and
//     the weights are the original convolution's, channels_last: [g*Cg + c][tap][o] (its output channels
//     are q's input channels, its input channels q's output channels), q's tap t being its tap
//     ClTaps::of[t] (stride 1: KK-1-t, the flip). No transposed copy is made: the lanes (q's output
//     channels) are consecutive floats.
enum class ClWeights { kOIT, kOTI, kFlippedOTI };

// kFlippedOTI's taps: q's tap t is tap of[t] of the original convolution's `count` (empty: the flip of
// q's own KK taps).
struct ClTaps {
  std::vector<int64_t> of;
  int64_t count = 0;
};

// dst[off[c*KK + t], + 16) = the `on` (<= 16) floats at src[(c*taps.count + taps.of[t])*ld], zeros after them,
// for c < C, t < KK: kFlippedOTI's vectors of one group's 16 output channels.
FASTCONV_AVX512 inline void copy_flipped_lanes(const float* src, int64_t C, int64_t KK, int64_t ld, int64_t on,
                                               const int64_t* off, const ClTaps& taps, float* dst) {
  const __mmask16 m = lane_mask(0, on);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < KK; ++t)
      _mm512_store_ps(dst + off[c * KK + t], _mm512_maskz_loadu_ps(m, src + (c * taps.count + taps.of[t]) * ld));
  }
}

// The weights as [g][o block][c block][tap][c][48] (o block: ClBlocks' vectors of output channels, zero
// past the group's last; c block: kc channels): 16x16 register transposes of 16 weight rows (kOIT, kOTI),
// or loads of 16 consecutive output channels (kFlippedOTI). One block of output channels at a time
// (pack_block), or all of them over the threads (pack_channels_last_weights).
struct ClWeightPacker {
  const float* weight;
  int64_t OCg, Cg, KK, block;
  ClBlocks blocks;
  ClWeights order;
  std::vector<int64_t> dst_off;  // where (c, t)'s 48 floats start within a block, at (c, t)'s place in a row
  ClTaps taps;                   // kFlippedOTI's
  ClWeightPacker(const float* weight_, const Conv2dParams& q, int64_t kc, ClWeights order_, const ClTaps* source_taps)
      : weight(weight_),
        OCg(q.out_channels_per_group()),
        Cg(q.in_channels_per_group()),
        KK(q.kernel_h * q.kernel_w),
        block(Cg * KK * kClWidth),
        blocks(OCg),
        order(order_),
        dst_off(Cg * KK) {
    // a weight row's (c, t) at c*KK + t ([c][t], and kFlippedOTI's walk) or t*Cg + c ([t][c])
    for (int64_t c0 = 0; c0 < Cg; c0 += kc) {
      const int64_t len = std::min(kc, Cg - c0);
      for (int64_t c = c0; c < c0 + len; ++c) {
        for (int64_t t = 0; t < KK; ++t)
          dst_off[order == ClWeights::kOTI ? t * Cg + c : c * KK + t] = (c0 * KK + t * len + (c - c0)) * kClWidth;
      }
    }
    if (source_taps) {
      taps = *source_taps;
    } else if (order == ClWeights::kFlippedOTI) {
      taps.count = KK;
      for (int64_t t = 0; t < KK; ++t) taps.of.push_back(KK - 1 - t);
    }
  }
  // vector v of block ob of group g (nothing past the block's vectors: never read)
  void pack_vector(float* packed, int64_t g, int64_t ob, int64_t v) const {
    if (blocks.first(ob) + v >= blocks.first(ob + 1)) return;
    const int64_t o0 = 16 * (blocks.first(ob) + v), on = std::min<int64_t>(16, OCg - o0);
    float* dst = packed + (g * blocks.count + ob) * block + 16 * v;
    const int64_t* off = dst_off.data();
    if (order == ClWeights::kFlippedOTI) {
      copy_flipped_lanes(weight + g * Cg * taps.count * OCg + o0, Cg, KK, OCg, on, off, taps, dst);
      return;
    }
    // 16 rows o of [c][t] or [t][c], transposed: column i is the vector of (c, t) at off[i]
    transpose_columns(weight + (g * OCg + o0) * Cg * KK, Cg * KK, on, Cg * KK,
                      [&](int64_t i, __m512 col) FASTCONV_AVX512 { _mm512_store_ps(dst + off[i], col); });
  }
  void pack_block(float* packed, int64_t g, int64_t ob) const {
    for (int64_t v = 0; v < kClVectors; ++v) pack_vector(packed, g, ob, v);
  }
};

inline void pack_channels_last_weights(const ClWeightPacker& packer, int64_t G, float* packed) {
  const int64_t obs = packer.blocks.count;
  at::parallel_for(0, G * obs * kClVectors, grain_for(packer.Cg * packer.KK * 16), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      packer.pack_vector(packed, b / (obs * kClVectors), (b / kClVectors) % obs, b % kClVectors);
  });
}

// The NHWC input as the kernel reads it: pixel (n, y, x) of the (padded) input at base + ((n*Hp + y)*Wp +
// x)*C, its channel c at + c.
struct ClInput {
  const float* base;
  int64_t Hp, Wp, C;
};

// The input in place where nothing is padded and the taps stay inside, else a zero-padded NHWC copy (rows
// the taps reach).
// The padded copy's rows and columns (channels_last_input): the input's and its padding before, or as far
// as the taps reach if that is further.
inline int64_t channels_last_padded_rows(const Conv2dParams& q) {
  return std::max(q.in_h + q.pad_h, (q.out_h - 1) * q.stride_h + (q.kernel_h - 1) * q.dilation_h + 1);
}
inline int64_t channels_last_padded_cols(const Conv2dParams& q) {
  return std::max(q.in_w + q.pad_w, (q.out_w - 1) * q.stride_w + (q.kernel_w - 1) * q.dilation_w + 1);
}

inline ClInput channels_last_input(const float* input, const Conv2dParams& q, AlignedBuffer& buf) {
  const int64_t C = q.in_channels, H = q.in_h, W = q.in_w;
  const int64_t Hp = channels_last_padded_rows(q), Wp = channels_last_padded_cols(q);
  // in place where nothing is padded and the taps stay inside (a phase of a strided backward-input may
  // read past the last row or column: zeros)
  if (q.pad_h == 0 && q.pad_w == 0 && Hp == H && Wp == W) return {input, H, W, C};
  float* dst = buf.get(q.batch * Hp * Wp * C);
  at::parallel_for(0, q.batch * Hp, grain_for(Wp * C), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / Hp, y = b % Hp, ih = y - q.pad_h;
      float* row = dst + b * Wp * C;
      if (ih < 0 || ih >= H) {
        std::memset(row, 0, sizeof(float) * Wp * C);
        continue;
      }
      // input columns [0, W) land in the copy's columns [pad_w, pad_w + W), cropped to Wp
      const int64_t x1 = std::min(Wp, q.pad_w + W);
      std::memset(row, 0, sizeof(float) * q.pad_w * C);
      std::memcpy(row + q.pad_w * C, input + (n * H + ih) * W * C, sizeof(float) * (x1 - q.pad_w) * C);
      std::memset(row + x1 * C, 0, sizeof(float) * (Wp - x1) * C);
    }
  });
  return {dst, Hp, Wp, C};
}

// out (NHWC) = conv(input (NHWC), weight) + bias (ReLU); the weights in the order `order` says (and for
// kFlippedOTI, source_taps: the taps that q's are, default the flip); output pixel r's channels at
// out + out_pixels[r] (default r * out_channels: out_pixels places a phase's pixels in grad_input).
inline void forward_channels_last(const float* input, const float* weight, const float* bias, float* out,
                                  const Conv2dParams& q, bool relu, ClWeights order = ClWeights::kOIT,
                                  const ClTaps* source_taps = nullptr, const int64_t* out_pixels = nullptr) {
  const int64_t G = q.groups, OC = q.out_channels, OCg = q.out_channels_per_group(), Cg = q.in_channels_per_group();
  const int64_t NL = q.batch * q.out_plane(), KK = q.kernel_h * q.kernel_w;
  const int64_t kc = channels_last_kc(q), cbs = ceil_div(Cg, kc);
  const ClBlocks blocks(OCg);
  const int64_t obs = blocks.count;
  // per calling thread, kept across calls (fresh buffers page-fault on every call); written before read
  thread_local AlignedBuffer copy_buf(false), w_buf(false);
  const ClInput x = channels_last_input(input, q, copy_buf);
  float* wp = w_buf.get(G * obs * Cg * KK * kClWidth);
  const ClWeightPacker packer(weight, q, kc, order, source_taps);
  const std::vector<int64_t> tap_off = nhwc_tap_offsets(q, x.Wp, x.C);
  std::vector<int64_t> pixel_off;  // each output pixel's top-left tap in the input
  nhwc_pixel_offsets(q, x.Hp, x.Wp, x.C, pixel_off);
  // pixel blocks of about 96 (12 tiles of 8), as many as a multiple of the threads: 17 blocks of 96 on 2
  // threads had one wait for the other (measured, 2 threads, Zen 4: 1x1 1024->256 at 14x14, batch 8,
  // and 256->144 at 28x28, batch 1: 0.90x the time of blocks of 96 and a short last one)
  const BalancedItems pixel_blocks(NL, 96, kClRows);
  const int64_t np = pixel_blocks.count, threads = at::get_num_threads();
  // Tasks (group, pixel block): the block's input rows stay in L1/L2 across the output channel blocks
  // while a reduction block's weights for all of them (OCg x taps x kc floats) sit in L2.
  // With one pixel block a thread (batch 1, small planes) the tasks are (group, block of output channels)
  // over every pixel instead, each packing its own block's weights: a thread reads only weights it
  // packed. Pixel blocks read every block's weights, packed by both threads: on this host that ran at
  // two speeds from one minute to the next (AlexNet conv5 at batch 1: 1.02 or 1.5 ms; 1.9-2.3 ms with the
  // weights packed by one thread), as if the other core's writes had to travel; torch's did not. This
  // way: 0.95-0.98 ms, steady; in-process against the pixel blocks, batch 1: AlexNet conv3-5 forward
  // 0.93-0.98, backward-input 0.71-0.98, 3x3 512 at 7x7 0.96 / 0.90, ResNet's 3x3/2 256->512 phases of
  // grad_input 0.59, 1x1 1024->2048 at 7x7 1.02 / 1.04.
  const bool by_channels = np <= threads && G * obs >= threads;
  // one reduction block of fewer than 16 channels a group: a flat list of (tap, channel) offsets
  // (channels_last_tile_flat). Measured in-process, 2 threads, Zen 4, against the per-tap tile: the
  // MNIST CNN's conv1 at batch 100/512 0.82/0.81x the time, SimpleConvNet's 5x5 conv1 0.79x, 3x3 3->64
  // 0.88x, 3x3/2 3->32 0.89x, 3x3 8->32 0.90x; from 16 channels within noise (0.96-1.02x).
  const bool flat = cbs == 1 && Cg < 16;
  const bool stream = cbs == 1 && 4 * (NL * OC + q.batch * q.in_plane() * q.in_channels) > kClStreamBytes;
  // group g's (tap, channel) offsets of reduction block cb into aoff
  const auto set_offsets = [&](int64_t g, int64_t cb, std::vector<int64_t>& aoff) {
    const int64_t c0 = cb * kc;
    if (flat) {
      for (int64_t t = 0; t < KK; ++t) {
        for (int64_t c = 0; c < Cg; ++c) aoff[t * Cg + c] = tap_off[t] + g * Cg + c;
      }
    } else {
      for (int64_t t = 0; t < KK; ++t) aoff[t] = tap_off[t] + g * Cg + c0;
    }
  };
  // output-channel block ob of group g, reduction block cb, over the pixels [q0, q1)
  const auto run_block = [&](int64_t g, int64_t ob, int64_t cb, int64_t q0, int64_t q1, const int64_t* aoff) {
    const float* src[kClRows];
    float* dst[kClRows];
    const int64_t c0 = cb * kc, len = std::min(kc, Cg - c0);
    const int64_t o0 = 16 * blocks.first(ob);
    const int nv = static_cast<int>(blocks.first(ob + 1) - blocks.first(ob));
    const int64_t on = std::min<int64_t>(16 * nv, OCg - o0);
    const float* wb = wp + (g * obs + ob) * Cg * KK * kClWidth + c0 * KK * kClWidth;
    ClTileDest d{dst,
                 lane_mask(0, on - 16 * (nv - 1)),
                 cb > 0 ? Init::kAccumulate
                 : bias ? Init::kBias
                        : Init::kZero,
                 bias ? bias + g * OCg + o0 : nullptr,
                 relu && cb == cbs - 1,
                 stream};
    for (int64_t r0 = q0; r0 < q1; r0 += kClRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kClRows, q1 - r0));
      for (int i = 0; i < kClRows; ++i) {
        const int64_t r = r0 + std::min(i, mr - 1);
        src[i] = x.base + pixel_off[r];
        dst[i] = out + (out_pixels ? out_pixels[r] : r * OC) + g * OCg + o0;
      }
      run_channels_last_tile(mr, nv, src, aoff, flat ? KK * Cg : KK, len, wb, d, flat);
    }
  };
  if (by_channels) {
    // thread t takes the blocks t, t + threads, ...: 6 blocks of 3,3,3,3,2,2 vectors split 8 / 8
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      std::vector<int64_t> aoff(flat ? KK * Cg : KK);
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t j = t; j < G * obs; j += threads) {
          const int64_t g = j / obs, ob = j % obs;
          packer.pack_block(wp, g, ob);
          for (int64_t cb = 0; cb < cbs; ++cb) {
            set_offsets(g, cb, aoff);
            run_block(g, ob, cb, 0, NL, aoff.data());
          }
        }
      }
      if (stream) _mm_sfence();  // the non-temporal stores visible before the threads join
    });
    return;
  }
  pack_channels_last_weights(packer, G, wp);
  at::parallel_for(0, G * np, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> aoff(flat ? KK * Cg : KK);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g = b / np, pi = b % np;
      const int64_t q0 = pixel_blocks.begin(pi), q1 = pixel_blocks.end(pi);
      for (int64_t cb = 0; cb < cbs; ++cb) {
        set_offsets(g, cb, aoff);
        for (int64_t ob = 0; ob < obs; ++ob) run_block(g, ob, cb, q0, q1, aoff.data());
      }
    }
    if (stream) _mm_sfence();  // the non-temporal stores visible before the threads join
  });
}

}  // namespace engine
}  // namespace cpu
}  // namespace fastconv
#endif  // FASTCONV_HAVE_AVX512_KERNELS
