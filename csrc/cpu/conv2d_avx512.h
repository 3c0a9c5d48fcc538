// The float32 conv2d engine on AVX-512: implicit im2col into packed panels + the register-blocked
// micro-kernel of gemm.h, for the forward pass, backward-input and backward-weight.
//
// Pixels are flattened over the whole batch, g = n*OH*OW + oh*OW + ow, and cut into work items of a
// few 48-pixel panels; a panel may straddle two images (its stores split in two, see TileDest), so
// no lanes are wasted on per-image tails and batch 1 still has as many items as pixels allow.
//
// forward, per item:    for each k-block (<= 512 rows of C*KH*KW):
//                         pack the item's columns: panel[p][k][48] (im2col straight into the layout
//                         the micro-kernel streams, 64-byte aligned rows)
//                         for each block of 8 output channels (8 rows of the weight tensor, in L1):
//                           for each panel (in L2): 8 x 48 tile += W(8 x kc) * panel(kc x 48)
// backward-input:       stride 1: the forward engine on grad_output with the flipped, transposed
//                         weights (a full convolution; col2im becomes an im2col, no scatter, no races).
//                       stride > 1: per image, grad_cols = W^T grad_output tile by tile, then col2im.
// backward-weight:      per item, grad_W^T[k][oc] += cols[k][px] * grad_output^T[px][oc] with the pixels
//                         as the long reduction; one partial per slot of items, summed in a fixed order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "conv_params.h"
#include "cpu/flipped_conv.h"
#include "cpu/gemm.h"
#include "cpu/im2col.h"

#if FASTCONV_HAVE_AVX512_KERNELS
namespace fastconv {
namespace cpu {
namespace engine {

constexpr int64_t kMaxBlockK = 512;                // reduction rows per block: an 8 x 512 weight panel is 16 KiB (L1)
constexpr int64_t kColumnBlockBytes = 192 * 1024;  // one item's packed columns per k-block (L2; at least)
constexpr int64_t kPanel = kTileCols;              // 48 pixels per panel
constexpr int64_t kMaxPartialBytes = 1 << 20;      // backward-weight: per-thread partials up to L2's size
constexpr int64_t kPanelPad = 16;                  // floats after each packed panel (spacing)

// 64-byte aligned scratch. Every lane a kernel reads is either written first or lies in a lane whose
// result is never stored (the junk lanes of partial vectors), but junk lanes still go through the
// FMAs: new memory is zeroed once, because recycled heap memory holds whatever was freed there, and
// freed int64 tensors (max-pool indices: small integers) read as float denormals, each of which
// costs the FMA a microcode assist. Measured: AlexNet conv3's forward at batch 1 took 12.4 ms
// instead of 0.64 ms after a 160 MB tensor of small int64s had been freed (the suite's outlier rows).
// After that the buffer only ever holds floats the kernels wrote. Buffers that live for one call and
// are written in full before any read are made with zero_new = false: zeroing them would be a pass
// over them on every call (8 MB a call for LeNet conv2's padded grad_output at batch 512: 1.2-1.27x its
// backward-input's time).
struct AlignedBuffer {
  std::unique_ptr<float, decltype(&std::free)> mem{nullptr, &std::free};
  int64_t size = 0;
  bool zero_new = true;
  AlignedBuffer() = default;
  explicit AlignedBuffer(bool zero) : zero_new(zero) {}
  float* get(int64_t n) {
    if (n > size) {
      const size_t bytes = ((static_cast<size_t>(n) * sizeof(float) + 63) / 64) * 64;
      mem.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      TORCH_CHECK(mem, "fastconv: out of memory allocating ", bytes, " bytes of scratch");
      if (zero_new) std::memset(mem.get(), 0, bytes);
      size = n;
    }
    return mem.get();
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grain for at::parallel_for over tasks of `work` floats each: small jobs run on the calling thread
// (waking the pool costs microseconds, which batch-1 calls of small layers would pay several times).
inline int64_t grain_for(int64_t work) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, work)); }

struct KBlocks {  // [0, K) cut into near-equal blocks of at most `most` rows
  int64_t count, size;
  KBlocks(int64_t K, int64_t most) : count(std::max<int64_t>(1, ceil_div(K, most))), size(ceil_div(K, count)) {}
};

// A run of output pixels of one output row that lands in one panel: computed once per item, so the
// per-row work of pack_columns has no divisions.
struct Segment {
  int64_t image_offset;  // n * in_channels * H * W
  int64_t ih0;           // oh * stride_h - pad_h
  int64_t ow0, len;      // output columns [ow0, ow0 + len)
  int64_t dst;           // offset of its first element in a packed row block
};

// The segments of flattened pixels [g0, g1) for panels of `pw` pixels, `panel_stride` floats apart.
inline void make_segments(const Conv2dParams& p, int64_t g0, int64_t g1, int64_t pw, int64_t panel_stride,
                          std::vector<Segment>& segs) {
  segs.clear();
  const int64_t OW = p.out_w, L = p.out_plane();
  for (int64_t g = g0; g < g1;) {
    const int64_t n = g / L, q = g % L, oh = q / OW, ow0 = q % OW, t = g - g0;
    const int64_t len = std::min({OW - ow0, g1 - g, pw - t % pw});
    segs.push_back(
        {n * p.in_channels * p.in_plane(), oh * p.stride_h - p.pad_h, ow0, len, (t / pw) * panel_stride + t % pw});
    g += len;
  }
}

// One kernel tap (kh, kw) of pack_columns: the input row offset and the output columns [lo, hi)
// whose input column lies inside the image.
struct PackTap {
  int64_t dh, off_w, lo, hi;
};

// 16 outputs of columns [ow, ow + 16) from the input row `src` (already offset by the tap's column),
// lanes outside `valid` zero. SW: the column stride (1, 2 and 4 by loads and permutes; 0: any other,
// by a gather).
template <int SW>
FASTCONV_AVX512 inline __m512 load_columns(const float* src, int64_t ow, __mmask16 valid, int64_t stride_w) {
  if constexpr (SW == 1) {
    return _mm512_maskz_loadu_ps(valid, src + ow);
  } else if constexpr (SW == 2) {
    // 32 contiguous floats per 16 outputs, the even ones picked by a permute
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const uint32_t pairs = _pdep_u32(valid, 0x55555555u) | _pdep_u32(valid, 0xAAAAAAAAu);
    const float* s0 = src + 2 * ow;
    const __m512 v0 = _mm512_maskz_loadu_ps(__mmask16(pairs), s0);
    const __m512 v1 = _mm512_maskz_loadu_ps(__mmask16(pairs >> 16), s0 + 16);
    return _mm512_permutex2var_ps(v0, even, v1);
  } else if constexpr (SW == 4) {
    // AlexNet's conv1: 64 contiguous floats per 16 outputs, every fourth picked by two permutes
    const __m512i fourth = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
    const float* s0 = src + 4 * ow;
    __m512 q[4];
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm512_maskz_loadu_ps(__mmask16(_pdep_u32((uint32_t(valid) >> (4 * i)) & 0xF, 0x1111u)), s0 + 16 * i);
    }
    const __m512 lo8 = _mm512_permutex2var_ps(q[0], fourth, q[1]), hi8 = _mm512_permutex2var_ps(q[2], fourth, q[3]);
    return _mm512_shuffle_f32x4(lo8, hi8, 0x44);
  } else {  // other strides: a masked gather of every sw-th float
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(stride_w)));
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, src + ow * stride_w, 4);
  }
}

// Packs one segment's vectors for `count` taps of one channel into rows d, d + pw, ... of the panel.
// Stores are masked to the segment's lanes, so the order in which segments and rows are written does
// not matter.
template <int SW>
FASTCONV_AVX512 __attribute__((always_inline)) inline void pack_segment(const float* img, const Conv2dParams& p,
                                                                        const Segment& s, const PackTap* taps,
                                                                        int64_t count, int64_t pw, float* d) {
  const int64_t H = p.in_h, W = p.in_w, ow = s.ow0, len = s.len;
  // one vector (rows of up to 16 pixels, or a row's piece at a panel's end): a loop of its own, since
  // through the one below 7- and 14-pixel segments packed 1.13-1.2x slower (one thread, Intel host)
  if (len <= 16) {
    const __mmask16 lanes = lane_mask(0, len);
    for (int64_t t = 0; t < count; ++t, d += pw) {
      const PackTap& tap = taps[t];
      const int64_t ih = s.ih0 + tap.dh;
      __m512 v = _mm512_setzero_ps();
      if (ih >= 0 && ih < H) {
        const __mmask16 valid = ow >= tap.lo && ow + len <= tap.hi
                                    ? lanes
                                    : lane_mask(std::max(tap.lo - ow, int64_t(0)), std::min(tap.hi, ow + len) - ow);
        v = load_columns<SW>(img + ih * W + tap.off_w, ow, valid, p.stride_w);
      }
      _mm512_mask_storeu_ps(d, lanes, v);
    }
    return;
  }
  if (len <= 64) {  // up to 4 vectors: their lane masks once per segment, not once per tap
    __mmask16 lanes[4];
    const int nv = static_cast<int>(ceil_div(len, 16));
    for (int x = 0; x < nv; ++x) lanes[x] = lane_mask(0, len - 16 * x);
    for (int64_t t = 0; t < count; ++t, d += pw) {
      const PackTap& tap = taps[t];
      const int64_t ih = s.ih0 + tap.dh;
      if (ih < 0 || ih >= H) {
        for (int x = 0; x < nv; ++x) _mm512_mask_storeu_ps(d + 16 * x, lanes[x], _mm512_setzero_ps());
        continue;
      }
      const float* src = img + ih * W + tap.off_w;
      const bool inside = ow >= tap.lo && ow + len <= tap.hi;
      for (int x = 0; x < nv; ++x) {
        const int64_t o = ow + 16 * x;
        const __mmask16 valid =
            inside ? lanes[x] : lane_mask(std::max(tap.lo - o, int64_t(0)), std::min(tap.hi, ow + len) - o);
        _mm512_mask_storeu_ps(d + 16 * x, lanes[x], load_columns<SW>(src, o, valid, p.stride_w));
      }
    }
    return;
  }
  for (int64_t t = 0; t < count; ++t, d += pw) {
    const PackTap& tap = taps[t];
    const int64_t ih = s.ih0 + tap.dh;
    const bool row_inside = ih >= 0 && ih < H;
    const float* src = img + ih * W + tap.off_w;
    for (int64_t x = 0; x < len; x += 16) {
      const __mmask16 lanes = lane_mask(0, len - x);
      __m512 v = _mm512_setzero_ps();
      if (row_inside) {
        const __mmask16 valid =
            lane_mask(std::max(tap.lo - (ow + x), int64_t(0)), std::min(tap.hi, ow + len) - (ow + x));
        v = load_columns<SW>(src, ow + x, valid, p.stride_w);
      }
      _mm512_mask_storeu_ps(d + x, lanes, v);
    }
  }
}

// pack_columns for column stride SW: one input channel at a time, each segment's rows of it together.
template <int SW>
FASTCONV_AVX512 inline void pack_channels(const float* input, const Conv2dParams& p, int64_t channel0, int64_t k0,
                                          int64_t k1, const std::vector<Segment>& segs, int64_t pw, const PackTap* taps,
                                          float* dst) {
  const int64_t KK = p.kernel_h * p.kernel_w, plane = p.in_h * p.in_w;
  for (int64_t kb = k0; kb < k1;) {
    const int64_t r0 = kb % KK, count = std::min(k1, kb - r0 + KK) - kb;
    const float* chan = input + (channel0 + kb / KK) * plane;
    float* rows = dst + (kb - k0) * pw;
    for (const Segment& s : segs) pack_segment<SW>(chan + s.image_offset, p, s, taps + r0, count, pw, rows + s.dst);
    kb += count;
  }
}

// Columns of the flattened pixels of `segs` for rows [k0, k1) of one group's column matrix, into
// dst[(t / pw)][k - k0][t % pw] (t = g - g0; panels (k1-k0)*pw floats apart, as make_segments was
// told). `channel0` is the group's first input channel. Rows that fall in the padding are zeros.
// One input channel at a time, each segment's rows of that channel together: a segment's setup is
// paid once per channel rather than once per row, and the channel's input rows stay in L1 across its
// KH*KW rows (measured, one thread, Intel host: 18-38 cycles per packed vector of 16 row by row on
// 3x3/2 layers with 7-14 pixel output rows).
FASTCONV_AVX512 inline void pack_columns(const float* input, const Conv2dParams& p, int64_t channel0, int64_t k0,
                                         int64_t k1, const std::vector<Segment>& segs, int64_t pw, float* dst) {
  const int64_t OW = p.out_w, W = p.in_w, KK = p.kernel_h * p.kernel_w;
  constexpr int64_t kInlineTaps = 64;
  PackTap inline_taps[kInlineTaps];
  std::vector<PackTap> heap_taps;
  PackTap* taps = inline_taps;
  if (KK > kInlineTaps) {
    heap_taps.resize(KK);
    taps = heap_taps.data();
  }
  for (int64_t r = 0; r < KK; ++r) {
    const int64_t kh = r / p.kernel_w, kw = r % p.kernel_w;
    PackTap& t = taps[r];
    t.dh = kh * p.dilation_h;
    t.off_w = kw * p.dilation_w - p.pad_w;
    t.lo = t.off_w >= 0 ? 0 : ceil_div(-t.off_w, p.stride_w);
    t.hi = W - t.off_w <= 0 ? 0 : ceil_div(W - t.off_w, p.stride_w);
    t.lo = std::min(t.lo, OW);
    t.hi = std::clamp(t.hi, t.lo, OW);
  }
  switch (p.stride_w) {
    case 1:
      return pack_channels<1>(input, p, channel0, k0, k1, segs, pw, taps, dst);
    case 2:
      return pack_channels<2>(input, p, channel0, k0, k1, segs, pw, taps, dst);
    case 4:
      return pack_channels<4>(input, p, channel0, k0, k1, segs, pw, taps, dst);
    default:
      return pack_channels<0>(input, p, channel0, k0, k1, segs, pw, taps, dst);
  }
}

// Output stores of a panel of flattened pixels [gp, gp + 48) (clipped to `end`) into an NCHW tensor
// with `channels` channels, starting at channel `ch0`. Returns false when a 16-pixel vector spans
// more than two images (planes under 16 pixels): the caller then goes through a scratch tile.
inline bool panel_dest(float* out, int64_t channels, int64_t L, int64_t ch0, int64_t gp, int64_t end, int nv,
                       TileDest& d) {
  d.ldc = L;
  for (int v = 0; v < nv; ++v) {
    const int64_t g = gp + 16 * v, cnt = std::clamp<int64_t>(end - g, 0, 16);
    d.ptr[v][0] = d.ptr[v][1] = out;
    d.mask[v][0] = d.mask[v][1] = 0;
    if (cnt == 0) continue;
    const int64_t n = g / L, q = g % L;
    float* base = out + (n * channels + ch0) * L;
    d.ptr[v][0] = base + q;
    d.mask[v][0] = lane_mask(0, std::min(cnt, L - q));
    if (q + cnt > L) {
      if (cnt - (L - q) > L) return false;
      d.ptr[v][1] = base + channels * L - (L - q);  // image n+1, pixel j - (L - q) for lane j
      d.mask[v][1] = lane_mask(L - q, cnt);
    }
  }
  return true;
}

// The engine's A operand, what its micro-kernel broadcasts from: element (row i, column k) of group g
// at data[g*group_stride + (i/8)*block_stride + (i%8)*rs + k*cs]. The forward weights as they are,
// [g][o][k] (rs K, cs 1, blocks 8K apart), packed [g][ob][k][8] (rs 1, cs 8, blocks 8K apart), or the
// transposed weights of backward-input read in place, W^T (rs 1, cs K, blocks 8 apart).
struct FlippedWeights;

struct WeightsA {
  const float* data;
  int64_t group_stride, block_stride, rs, cs;
  // set: the flipped, transposed weights of a stride-1 backward-input, packed block by block as the
  // GEMM reaches them (flipped_block), `data` unused
  const FlippedWeights* flipped = nullptr;
  const float* block(int64_t g, int64_t ob, int64_t k0) const {
    return data + g * group_stride + ob * block_stride + k0 * cs;
  }
};

// The forward pass reads the weight tensor as it is: eight rows of it per block of output channels,
// each streamed contiguously. Measured against packing them into [ob][k][8] on every call (2 threads,
// Zen 4): never slower, 7-8% faster on ResNet layer4's 512x4608 weights at batch 8, 1.6x at batch 1
// (packing 9.4 MB cost more than the reuse it bought).
inline WeightsA forward_weights(const float* weight, const Conv2dParams& p) {
  const int64_t Kg = p.col_rows_per_group();
  return {weight, p.out_channels_per_group() * Kg, kTileRows * Kg, Kg, 1};
}

// packed[g][b][o][r] = w[g*OCg + o][8b + r] (zero past Kg): the weights' rows cut into blocks of 8
// columns, each block an [OCg][8] A operand (W^T, 8 rows of it per block). 16 weight rows at a time,
// each read front to back across the blocks: 16 sequential streams the prefetchers follow (block by
// block, each step had read 32 bytes from every row, Kg floats apart).
inline void transpose_weight_blocks(const float* weight, int64_t G, int64_t OCg, int64_t Kg, float* packed) {
  constexpr int64_t kRowsPerTask = 16;
  const int64_t kb = ceil_div(Kg, kTileRows), chunks = ceil_div(OCg, kRowsPerTask);
  at::parallel_for(0, G * chunks, grain_for(kRowsPerTask * Kg), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / chunks, o0 = (t % chunks) * kRowsPerTask, o1 = std::min(OCg, o0 + kRowsPerTask);
      for (int64_t b = 0; b < kb; ++b) {
        const int64_t r0 = b * kTileRows, nr = std::min<int64_t>(kTileRows, Kg - r0);
        float* dst = packed + (g * kb + b) * OCg * kTileRows;
        for (int64_t o = o0; o < o1; ++o) {
          const float* src = weight + (g * OCg + o) * Kg + r0;
          if (nr == kTileRows) {
            std::memcpy(dst + o * kTileRows, src, kTileRows * sizeof(float));
          } else {
            for (int64_t r = 0; r < kTileRows; ++r) dst[o * kTileRows + r] = r < nr ? src[r] : 0.f;
          }
        }
      }
    }
  });
}

// The first two steps of the register transposes below, for N rows (a multiple of 4): within every
// 128-bit lane, each group of 4 rows' 4x4 block transposed (r[4a + j] lane 4c + i <- r[4a + i] lane 4c + j).
template <int N>
FASTCONV_AVX512 inline void transpose_4x4_blocks(__m512 r[N]) {
  __m512 t[N];
  for (int i = 0; i < N; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < N; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
}

// Two independent 8x8 transposes, one in each 256-bit half of r: r[i] lane j -> r[j] lane i per half.
FASTCONV_AVX512 inline void transpose8_pairs(__m512 r[8]) {
  __m512 u[8];
  transpose_4x4_blocks<8>(r);
  for (int i = 0; i < 8; ++i) u[i] = r[i];
  // per half: the low 128 bits of u[i] and u[i + 4], then the high ones
  const __m512i lo = _mm512_set_epi32(27, 26, 25, 24, 11, 10, 9, 8, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i hi = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 23, 22, 21, 20, 7, 6, 5, 4);
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_permutex2var_ps(u[i], lo, u[i + 4]);
    r[i + 4] = _mm512_permutex2var_ps(u[i], hi, u[i + 4]);
  }
}

// dst[j][8] = src[r][KK-1-j] for the `rows` (<= 8) rows of KK floats at src (rows past `rows` zero),
// for two weight rows at once (src0 -> dst0, src1 -> dst1; dst1 null: src0 alone), one in each half of
// the registers: the shuffles of a transpose serve both. The last columns, when at most 4 are left
// (the ninth tap of a 3x3 kernel), are gathered one column at a time instead.
FASTCONV_AVX512 inline void flip_transpose_row_pairs(const float* src0, const float* src1, int64_t rows, int64_t KK,
                                                     float* dst0, float* dst1) {
  int64_t j0 = 0;
  for (; KK - j0 > 4; j0 += 8) {
    const int64_t n = std::min<int64_t>(8, KK - j0);
    const __mmask8 m = static_cast<__mmask8>((1u << n) - 1);
    __m512 r[8];
    for (int i = 0; i < 8; ++i) {
      r[i] = i < rows ? _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_maskz_loadu_ps(m, src0 + i * KK + j0)),
                                           _mm256_maskz_loadu_ps(m, (dst1 ? src1 : src0) + i * KK + j0), 1)
                      : _mm512_setzero_ps();
    }
    transpose8_pairs(r);
    for (int64_t jj = 0; jj < n; ++jj) {
      _mm256_storeu_ps(dst0 + (KK - 1 - (j0 + jj)) * kTileRows, _mm512_castps512_ps256(r[jj]));
      if (dst1) _mm256_storeu_ps(dst1 + (KK - 1 - (j0 + jj)) * kTileRows, _mm512_extractf32x8_ps(r[jj], 1));
    }
  }
  if (j0 < KK) {
    const __m256i idx = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32(int(KK)));
    const __mmask8 m = static_cast<__mmask8>((1u << rows) - 1);
    for (int64_t j = j0; j < KK; ++j) {
      _mm256_storeu_ps(dst0 + (KK - 1 - j) * kTileRows,
                       _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), m, idx, src0 + j, 4));
      if (dst1) {
        _mm256_storeu_ps(dst1 + (KK - 1 - j) * kTileRows,
                         _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), m, idx, src1 + j, 4));
      }
    }
  }
}

// The forward weights of a stride-1 backward-input whose flipped, transposed weights
// (pack_flipped_weights_by_8's layout) are packed one 8-row block and k-block at a time.
struct FlippedWeights {
  const float* weight;
  int64_t Cg, OCg, KK;
};

// Input channels [c0, c0 + 8) of group g's output channels [o0, o1), flipped and transposed into dst
// (pack_flipped_weights_by_8's layout for that 8-row block, from o0's KK x 8 floats on), two output
// channels per register pass.
FASTCONV_AVX512 inline void flip_transpose_channels(const FlippedWeights& f, int64_t g, int64_t c0, int64_t o0,
                                                    int64_t o1, float* dst) {
  const int64_t KK = f.KK, rows = std::min<int64_t>(kTileRows, f.Cg - c0);
  const auto src = [&](int64_t o) { return f.weight + ((g * f.OCg + o) * f.Cg + c0) * KK; };
  const auto out = [&](int64_t o) { return dst + (o - o0) * KK * kTileRows; };
  int64_t o = o0;
  for (; o + 1 < o1; o += 2) flip_transpose_row_pairs(src(o), src(o + 1), rows, KK, out(o), out(o + 1));
  if (o < o1) flip_transpose_row_pairs(src(o), nullptr, rows, KK, out(o), nullptr);
}

// Rows [8 ob, 8 ob + 8) and k-rows [k0, k0 + kc) of the flipped, transposed weights of group g in
// pack_flipped_weights_by_8's layout, built in `buf` (at least (kc + 2 KK) * 8 floats): the whole
// output channels o that the k-rows touch (k = o * KK + tap).
FASTCONV_AVX512 inline const float* flipped_block(const FlippedWeights& f, int64_t g, int64_t ob, int64_t k0,
                                                  int64_t kc, float* buf) {
  const int64_t o0 = k0 / f.KK;
  flip_transpose_channels(f, g, ob * kTileRows, o0, ceil_div(k0 + kc, f.KK), buf);
  return buf + (k0 - o0 * f.KK) * kTileRows;
}

// The same layout for the flipped, transposed weights of a stride-1 backward-input (flipped_conv.h)
// straight from the forward weights: row c of group g, column (o, j) = w[g*OCg + o][c][KK-1-j].
inline WeightsA pack_flipped_weights_by_8(const float* weight, const Conv2dParams& p) {
  const int64_t G = p.groups, OCg = p.out_channels_per_group(), Cg = p.in_channels_per_group();
  const int64_t KK = p.kernel_h * p.kernel_w, K = OCg * KK, c_blocks = ceil_div(Cg, kTileRows);
  thread_local AlignedBuffer buf;
  float* packed = buf.get(G * c_blocks * K * kTileRows);
  // 1x1: nothing to flip, each block row is 8 consecutive floats of a weight row (8x8 transposes of
  // one float per row had made this pass 19% of a 2048->512 backward-input at 7x7)
  if (KK == 1) {
    transpose_weight_blocks(weight, G, OCg, Cg, packed);
    return {packed, c_blocks * K * kTileRows, K * kTileRows, 1, kTileRows};
  }
  // Tasks of a pair of weight rows (output channels o, o + 1), each read front to back: consecutive
  // blocks of 8 input channels are consecutive 8*KK floats of a row, which the prefetchers follow
  // (block by block over every o, each step had read 8*KK floats Cg*KK apart).
  const FlippedWeights flipped{weight, Cg, OCg, KK};
  const int64_t pairs = ceil_div(OCg, 2);
  at::parallel_for(0, G * pairs, grain_for(2 * Cg * KK), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / pairs, o = (t % pairs) * 2;
      for (int64_t cb = 0; cb < c_blocks; ++cb) {
        flip_transpose_channels(flipped, g, cb * kTileRows, o, std::min(OCg, o + 2),
                                packed + ((g * c_blocks + cb) * K + o * KK) * kTileRows);
      }
    }
  });
  return {packed, c_blocks * K * kTileRows, K * kTileRows, 1, kTileRows};
}

// How many ways to split the output channels (in blocks of 8) when there are fewer (balanced) pixel
// items than threads (batch 1, small planes), so that every thread works; and the channels per split.
// Each split packs the item's columns again, so no more splits than that (measured, 2 threads: one
// item per thread instead of four, ResNet layer4 3x3 512 forward 6% faster).
inline void channel_split(int64_t pix_items, int64_t oc_blocks, int64_t& splits, int64_t& per_split) {
  splits = std::clamp<int64_t>(ceil_div(at::get_num_threads(), pix_items), 1, oc_blocks);
  per_split = ceil_div(oc_blocks, splits) * kTileRows;
}

// One row of a zero-padded plane (copy_padded): dst[0, Wp) = the input row src[0, cols) at column l, zeros around it,
// 16 floats per masked load and store (std::fill/copy/fill per row were 10% of LeNet conv2's backward-input, whose
// 8-float rows pad to 16).
FASTCONV_AVX512 inline void copy_padded_row(const float* src, int64_t cols, float* dst, int64_t Wp, int64_t l) {
  for (int64_t j = 0; j < Wp; j += 16) {
    const __mmask16 m = lane_mask(l - j, l + cols - j);
    const __m512 v = m ? _mm512_maskz_loadu_ps(m, src + (j - l)) : _mm512_setzero_ps();
    if (j + 16 <= Wp)
      _mm512_storeu_ps(dst + j, v);
    else
      _mm512_mask_storeu_ps(dst + j, lane_mask(0, Wp - j), v);
  }
}

// Zero-padded copies of `planes` H x W planes into Hp x Wp planes, input row h at row top + h and
// column left + w. Input rows and columns that land outside [0, Hp) x [0, Wp) are dropped (callers
// size the planes to what they read; a negative top or left crops the input's start).
inline void copy_padded(const float* src, int64_t planes, int64_t H, int64_t W, float* dst, int64_t Hp, int64_t Wp,
                        int64_t top, int64_t left) {
  const int64_t h0 = std::max<int64_t>(0, -top), w0 = std::max<int64_t>(0, -left);  // first input row/column kept
  const int64_t t = std::min(top + h0, Hp), l = std::min(left + w0, Wp);            // where they land
  const int64_t plane = Hp * Wp, rows = std::max<int64_t>(0, std::min(H - h0, Hp - t));
  const int64_t cols = std::max<int64_t>(0, std::min(W - w0, Wp - l));
  at::parallel_for(0, planes, grain_for(plane), [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      float* d = dst + i * plane;
      const float* s = src + i * H * W + h0 * W + w0;
      std::fill(d, d + t * Wp, 0.f);  // each element written once: zeros only around the copy
      for (int64_t h = 0; h < rows; ++h) copy_padded_row(s + h * W, cols, d + (h + t) * Wp, Wp, l);
      std::fill(d + (t + rows) * Wp, d + plane, 0.f);
    }
  });
}

// out[:, ch0 + o, :, :] for o in [o0, o1), pixels [gp, ...) of one panel, computed into a scratch tile
// when panel_dest cannot express the stores (tiny planes).
struct ScratchTile {
  alignas(64) float v[kTileRows * kTileCols];
};

// One GEMM over a work item: rows [r0, r1) of group `group` of A (WeightsA, reading k-rows
// [k0, k0+kc)), times the item's packed panels, into NCHW `out` (channels
// `channels`, first channel of row 0 `ch0`). init: bias (first k-block) or accumulate.
FASTCONV_AVX512 inline void gemm_item(WeightsA w, int64_t group, int64_t K, int64_t k0, int64_t kc, int64_t r0,
                                      int64_t r1, const float* panels, int64_t g0, int64_t g1, float* out,
                                      int64_t channels, int64_t L, int64_t ch0, Init init, const float* bias,
                                      bool relu) {
  const int64_t npanels = ceil_div(g1 - g0, kPanel);
  thread_local AlignedBuffer flipped_buf;
  for (int64_t ob = r0 / kTileRows; ob * kTileRows < r1; ++ob) {
    const int mr = static_cast<int>(std::min<int64_t>(kTileRows, r1 - ob * kTileRows));
    const float* a =
        w.flipped ? flipped_block(*w.flipped, group, ob, k0, kc, flipped_buf.get((kc + 2 * w.flipped->KK) * kTileRows))
                  : w.block(group, ob, k0);
    const float* bias_b = bias ? bias + ob * kTileRows : nullptr;
    const int64_t row0 = ch0 + ob * kTileRows;
    for (int64_t j = 0; j < npanels; ++j) {
      const int64_t gp = g0 + j * kPanel;
      const int nv = static_cast<int>(std::min<int64_t>(kTileVectors, ceil_div(g1 - gp, 16)));
      const float* b = panels + j * (kc * kPanel + kPanelPad);
      TileDest d;
      if (panel_dest(out, channels, L, row0, gp, g1, nv, d)) {
        run_micro_kernel(mr, nv, kc, a, w.rs, w.cs, PanelB{b, kPanel}, d, init, bias_b, relu);
        continue;
      }
      // tiny planes: through a scratch tile, element by element
      ScratchTile s;
      const int64_t cnt = std::min<int64_t>(kPanel, g1 - gp);
      for (int i = 0; i < mr; ++i) {
        for (int64_t t = 0; t < cnt; ++t) {
          const int64_t g = gp + t;
          s.v[i * kTileCols + t] = init == Init::kAccumulate ? out[((g / L) * channels + row0 + i) * L + g % L] : 0.f;
        }
      }
      TileDest sd;
      sd.ldc = kTileCols;
      for (int v = 0; v < kTileVectors; ++v) {
        sd.ptr[v][0] = sd.ptr[v][1] = s.v + 16 * v;
        sd.mask[v][0] = lane_mask(0, cnt - 16 * v);
        sd.mask[v][1] = 0;
      }
      run_micro_kernel(mr, nv, kc, a, w.rs, w.cs, PanelB{b, kPanel}, sd, init, bias_b, relu);
      for (int i = 0; i < mr; ++i) {
        for (int64_t t = 0; t < cnt; ++t) {
          const int64_t g = gp + t;
          out[((g / L) * channels + row0 + i) * L + g % L] = s.v[i * kTileCols + t];
        }
      }
    }
  }
}

// Pixels per work item at most: a multiple of 48 whose packed columns (kc rows) fit kColumnBlockBytes.
// The budget is a quarter of this core's L2 (192 KiB to 1 MiB): the item's columns stay in L2 beside
// the weight block streaming through. Measured, 2 threads, Intel Xeon with AMX (2 MiB L2): 512 KiB
// instead of 192 KiB takes 0.92-0.97x the time on AlexNet conv2/conv3, ResNet layer4 and 3x3/2 layers;
// on Zen 4 (1 MiB L2, 256 KiB here) 384 and 768 KiB measured within noise of 192.
inline int64_t forward_column_block_bytes() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? std::clamp<int64_t>(l2 / 4, kColumnBlockBytes, int64_t(1) << 20) : kColumnBlockBytes;
  }();
  return bytes;
}

inline int64_t item_pixels(int64_t kc, int64_t total) {
  const int64_t panels = std::clamp<int64_t>(forward_column_block_bytes() / (kc * kPanel * 4), 1, 16);
  return std::min(panels * kPanel, ceil_div(total, kPanel) * kPanel);
}

// `units` (pixels, vectors, panels) cut into `count` near-equal ranges of whole `grain`s, at most about
// `most` units each, `count` a multiple of the thread count: with one short last item (392 pixels in
// items of 96: 96, 96, 96, 96, 8) one thread waited 40% of a call on the other.
struct BalancedItems {
  int64_t units, grain, grains, count;
  BalancedItems(int64_t units_, int64_t most, int64_t grain_ = 1) : units(units_), grain(grain_) {
    const int64_t threads = at::get_num_threads();
    grains = ceil_div(units, grain);
    count = std::min(grains, ceil_div(ceil_div(units, std::max<int64_t>(1, most)), threads) * threads);
    count = std::max<int64_t>(1, count);
  }
  int64_t begin(int64_t i) const { return std::min(units, grain * (i * grains / count)); }
  int64_t end(int64_t i) const { return i + 1 == count ? units : begin(i + 1); }
  int64_t largest() const { return grain * ceil_div(grains, count); }
};

// forward_packed's items of output pixels.
inline BalancedItems forward_pixel_items(const Conv2dParams& p) {
  const int64_t total = p.batch * p.out_plane();
  BalancedItems items(total, item_pixels(KBlocks(p.col_rows_per_group(), kMaxBlockK).size, total), 16);
  // Few pixel items (batch 1, small planes): split the output channels so every thread works. Where
  // the weights have more rows than there are pixels, all pixels in one item and only the channels
  // split: each thread streams its part of the weights once instead of all of them once per item, at
  // the price of packing the columns on every thread (measured, 2 threads, Intel host, 13x13 and 14x14
  // planes at batch 1 with 256-512 output channels: 0.88-0.95x the time; ResNet layer4's 3x3/2 0.97x,
  // its 1x1 shortcut 0.95x; backward-input of AlexNet conv4 on this engine 0.92x).
  if (items.count <= at::get_num_threads() && p.out_channels > total) items.count = 1;
  return items;
}

// out = conv2d(input, weight) + bias [, relu], float32 NCHW contiguous, any stride/padding/dilation/groups.
inline void forward_packed(const float* input, WeightsA wa, const float* bias, float* out, const Conv2dParams& p,
                           bool relu = false) {
  const int64_t G = p.groups, OCg = p.out_channels_per_group(), Kg = p.col_rows_per_group();
  const int64_t Cg = p.in_channels_per_group(), L = p.out_plane();
  const KBlocks kb(Kg, kMaxBlockK);
  const int64_t oc_blocks = ceil_div(OCg, kTileRows);
  const BalancedItems items = forward_pixel_items(p);
  const int64_t pix_items = items.count;
  int64_t oc_split, oc_per_split;
  channel_split(pix_items, oc_blocks, oc_split, oc_per_split);
  // work items: (pixel item, channel split, group), each group's columns packed by the item itself (a
  // grouped layer with few pixels had run on one thread: RegNetY-400MF's 440 channels in 55 groups at
  // 7x7, batch 8: 392 pixels, one pixel item)
  at::parallel_for(0, pix_items * oc_split * G, 1, [&](int64_t begin, int64_t end) {
    thread_local AlignedBuffer buf;  // per-thread scratch, reused across calls
    float* cols = buf.get(ceil_div(items.largest(), kPanel) * (kb.size * kPanel + kPanelPad));
    std::vector<Segment> segs;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pi = item / (oc_split * G), os = (item / G) % oc_split, g = item % G;
      const int64_t g0 = items.begin(pi), g1 = items.end(pi);
      const int64_t r0 = os * oc_per_split, r1 = std::min(OCg, r0 + oc_per_split);
      if (r0 >= r1) continue;
      for (int64_t b = 0; b < kb.count; ++b) {
        const int64_t k0 = b * kb.size, kc = std::min(kb.size, Kg - k0);
        if (b == 0 || kc != kb.size) make_segments(p, g0, g1, kPanel, kc * kPanel + kPanelPad, segs);
        pack_columns(input, p, g * Cg, k0, k0 + kc, segs, kPanel, cols);
        const bool last = b == kb.count - 1;
        gemm_item(wa, g, Kg, k0, kc, r0, r1, cols, g0, g1, out, p.out_channels, L, g * OCg,
                  b == 0 ? (bias ? Init::kBias : Init::kZero) : Init::kAccumulate, bias ? bias + g * OCg : nullptr,
                  relu && last);
      }
    }
  });
}

// Stride-1 convolutions can skip packing: with a zero-padded copy of the input, the B vector of a
// run of 16 output pixels of one row is 16 contiguous input floats at a fixed offset per k, so the
// micro-kernel loads it straight from the image (OffsetB) and the tile's input stays in L1. The
// price is lanes: a row of OW pixels takes ceil(OW/16) vectors (OW = 14: 14 of 16 lanes). Packing
// costs about one cycle per column element against OCg/16 FMA cycles of use; take the cheaper.
// A zero-padded copy of the whole input is fine up to this size; past it, pack instead.
constexpr int64_t kMaxPaddedCopyBytes = int64_t(512) << 20;

// Bytes of a zero-padded copy of the whole input (pad_h/pad_w on every side).
inline int64_t padded_input_bytes(const Conv2dParams& p) {
  return p.batch * p.in_channels * (p.in_h + 2 * p.pad_h) * (p.in_w + 2 * p.pad_w) * 4;
}

// Offsets (floats) into zero-padded NHWC images [n][Hp][Wp][C] (the channels-last kernels' copies):
// of each output pixel's top-left tap, pixels in (n, oh, ow) order, and of each tap (kh, kw) from it
// (stride and dilation of p).
inline void nhwc_pixel_offsets(const Conv2dParams& p, int64_t Hp, int64_t Wp, int64_t C, std::vector<int64_t>& off) {
  off.resize(p.batch * p.out_plane());
  for (int64_t n = 0, k = 0; n < p.batch; ++n) {
    for (int64_t oh = 0; oh < p.out_h; ++oh) {
      for (int64_t ow = 0; ow < p.out_w; ++ow, ++k) off[k] = ((n * Hp + oh * p.stride_h) * Wp + ow * p.stride_w) * C;
    }
  }
}
inline std::vector<int64_t> nhwc_tap_offsets(const Conv2dParams& p, int64_t Wp, int64_t C) {
  std::vector<int64_t> off(p.kernel_h * p.kernel_w);
  for (int64_t t = 0; t < p.kernel_h * p.kernel_w; ++t)
    off[t] = ((t / p.kernel_w) * p.dilation_h * Wp + (t % p.kernel_w) * p.dilation_w) * C;
  return off;
}

// The offset of each tap k = (c, kh, kw) (k < rows) from its output pixel's top-left input position
// in zero-padded planes of `plane` floats, rows Wp floats apart (stride and dilation of p).
inline std::vector<int64_t> padded_tap_offsets(const Conv2dParams& p, int64_t rows, int64_t plane, int64_t Wp) {
  const int64_t KK = p.kernel_h * p.kernel_w;
  std::vector<int64_t> off(rows);
  for (int64_t k = 0; k < rows; ++k) {
    off[k] = (k / KK) * plane + ((k % KK) / p.kernel_w) * p.dilation_h * Wp + (k % p.kernel_w) * p.dilation_w;
  }
  return off;
}

inline bool use_padded_direct(const Conv2dParams& p) {
  if (p.stride_h != 1 || p.stride_w != 1) return false;
  if (padded_input_bytes(p) > kMaxPaddedCopyBytes && (p.pad_h > 0 || p.pad_w > 0))
    return false;                                          // unpadded: read in place
  const char* force = std::getenv("FASTCONV_CPU_GEMM_B");  // "packed" or "direct": tests and benchmarks
  if (force && std::string(force) == "packed") return false;
  if (force && std::string(force) == "direct") return true;
  // 1x1 (planes flattened into one row, read in place): packing from 64 output channels (measured,
  // 2 threads, Intel host, batch 8, ResNet-50's 1x1 layers 64-2048 channels at 7x7-56x56: forward
  // 0.83-0.99x the time, backward-input through the forward 0.81-1.01x; at 32 channels 1.07x)
  if (p.kernel_h == 1 && p.kernel_w == 1 && p.out_channels_per_group() >= 64) return false;
  const double lanes = p.out_w <= 8 ? double(p.out_w) / 8.0 : double(p.out_w) / double(16 * ceil_div(p.out_w, 16));
  const double packed = double(p.out_channels_per_group()) / double(p.out_channels_per_group() + 16);
  return lanes >= packed;
}

inline void forward_padded_direct(const float* input, WeightsA wa, const float* bias, float* out, const Conv2dParams& p,
                                  bool relu = false) {
  const int64_t G = p.groups, OCg = p.out_channels_per_group(), Kg = p.col_rows_per_group();
  const int64_t C = p.in_channels, Cg = p.in_channels_per_group(), L = p.out_plane();
  const int64_t H = p.in_h, W = p.in_w, Hp = H + 2 * p.pad_h, Wp = W + 2 * p.pad_w, plane = Hp * Wp;
  const int64_t KK = p.kernel_h * p.kernel_w;
  // The padded copy. Without padding the input is read in place, and only the last image is copied:
  // the unused lanes of its last vectors read past the tensor's end, by up to a row and a kernel width
  // plus a vector (two-row vectors read the row after an odd last row), hence the zeroed slack.
  // written in full (copies and zeroed slack); per calling thread, kept across calls: fresh buffers of
  // these sizes can page-fault on every call under glibc's default allocator settings
  thread_local AlignedBuffer pad_buf(false), tail_buf(false);
  const int64_t slack = 2 * Wp + 32;
  const bool in_place = p.pad_h == 0 && p.pad_w == 0;
  const float* padded = input;
  const float* last_image = input + (p.batch - 1) * C * plane;
  if (!in_place) {
    float* copy = pad_buf.get(p.batch * C * plane + slack);
    copy_padded(input, p.batch * C, H, W, copy, Hp, Wp, p.pad_h, p.pad_w);
    std::fill(copy + p.batch * C * plane, copy + p.batch * C * plane + slack, 0.f);
    padded = copy;
    last_image = copy + (p.batch - 1) * C * plane;
  } else {
    float* tail = tail_buf.get(C * plane + slack);
    std::copy(last_image, last_image + C * plane, tail);
    std::fill(tail + C * plane, tail + C * plane + slack, 0.f);
    last_image = tail;
  }
  const std::vector<int64_t> koff = padded_tap_offsets(p, Kg, plane, Wp);
  const KBlocks kb(Kg, kMaxBlockK);
  const int64_t oc_blocks = ceil_div(OCg, kTileRows);
  // a vector is a run of 16 pixels of one output row, or two rows of at most 8 pixels
  const bool two_rows = p.out_w <= 8;
  // ... read with one load where the two padded rows fit in 16 floats (Wp + out_w <= 16: 3x3 kernels on
  // planes up to 7 wide): row oh + 1 in lanes Wp.., no merge of two loads (measured, 2 threads, Intel
  // host, batch 8: ResNeXt's 32 groups of 32 at 7x7, forward and backward-input, 0.85x the time)
  const bool rows_adjacent = two_rows && Wp + p.out_w <= 16;
  const int64_t per_row = ceil_div(p.out_w, 16), rows_per_image = two_rows ? ceil_div(p.out_h, 2) : p.out_h;
  const int64_t vectors = p.batch * rows_per_image * per_row;
  const int64_t panels = ceil_div(vectors, kTileVectors);
  const int64_t panels_per_item = std::clamp<int64_t>(ceil_div(512, p.out_w * (two_rows ? 2 : 1)), 1, 8);
  const BalancedItems items(panels, panels_per_item);
  const int64_t pix_items = items.count;
  int64_t oc_split, oc_per_split;
  channel_split(pix_items, oc_blocks, oc_split, oc_per_split);
  // Kernel rows [lo, hi) that read any real (unpadded) input row for output rows [oh0, oh1].
  const auto kernel_rows_read = [&](int64_t oh0, int64_t oh1, int64_t& lo, int64_t& hi) {
    const int64_t dh = p.dilation_h;
    lo = std::max<int64_t>(0, ceil_div(std::max<int64_t>(0, p.pad_h - oh1), dh));
    hi = p.pad_h + H - 1 - oh0 < 0 ? 0 : std::min(p.kernel_h, (p.pad_h + H - 1 - oh0) / dh + 1);
  };
  at::parallel_for(0, pix_items * oc_split, 1, [&](int64_t begin, int64_t end) {
    std::vector<KRun> runs;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pi = item / oc_split, os = item % oc_split;
      const int64_t j0 = items.begin(pi), j1 = items.end(pi);
      const int64_t r0 = os * oc_per_split, r1 = std::min(OCg, r0 + oc_per_split);
      if (r0 >= r1) continue;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t b = 0; b < kb.count; ++b) {
          const int64_t k0 = b * kb.size, kc = std::min(kb.size, Kg - k0);
          const Init init = b == 0 ? (bias ? Init::kBias : Init::kZero) : Init::kAccumulate;
          const bool last = b == kb.count - 1;
          // one panel of three row vectors (its inputs stay in L1) against every block of 8 channels
          for (int64_t j = j0; j < j1; ++j) {
            const int nv = static_cast<int>(std::min<int64_t>(kTileVectors, vectors - j * kTileVectors));
            int64_t kh_lo = p.kernel_h, kh_hi = 0;  // the kernel rows any of the panel's vectors reads real rows with
            TwoRowOffsetB bs;
            bs.koff = koff.data() + k0;
            TileDest d0;
            d0.ldc = L;
            for (int v = 0; v < kTileVectors; ++v) {
              const int64_t vec = std::min(j * kTileVectors + v, vectors - 1);
              const int64_t n = vec / (rows_per_image * per_row), r = vec % (rows_per_image * per_row);
              const int64_t oh = (r / per_row) * (two_rows ? 2 : 1), ow0 = (r % per_row) * 16;
              bs.base[v] = (n == p.batch - 1 ? last_image : padded + n * C * plane) + g * Cg * plane + oh * Wp + ow0;
              float* o = out + n * p.out_channels * L + oh * p.out_w + ow0;
              d0.ptr[v][0] = d0.ptr[v][1] = o;
              d0.mask[v][0] = v < nv ? lane_mask(0, std::min<int64_t>(p.out_w - ow0, two_rows ? 8 : 16)) : __mmask16(0);
              d0.mask[v][1] = 0;
              bs.second[v] = bs.base[v];
              if (two_rows) {  // lanes 8.. (Wp.. where the rows are adjacent) hold row oh + 1 (when there is one)
                const int64_t lane = rows_adjacent ? Wp : 8;
                bs.second[v] = bs.base[v] + Wp - 8;
                d0.ptr[v][1] = o + p.out_w - lane;
                d0.mask[v][1] = v < nv && oh + 1 < p.out_h ? lane_mask(lane, lane + p.out_w) : __mmask16(0);
              }
              if (v < nv) {
                int64_t lo, hi;
                kernel_rows_read(oh, std::min(p.out_h - 1, oh + (two_rows ? 1 : 0)), lo, hi);
                if (lo < hi) kh_lo = std::min(kh_lo, lo), kh_hi = std::max(kh_hi, hi);
              }
            }
            // Taps of kernel rows that read only the zero padding for every vector of the panel are
            // skipped: runs of the block's k, one per input channel (a 5x5 unpadded layer's backward-input
            // on 8x8 grad_output planes, padded by 4: a quarter of its taps).
            const bool skip = kh_lo > 0 || kh_hi < p.kernel_h;
            if (skip) {
              runs.clear();
              const int64_t KW = p.kernel_w;
              for (int64_t c = k0 / KK; c * KK < k0 + kc; ++c) {
                const int64_t lo = std::max(k0, c * KK + kh_lo * KW), hi = std::min(k0 + kc, c * KK + kh_hi * KW);
                if (lo < hi) runs.push_back({lo - k0, hi - k0});
              }
            }
            const KRuns kr{runs.data(), static_cast<int64_t>(runs.size())};
            for (int64_t ob = r0 / kTileRows; ob * kTileRows < r1; ++ob) {
              const int mr = static_cast<int>(std::min<int64_t>(kTileRows, r1 - ob * kTileRows));
              const float* a = wa.block(g, ob, k0);
              const int64_t ch = g * OCg + ob * kTileRows;
              TileDest d = d0;
              for (int v = 0; v < kTileVectors; ++v) {
                d.ptr[v][0] += ch * L;
                d.ptr[v][1] += ch * L;
              }
              const auto run = [&](const auto& b_src) {  // over the panel's k-runs or the whole block
                const float* bias_ch = bias ? bias + ch : nullptr;
                if (skip)
                  run_micro_kernel(mr, nv, kr, a, wa.rs, wa.cs, b_src, d, init, bias_ch, relu && last);
                else
                  run_micro_kernel(mr, nv, kc, a, wa.rs, wa.cs, b_src, d, init, bias_ch, relu && last);
              };
              if (two_rows && !rows_adjacent)
                run(bs);
              else
                run(OffsetB{{bs.base[0], bs.base[1], bs.base[2]}, bs.koff});
            }
          }
        }
      }
    }
  });
}

// A 1x1, stride-1, unpadded convolution is the same on planes reshaped to one row of H*W pixels: whole
// vectors and one segment per panel instead of row tails.
inline Conv2dParams flatten_pointwise(Conv2dParams p) {
  if (p.is_pointwise()) {
    p.in_w = p.out_w = p.in_h * p.in_w;
    p.in_h = p.out_h = 1;
  }
  return p;
}

inline void forward_with(const float* input, WeightsA wa, const float* bias, float* out, const Conv2dParams& params,
                         bool relu) {
  const Conv2dParams p = flatten_pointwise(params);
  if (use_padded_direct(p)) return forward_padded_direct(input, wa, bias, out, p, relu);
  forward_packed(input, wa, bias, out, p, relu);
}

inline void forward(const float* input, const float* weight, const float* bias, float* out, const Conv2dParams& p,
                    bool relu = false) {
  forward_with(input, forward_weights(weight, p), bias, out, p, relu);
}

// Whether a stride-1 backward-input on the forward engine packs the flipped weights block by block
// (backward_input_stride1): kernels past 1x1 whose grad_input is one item of pixels (batch 1, small
// planes, more input channels than pixels).
inline bool flipped_weights_by_block(const Conv2dParams& p) {
  if (p.kernel_h * p.kernel_w == 1) return false;
  const Conv2dParams q = backward_input_params(p);
  return !use_padded_direct(q) && forward_pixel_items(q).count == 1;
}

// Whether backward-input runs as the forward engine over grad_output (stride 1, flipped_conv.h) rather
// than through grad_cols and col2im. At batch 1 the col2im route wins where grad_input has as many or
// fewer channels than grad_output (measured, 2 threads, Zen 4: ResNet 3x3 256 at 14x14 0.64x, 512 at
// 7x7 0.73x, AlexNet conv2/conv3 0.79/0.84x the time of the forward route): it reads the weights in
// place, where the forward route first packs them flipped, a pass over the whole weight tensor for a
// single image's worth of work. From batch 2 the forward route
// flattens its pixels over images, where col2im's per-image bands leave vector lanes idle on small
// planes (ResNet 512 at 7x7, batch 8: 1.36x the time through col2im). Layers with at most 4 input
// channels per group keep col2im: the forward route's output channels are their input channels, at
// most half of its 8-row tile (measured, 2 threads, Intel Xeon with AMX, batch 100: MNIST conv1 0.65x,
// the 5x5 1->30 layer 0.48x, 3x3 3->32 0.83x the forward route's time; LeNet conv1's 1->6 1.07x; from
// 6 input channels up the forward route wins, LeNet conv2 by 1.7x). Grouped layers take the forward
// route at any channel count: col2im's GEMM reduces over a group's few output channels (ResNeXt's 32
// groups of 4 at 56x56, batch 8: the forward route 0.47x col2im's time; groups of 3 at 28x28 0.42x).
inline bool backward_input_through_forward(const Conv2dParams& p) {
  // batch 1: col2im where grad_input has fewer channels than grad_output and the kernel is past 1x1 (it
  // reads the weights in place), unless the forward route packs its weights block by block (measured,
  // 2 threads, Intel host, the forward route against col2im: 3x3 32->64 at 14x14 1.18x, 96->256 at
  // 13x13 1.08x, AlexNet conv2 0.99x, without block packing; with it AlexNet conv3 0.94x, 256->512 at
  // 7x7 0.84x). Otherwise the forward route, since pack_columns packs a channel's taps together and 1x1
  // layers pack (measured, 2 threads, Intel host, against col2im: 3x3 at 256 on 13x13 0.91-0.93x, 384
  // on 13x13 0.83x, 512 on 7x7 0.87-0.89x, 128 on 28x28 0.88x, 32 on 14x14 1.04x; 1x1 256->256 and
  // 512->512 0.74-0.87x, 64->256 at 56x56 0.55x, 512->2048 at 7x7 0.86x; AlexNet conv4 0.91x).
  const int64_t Cg = p.in_channels_per_group(), OCg = p.out_channels_per_group();
  if (p.batch == 1 && Cg < OCg && p.kernel_h * p.kernel_w > 1 && !flipped_weights_by_block(p)) return false;
  return backward_input_as_forward(p) && (Cg > kTileRows / 2 || p.groups > 1);
}

// Backward-input of a stride-1 convolution (flipped_conv.h) on this engine: the forward pass over
// grad_output with the flipped, transposed weights packed straight from `weight`.
inline void backward_input_stride1(const float* grad_output, const float* weight, float* grad_input,
                                   const Conv2dParams& p) {
  // One item of pixels (batch 1, small planes): every block of the flipped weights meets the GEMM once,
  // so each is packed right before it, into L1, instead of all of them first: a pass over the whole
  // weight tensor that waits on memory (measured, 2 threads, Intel host, batch 1: AlexNet conv4 and
  // conv5 0.94/0.91x the time, 3x3 256 at 14x14 0.89x, 512 at 7x7 0.92x)
  if (flipped_weights_by_block(p)) {
    const FlippedWeights flipped{weight, p.in_channels_per_group(), p.out_channels_per_group(),
                                 p.kernel_h * p.kernel_w};
    WeightsA wa{nullptr, 0, 0, 1, kTileRows};
    wa.flipped = &flipped;
    return forward_packed(grad_output, wa, nullptr, grad_input, backward_input_params(p), false);
  }
  forward_with(grad_output, pack_flipped_weights_by_8(weight, p), nullptr, grad_input, backward_input_params(p), false);
}

// col2im_band_add (im2col.h) for float32 with AVX-512 row loops: stride 1 adds 16 columns per vector,
// stride 2 spreads 16 columns over the even lanes of two vectors; other strides element by element.
FASTCONV_AVX512 inline void col2im_band_add_avx512(const float* col, int64_t ld, int64_t channels,
                                                   const Conv2dParams& p, int64_t oh0, int64_t oh1, float* im) {
  const int64_t OW = p.out_w, W = p.in_w, H = p.in_h, SW = p.stride_w;
  const int64_t band = oh1 - oh0;
  const ColumnRanges ranges(p);
  const __m512i spread_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i spread_hi = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
  for (int64_t c = 0; c < channels; ++c) {
    float* im_c = im + c * H * W;
    for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
        const float* src = col + ((c * p.kernel_h + kh) * p.kernel_w + kw) * ld;
        const int64_t off_w = kw * p.dilation_w - p.pad_w;
        const int64_t lo = ranges.lo[kw], hi = ranges.hi[kw];
        for (int64_t r = 0; r < band; ++r) {
          const int64_t ih = (oh0 + r) * p.stride_h - p.pad_h + kh * p.dilation_h;
          if (ih < 0 || ih >= H) continue;
          const float* s = src + r * OW;
          float* d = im_c + ih * W + off_w;
          if (SW == 1) {
            for (int64_t ow = lo; ow < hi; ow += 16) {
              const __mmask16 m = lane_mask(0, hi - ow);
              _mm512_mask_storeu_ps(d + ow, m,
                                    _mm512_add_ps(_mm512_maskz_loadu_ps(m, d + ow), _mm512_maskz_loadu_ps(m, s + ow)));
            }
          } else if (SW == 2) {
            for (int64_t ow = lo; ow < hi; ow += 16) {
              const uint32_t valid = lane_mask(0, hi - ow);
              const __mmask16 m0 = __mmask16(_pdep_u32(valid, 0x5555u)), m1 = __mmask16(_pdep_u32(valid >> 8, 0x5555u));
              const __m512 v = _mm512_maskz_loadu_ps(__mmask16(valid), s + ow);
              float* d0 = d + 2 * ow;
              _mm512_mask_storeu_ps(d0, m0,
                                    _mm512_add_ps(_mm512_maskz_loadu_ps(m0, d0), _mm512_permutexvar_ps(spread_lo, v)));
              if (m1) {
                _mm512_mask_storeu_ps(
                    d0 + 16, m1,
                    _mm512_add_ps(_mm512_maskz_loadu_ps(m1, d0 + 16), _mm512_permutexvar_ps(spread_hi, v)));
              }
            }
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) d[ow * SW] += s[ow];
          }
        }
      }
    }
  }
}

// Output rows per band of backward_input_col2im: the band's pixels are the GEMM's columns, in vectors
// of 16, so bands whose width leaves few idle lanes (7x7 planes: the whole 49-pixel plane, 77% of its
// lanes busy, not 3 rows of 21, 44%), with the band's grad_cols (Kg x pixels) within L2 for col2im.
inline int64_t col2im_band_rows(const Conv2dParams& p) {
  const int64_t OH = p.out_h, OW = p.out_w, Kg = p.groups * p.col_rows_per_group();
  const int64_t most = std::clamp<int64_t>(kMaxPartialBytes / std::max<int64_t>(1, Kg * OW * 4), 1, OH);
  int64_t best = 1;
  double best_lanes = 0.0;
  for (int64_t r = 1; r <= most; ++r) {
    const int64_t full = OH / r, rest = OH % r;
    const double lanes = double(OH * OW) / double(16 * (full * ceil_div(r * OW, 16) + ceil_div(rest * OW, 16)));
    if (lanes >= best_lanes) best = r, best_lanes = lanes;
  }
  return best;
}

// grad_cols = W^T grad_output per image and band of output rows, then col2im (any stride).
template <typename Col2im>
void backward_input_col2im(const float* grad_output, const float* weight, float* grad_input, const Conv2dParams& p,
                           Col2im col2im_band_add) {
  const int64_t G = p.groups, OCg = p.out_channels_per_group(), Kg = p.col_rows_per_group();
  const int64_t C = p.in_channels, L = p.out_plane();
  // A = W^T per group (rows k of Kg, reduction over o of OCg). Read in place, each step is 8
  // consecutive floats of one weight row, Kg floats after the last: past 512 (a 2 KiB stride, beyond
  // what a stride prefetcher follows) every step waits on L2. So with Kg > 512 and 128+ pixels of work
  // it is packed first, [g][row block][o][8] (measured, 2 threads, Intel Xeon with AMX: AlexNet conv2
  // and conv4 at batch 1 0.86/0.85x, ResNet 3x3/2 layers at batch 8 0.84-0.92x the time in place);
  // in place where the pass over the weights is most of the work (ResNet layer4 at batch 1: 49
  // pixels, packing 9.4 MB measured 1.19x; on Zen 4 5-15% slower at batch 1) or the stride is short.
  WeightsA wt{weight, OCg * Kg, kTileRows, 1, Kg};
  if (Kg > 512 && p.batch * L >= 128) {
    const int64_t kb = ceil_div(Kg, kTileRows);
    thread_local AlignedBuffer wbuf;
    float* packed = wbuf.get(G * kb * OCg * kTileRows);
    transpose_weight_blocks(weight, G, OCg, Kg, packed);
    wt = WeightsA{packed, kb * OCg * kTileRows, OCg * kTileRows, 1, kTileRows};
  }
  // grad_output as a 1x1 "input" for pack_columns
  Conv2dParams q = p;
  q.in_channels = p.out_channels;
  q.in_h = p.out_h;
  q.in_w = p.out_w;
  q.kernel_h = q.kernel_w = 1;
  q.stride_h = q.stride_w = q.dilation_h = q.dilation_w = 1;
  q.pad_h = q.pad_w = 0;
  q.groups = 1;
  q = flatten_pointwise(q);  // one row of L pixels: segments end only at panels, not at every output row
  const KBlocks ob(OCg, kMaxBlockK);
  const int64_t rows = col2im_band_rows(p);
  // Work items: (group of images, block of each group's input channels); an item computes the grad_cols
  // rows of its channels and adds them into those channels only, so items never write the same element.
  // Blocks start at whole 8-row tiles of grad_cols (channels multiple of cg); there are just enough of
  // them that the items share evenly over the threads (batch 1 included).
  // Every item streams its rows of W^T once. Where W^T is past 2 MiB (L2 on the Intel host) and a band
  // is a whole plane, the images form as few groups as keep an item's grad_cols within 2 MiB, one GEMM
  // over all their pixels: ResNet layer4's 3x3/2 backward-input (W^T 4.7 MB, 7x7 output planes) at
  // batch 8 in one group, the channels split over the 2 threads, took 0.72x the time of one image per
  // item (and 0.81x that of 2 groups of 4), at batch 2 0.75x, at batch 32 (groups of 4) 0.82x; 3x3/2
  // 256->256 on 7x7 outputs (W^T 2.4 MB) 0.80x; 128->256 on 14x14 (W^T 1.2 MB, re-read from L2) 1.08x,
  // so it keeps one image per item. Measured, 2 threads, Intel host, interleaved.
  const int64_t KK = p.kernel_h * p.kernel_w, Cg = p.in_channels_per_group(), threads = at::get_num_threads();
  const int64_t cg = kTileRows / std::gcd(KK, kTileRows), c_grains = ceil_div(Cg, cg);
  const auto blocks_for = [&](int64_t groups) {
    return std::clamp<int64_t>(threads / std::gcd(groups, threads), 1, c_grains);
  };
  int64_t n_groups = p.batch;
  if (rows == p.out_h && G * Kg * OCg * 4 > 2 * kMaxPartialBytes) {
    for (int64_t groups = 1; groups < p.batch; ++groups) {
      if (G * Kg / blocks_for(groups) * ceil_div(p.batch, groups) * L * 4 <= 2 * kMaxPartialBytes) {
        n_groups = groups;
        break;
      }
    }
  }
  const int64_t per_item = ceil_div(p.batch, n_groups), c_blocks = blocks_for(n_groups);
  const int64_t L_band = rows * p.out_w;
  at::parallel_for(0, n_groups * c_blocks, 1, [&](int64_t begin, int64_t end) {
    thread_local AlignedBuffer gbuf, cbuf;
    const int64_t width_max = L_band * per_item;
    float* go_panels = gbuf.get(ceil_div(width_max, kPanel) * (kPanel * ob.size + kPanelPad));
    float* gcol = cbuf.get(G * Kg * width_max);
    std::vector<Segment> segs;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t ng = item / c_blocks, cb = item % c_blocks;
      const int64_t c0 = std::min(Cg, cg * (cb * c_grains / c_blocks));
      const int64_t c1 = cb + 1 == c_blocks ? Cg : std::min(Cg, cg * ((cb + 1) * c_grains / c_blocks));
      if (c0 >= c1) continue;
      const int64_t n0 = ng * p.batch / n_groups, n1 = (ng + 1) * p.batch / n_groups, images = n1 - n0;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t g = 0; g < G; ++g)
          std::fill(grad_input + (n * C + g * Cg + c0) * p.in_plane(),
                    grad_input + (n * C + g * Cg + c1) * p.in_plane(), 0.f);
      // bands: the whole planes of the item's images in one GEMM over all their pixels, or bands of
      // `rows` output rows of its one image
      const int64_t band_rows = images > 1 ? p.out_h : rows;
      for (int64_t oh0 = 0; oh0 < p.out_h; oh0 += band_rows) {
        const int64_t oh1 = std::min(p.out_h, oh0 + band_rows), width = images * (oh1 - oh0) * p.out_w;
        const int64_t g0 = n0 * L + oh0 * p.out_w, g1 = g0 + width;
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t b = 0; b < ob.count; ++b) {
            const int64_t o0 = b * ob.size, oc = std::min(ob.size, OCg - o0);
            make_segments(q, g0, g1, kPanel, oc * kPanel + kPanelPad, segs);
            pack_columns(grad_output, q, g * OCg + o0, 0, oc, segs, kPanel, go_panels);
            // gcol rows k of group g: the band's `width` pixels per row, "image" 0 of a 1-image batch
            gemm_item(wt, g, OCg, o0, oc, c0 * KK, c1 * KK, go_panels, 0, width, gcol + g * Kg * width, Kg, width, 0,
                      b == 0 ? Init::kZero : Init::kAccumulate, nullptr, false);
          }
          for (int64_t n = n0; n < n1; ++n)  // each image's part of the band: its L pixels
            col2im_band_add(gcol + (g * Kg + c0 * KK) * width + (n - n0) * L, width, c1 - c0, p, oh0, oh1,
                            grad_input + (n * C + g * Cg + c0) * p.in_plane());
        }
      }
    }
  });
}

// grad_weight (OC x Cg*KH*KW) = sum over pixels of grad_output x columns. Deterministic for a given
// thread count: items are dealt to slots in fixed contiguous ranges, slots summed in order.
// 16x16 in-register transpose: rows r[0..15] -> columns.
FASTCONV_AVX512 __attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  transpose_4x4_blocks<16>(r);
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// store(i, v) for every column i of the rows x cols matrix at src (rows ld floats apart, rows <= 16),
// v the column as a vector, zero past `rows`: 16x16 register transposes, 16 columns at a time.
template <typename Store>
FASTCONV_AVX512 inline void transpose_columns(const float* src, int64_t ld, int64_t rows, int64_t cols, Store store) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    const int64_t n = std::min<int64_t>(16, cols - c0);
    const __mmask16 m = lane_mask(0, n);
    __m512 r[16];
    for (int j = 0; j < 16; ++j) r[j] = j < rows ? _mm512_maskz_loadu_ps(m, src + j * ld + c0) : _mm512_setzero_ps();
    transpose16(r);
    if (n == 16) {  // unrolled: r stays in registers (a loop to n spilled it to the stack and back)
      _Pragma("GCC unroll 16") for (int i = 0; i < 16; ++i) store(c0 + i, r[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) store(c0 + i, r[i]);
    }
  }
}

// dst(i)[0, 16) = column i of the rows x cols matrix at src (transpose_columns; dst(i) 64-byte aligned,
// columns whose dst(i) is null skipped).
template <typename Dst>
FASTCONV_AVX512 inline void columns_to_lanes(const float* src, int64_t ld, int64_t rows, int64_t cols, Dst dst) {
  transpose_columns(src, ld, rows, cols, [&](int64_t i, __m512 v) FASTCONV_AVX512 {
    if (float* d = dst(i)) _mm512_store_ps(d, v);
  });
}

// A pixel-major row [px][NV*16] (rows past `valid` unread) into NCHW (+ bias, ReLU), 16 pixels at a
// time: each 16 x 16 block of pixels x channels transposed in registers, then one masked store of up
// to 16 pixels per channel. Element by element these scattered stores to 64 planes took 30% of the
// ResNet stem's forward on an Intel host (2 FMA units per core, so everything that is not an FMA
// weighs twice what it does on Zen 4); tile by tile, a 5-6 pixel tile paid a whole transpose and a
// partial-line store per channel.
template <int NV>
FASTCONV_AVX512 void store_row_to_planes(const float* row, int64_t valid, int64_t OC, const float* bias, bool relu,
                                         float* out, int64_t L) {
  constexpr int64_t width = NV * 16;
  for (int64_t px0 = 0; px0 < valid; px0 += 16) {
    const int64_t n = std::min<int64_t>(16, valid - px0);
    const __mmask16 m = lane_mask(0, n);
    for (int v = 0; v < NV; ++v) {
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i) {
        r[i] = i < n ? _mm512_load_ps(row + (px0 + i) * width + 16 * v) : _mm512_setzero_ps();
      }
      transpose16(r);  // r[l]: channel 16v + l, pixels in the lanes
      const int64_t channels = std::min<int64_t>(16, OC - 16 * v);
      for (int64_t l = 0; l < channels; ++l) {
        const int64_t o = 16 * v + l;
        __m512 y = bias ? _mm512_add_ps(r[l], _mm512_set1_ps(bias[o])) : r[l];
        if (relu) y = _mm512_max_ps(_mm512_setzero_ps(), y);  // NaN (the second operand) stays NaN, as torch.relu
        _mm512_mask_storeu_ps(out + o * L + px0, m, y);
      }
    }
  }
}

// Batches of `count` [rows][cols] matrices (rows*cols floats apart) into [cols][rows] ones: NHWC <->
// NCHW (rows = H*W, cols = C one way; the other, rows = C, cols = H*W). Work items of 16 source rows,
// over every matrix. ATen's copy of a channels_last tensor into NCHW took 24 ms for 8x256x56x56 here
// (25.7 MB: conflict misses at its power-of-two strides). Matrices of one row or one column keep their
// order: one copy (the batch of transposes of a depthwise grad_weight, 960 one-channel "images", was 11%
// of MobileNetV2's 960 at 7x7 backward-weight, perf, one thread).
inline void transpose_batch(const float* src, int64_t count, int64_t rows, int64_t cols, float* dst) {
  if (rows == 1 || cols == 1) {
    std::memcpy(dst, src, sizeof(float) * count * rows * cols);
    return;
  }
  const int64_t strips = ceil_div(rows, 16);
  at::parallel_for(0, count * strips, grain_for(16 * cols), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t m = t / strips, r0 = (t % strips) * 16, nr = std::min<int64_t>(16, rows - r0);
      float* d = dst + m * rows * cols + r0;
      const __mmask16 rm = lane_mask(0, nr);
      transpose_columns(src + m * rows * cols + r0 * cols, cols, nr, cols,
                        [&](int64_t i, __m512 v) FASTCONV_AVX512 { _mm512_mask_storeu_ps(d + i * rows, rm, v); });
    }
  });
}

// dst[o*ldd + k] = sum over s < slots of src[s*slot_stride + k*lds + o], for k < rows, o < cols (<= 16
// each): the slots summed in order, then one 16x16 block transposed through registers.
FASTCONV_AVX512 inline void sum_slots_transposed(const float* src, int64_t lds, int64_t slot_stride, int64_t slots,
                                                 int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  __m512 r[16];
  const __mmask16 cm = lane_mask(0, cols), rm = lane_mask(0, rows);
  for (int i = 0; i < 16; ++i) {
    r[i] = _mm512_setzero_ps();
    if (i >= rows) continue;
    for (int64_t s = 0; s < slots; ++s)
      r[i] = _mm512_add_ps(r[i], _mm512_maskz_loadu_ps(cm, src + s * slot_stride + i * lds));
  }
  transpose16(r);
  for (int i = 0; i < cols; ++i) _mm512_mask_storeu_ps(dst + i * ldd, rm, r[i]);
}

// grad_weight[g*OCg + o][k] = the sum over `slots` partials (`part` floats apart) of grad_W^T[g][k][o]
// (rows `ldo` apart), summed in slot order; 16 x 16 blocks through registers, so reads and writes are
// both contiguous.
// With `as_is` (one group) grad_weight is [Kg][OCg] instead, the partials summed without a transpose
// (the swapped 1x1 problem of backward_weight).
inline void write_grad_weight(const float* parts, int64_t slots, int64_t part, const Conv2dParams& p, int64_t ldo,
                              float* grad_weight, bool as_is = false) {
  const int64_t G = p.groups, OCg = p.out_channels_per_group(), Kg = p.col_rows_per_group();
  if (as_is) {
    at::parallel_for(0, Kg, grain_for(OCg * slots), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        float* dst = grad_weight + k * OCg;
        std::copy(parts + k * ldo, parts + k * ldo + OCg, dst);
        for (int64_t s = 1; s < slots; ++s) {
          const float* src = parts + s * part + k * ldo;
          for (int64_t o = 0; o < OCg; ++o) dst[o] += src[o];
        }
      }
    });
    return;
  }
  const int64_t k_tiles = ceil_div(Kg, 16), o_tiles = ceil_div(OCg, 16);
  at::parallel_for(0, G * k_tiles * o_tiles, grain_for(256 * slots), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t g = blk / (k_tiles * o_tiles), kt = (blk / o_tiles) % k_tiles, ot = blk % o_tiles;
      const int64_t k0 = kt * 16, o0 = ot * 16;
      sum_slots_transposed(parts + (g * Kg + k0) * ldo + o0, ldo, part, slots, std::min<int64_t>(16, Kg - k0),
                           std::min<int64_t>(16, OCg - o0), grad_weight + (g * OCg + o0) * Kg + k0, Kg);
    }
  });
}

// Column tiles of 1-3 vectors covering n vectors with the fewest 1-vector tiles: (nv of tile k).
inline int vectors_of_tile(int64_t total_vectors, int64_t first_vector) {
  const int64_t left = total_vectors - first_vector;
  if (left >= 5 || left == 3) return 3;
  if (left == 4 || left == 2) return 2;
  return 1;
}

// The tile of vectors_of_tile that holds vector v: its first vector v0 and width nv. The tiles are 3
// wide, then a tail of two 2-wide tiles (total % 3 == 1, from 4 up), one (== 2), or a single vector.
inline void tile_of_vector(int64_t total_vectors, int64_t v, int64_t& v0, int64_t& nv) {
  const int64_t rem = total_vectors % 3;
  const int64_t threes = rem == 0   ? total_vectors / 3
                         : rem == 2 ? total_vectors / 3
                                    : std::max<int64_t>(0, total_vectors / 3 - 1);
  if (v < 3 * threes) {
    v0 = v / 3 * 3, nv = 3;
    return;
  }
  v0 = 3 * threes + (v - 3 * threes) / 2 * 2;
  nv = std::min<int64_t>(2, total_vectors - v0);
}

// The 16x16 blocks of grad_output^T for pixels [g0, g1) (g = n*L + q) and channels oc0 + [0, OCg):
// store(v, t, r) gets the block's row t (pixel g0 + t, channels 16v..16v+15 as a vector, zeros past
// OCg). Shared by the two layouts below.
template <typename Store>
FASTCONV_AVX512 inline void transpose_grad_output_blocks(const float* go, const Conv2dParams& p, int64_t oc0,
                                                         int64_t OCg, int64_t g0, int64_t g1, const Store& store) {
  const int64_t L = p.out_plane(), vectors = ceil_div(OCg, 16);
  // Each block reads one line from each of 16 planes, and a pass over 64 channels runs 64 streams at
  // once, more than the hardware prefetchers follow: the lines two blocks ahead are prefetched.
  // Measured (in-process A/B, 2 threads, Zen 4): ResNet-18's stem backward-weight at batch 4 0.90-0.92x
  // the time (this transpose had been a quarter of it, one thread), AlexNet conv1's at batch 32 0.96x,
  // the MNIST CNN's conv2 at batch 100 0.95-0.97x; 13x13 planes level. Four blocks ahead: 0.93-0.95x.
  // Six blocks ahead into L2 as well: the stem 0.94-0.95x again, AlexNet conv1 0.98x, others level.
  for (int64_t g = g0; g < g1;) {
    const int64_t n = g / L, q = g % L, len = std::min(L - q, g1 - g);
    const float* src = go + (n * p.out_channels + oc0) * L + q;
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
      const __mmask16 tm = lane_mask(0, len - t0);
      for (int64_t v = 0; v < vectors; ++v) {
        const int64_t o0 = 16 * v;
        __m512 r[16];
        if (t0 + 32 < len) {  // two blocks ahead into L1, six into L2, see above
          for (int i = 0; i < 16 && o0 + i < OCg; ++i) {
            _mm_prefetch(reinterpret_cast<const char*>(src + (o0 + i) * L + t0 + 32), _MM_HINT_T0);
          }
        }
        if (t0 + 96 < len) {
          for (int i = 0; i < 16 && o0 + i < OCg; ++i) {
            _mm_prefetch(reinterpret_cast<const char*>(src + (o0 + i) * L + t0 + 96), _MM_HINT_T1);
          }
        }
        for (int i = 0; i < 16; ++i) {
          r[i] = o0 + i < OCg ? _mm512_maskz_loadu_ps(tm, src + (o0 + i) * L + t0) : _mm512_setzero_ps();
        }
        transpose16(r);
        for (int i = 0; i < 16 && t0 + i < len; ++i) store(v, g - g0 + t0 + i, r[i]);
      }
    }
    g += len;
  }
}

// grad_output^T as backward-weight's B operand, in panels: the output channels cut into the tiles
// of vectors_of_tile, the panel of tile (first vector v0, nv vectors) at base + v0*16*rows with its
// rows (pixels) 16*nv floats apart, so each step's loads are one contiguous run (rows ldo floats apart
// took 1.02-1.04x the time: AlexNet conv2-4, ResNet 512 at 7x7, MNIST conv2, interleaved A/B on the
// Intel host). Row row0 + t holds pixel g0 + t; channels past OCg are zeros.
FASTCONV_AVX512 inline void transpose_grad_output_panels(const float* go, const Conv2dParams& p, int64_t oc0,
                                                         int64_t OCg, int64_t g0, int64_t g1, int64_t rows,
                                                         int64_t row0, float* base) {
  const int64_t vectors = ceil_div(OCg, 16);
  transpose_grad_output_blocks(go, p, oc0, OCg, g0, g1, [&](int64_t v, int64_t t, __m512 r) FASTCONV_AVX512 {
    int64_t v0, nv;
    tile_of_vector(vectors, v, v0, nv);
    _mm512_storeu_ps(base + v0 * 16 * rows + (row0 + t) * 16 * nv + (v - v0) * 16, r);
  });
}

// dst[t][o] = go[n][oc0 + o][q] for g = g0 + t = n*L + q, o < OCg (rows `ld` floats apart).
FASTCONV_AVX512 inline void transpose_grad_output(const float* go, const Conv2dParams& p, int64_t oc0, int64_t OCg,
                                                  int64_t g0, int64_t g1, int64_t ld, float* dst) {
  transpose_grad_output_blocks(go, p, oc0, OCg, g0, g1, [&](int64_t v, int64_t t, __m512 r) FASTCONV_AVX512 {
    _mm512_mask_storeu_ps(dst + t * ld + 16 * v, lane_mask(0, OCg - 16 * v), r);
  });
}

// acc[k][o] (rows `ldo` apart) = init + sum over t < len of cols[k][t] * b[t][o], for k < rows and o < OCg
// (cols rows `npix` apart; b: the panels of transpose_grad_output_panels at `panels`, `panel_rows`
// rows each, from row t_off): backward-weight's GEMM over one block of pixels.
FASTCONV_AVX512 inline void weight_grad_rows(const float* cols, int64_t npix, int64_t rows, int64_t len,
                                             const float* panels, int64_t panel_rows, int64_t t_off, int64_t OCg,
                                             int64_t ldo, float* acc, Init init) {
  const int64_t oc_vectors = ceil_div(OCg, 16);
  for (int64_t o0 = 0, nv = 0; o0 < OCg; o0 += 16 * nv) {
    nv = vectors_of_tile(oc_vectors, o0 / 16);
    const PanelB b{panels + o0 * panel_rows + t_off * 16 * nv, 16 * nv};
    for (int64_t r = 0; r < rows; r += kTileRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kTileRows, rows - r));
      TileDest d;
      d.ldc = ldo;
      for (int v = 0; v < kTileVectors; ++v) {
        d.ptr[v][0] = d.ptr[v][1] = acc + r * ldo + o0 + 16 * v;
        d.mask[v][0] = v < nv ? __mmask16(0xFFFF) : __mmask16(0);
        d.mask[v][1] = 0;
      }
      run_micro_kernel(mr, static_cast<int>(nv), len, cols + r * npix, npix, 1, b, d, init, nullptr);
    }
  }
}

// Backward-weight split over the rows of grad_W^T (C*KH*KW, in blocks of `kc`): every task reduces over
// all pixels into its own rows, which stay in L2, so there are no per-thread partials to sum and the
// result does not depend on the thread count. Pixels go in chunks: grad_output^T of a chunk is
// transposed once (in parallel) and shared by the tasks, which pack their own column rows.
inline void backward_weight_by_rows(const float* grad_output, const float* input, float* grad_weight,
                                    const Conv2dParams& p, const BalancedItems& row_blocks, bool as_is) {
  const int64_t G = p.groups, OCg = p.out_channels_per_group(), Kg = p.col_rows_per_group();
  const int64_t Cg = p.in_channels_per_group(), total = p.batch * p.out_plane();
  const int64_t ldo = ceil_div(OCg, 16) * 16;
  const int64_t npix = std::min<int64_t>(512, total);  // pixels per packed column block (the reduction per call)
  const int64_t chunk = std::min(total, std::max<int64_t>(1, (int64_t(2) << 20) / (G * ldo * 4) / npix) * npix);
  const int64_t k_blocks = row_blocks.count, tasks = G * k_blocks, kc = row_blocks.largest();
  std::unique_ptr<float[]> gwt(new float[G * Kg * ldo]);     // grad_W^T [g][k][ldo]; the first block writes it
  std::unique_ptr<float[]> got(new float[G * chunk * ldo]);  // grad_output^T of a chunk, panels per group
  for (int64_t c0 = 0; c0 < total; c0 += chunk) {
    const int64_t c1 = std::min(total, c0 + chunk), pieces = ceil_div(c1 - c0, npix);
    at::parallel_for(0, G * pieces, grain_for(npix * ldo), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t g = b / pieces, t0 = c0 + (b % pieces) * npix, t1 = std::min(c1, t0 + npix);
        transpose_grad_output_panels(grad_output, p, g * OCg, OCg, t0, t1, chunk, t0 - c0, got.get() + g * chunk * ldo);
      }
    });
    at::parallel_for(0, tasks, 1, [&](int64_t b0, int64_t b1) {
      thread_local AlignedBuffer cbuf;
      float* cols = cbuf.get(kc * npix + kPanelPad);
      std::vector<Segment> segs;
      for (int64_t task = b0; task < b1; ++task) {
        const int64_t g = task / k_blocks, k0 = row_blocks.begin(task % k_blocks);
        const int64_t kn = row_blocks.end(task % k_blocks) - k0;
        for (int64_t t0 = c0; t0 < c1; t0 += npix) {
          const int64_t t1 = std::min(c1, t0 + npix), len = t1 - t0;
          make_segments(p, t0, t1, npix, 0, segs);  // one panel: cols[k][t]
          pack_columns(input, p, g * Cg, k0, k0 + kn, segs, npix, cols);
          const Init init = t0 == 0 ? Init::kZero : Init::kAccumulate;
          weight_grad_rows(cols, npix, kn, len, got.get() + g * chunk * ldo, chunk, t0 - c0, OCg, ldo,
                           gwt.get() + (g * Kg + k0) * ldo, init);
        }
      }
    });
  }
  write_grad_weight(gwt.get(), 1, 0, p, ldo, grad_weight, as_is);
}

// acc[k*ldo + o][lane] += the lane's share of sum over t < len of go[o*go_ld + t] * cols[k*cols_ld + t],
// for o < OCB, k < KB: the reduction in the vector lanes, each element a vector of 16 partial sums
// (summed across lanes once, at the end). For layers with few column rows (first layers, C*KH*KW <=
// kDotRows), where the GEMM form spent more time transposing grad_output than multiplying (MNIST CNN
// conv1: 24% vs 13% of its time).
template <int OCB, int KB>
FASTCONV_AVX512 void weight_grad_dots(const float* go, int64_t go_ld, const float* cols, int64_t cols_ld, int64_t len,
                                      float* acc, int64_t ldo) {
  __m512 sum[OCB][KB];
  _Pragma("GCC unroll 3") for (int i = 0; i < OCB; ++i) {
    _Pragma("GCC unroll 9") for (int j = 0; j < KB; ++j) sum[i][j] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < len; t += 16) {
    const __mmask16 m = lane_mask(0, len - t);
    __m512 a[OCB];
    _Pragma("GCC unroll 3") for (int i = 0; i < OCB; ++i) a[i] = _mm512_maskz_loadu_ps(m, go + i * go_ld + t);
    _Pragma("GCC unroll 9") for (int j = 0; j < KB; ++j) {
      const __m512 b = _mm512_maskz_loadu_ps(m, cols + j * cols_ld + t);
      _Pragma("GCC unroll 3") for (int i = 0; i < OCB; ++i) sum[i][j] = _mm512_fmadd_ps(a[i], b, sum[i][j]);
    }
  }
  _Pragma("GCC unroll 3") for (int i = 0; i < OCB; ++i) {
    _Pragma("GCC unroll 9") for (int j = 0; j < KB; ++j) {
      float* v = acc + (j * ldo + i) * 16;
      _mm512_storeu_ps(v, _mm512_add_ps(_mm512_loadu_ps(v), sum[i][j]));
    }
  }
}

// dst[e] = the sum of the 16 floats at src + 16e, for e < n.
FASTCONV_AVX512 inline void sum_lanes(const float* src, int64_t n, float* dst) {
  for (int64_t e = 0; e < n; ++e) dst[e] = _mm512_reduce_add_ps(_mm512_loadu_ps(src + 16 * e));
}

// Column rows up to which backward-weight takes the dot form (measured, 2 threads, Zen 4, against the
// GEMM form: MNIST CNN conv1 (9 rows) 0.73x, LeNet conv1 (25) 0.59x, a 3x3 conv on 3 channels (27)
// 1.07x the time).
constexpr int64_t kDotRows = 25;
// ... and output channels (per group) up to which it does at any row count: the GEMM form's columns
// are the output channels, a 16-lane vector for 2-8 of them (measured, 2 threads, Intel host, batch 8,
// against the GEMM form: ResNeXt's 32 groups of 4 at 56x56 0.43x the time, 4->8 per group at 112x112
// 0.58x, 32 groups of 8 at 28x28 0.88x, 8 groups of 8 0.79x, groups of 8 at stride 2 1.21x; at 16 per
// group 1.3-1.9x), while its lane partials fit in L2.
constexpr int64_t kDotMaxOutChannels = 8;
constexpr int kDotOc = 3, kDotK = 9;  // register block: 3 output channels x 9 column rows (27 zmm)

inline void run_weight_grad_dots(int ocb, int kb, const float* go, int64_t go_ld, const float* cols, int64_t cols_ld,
                                 int64_t len, float* acc, int64_t ldo) {
  using Fn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
#define FASTCONV_DOTS(O)                                                                              \
  weight_grad_dots<O, 1>, weight_grad_dots<O, 2>, weight_grad_dots<O, 3>, weight_grad_dots<O, 4>,     \
      weight_grad_dots<O, 5>, weight_grad_dots<O, 6>, weight_grad_dots<O, 7>, weight_grad_dots<O, 8>, \
      weight_grad_dots<O, 9>
  static constexpr Fn table[kDotOc][kDotK] = {{FASTCONV_DOTS(1)}, {FASTCONV_DOTS(2)}, {FASTCONV_DOTS(3)}};
#undef FASTCONV_DOTS
  table[ocb - 1][kb - 1](go, go_ld, cols, cols_ld, len, acc, ldo);
}

// acc[(i*Kg + kk)*16 + lane] = the lane's share of the sum over `images` virtual planes of go[i][t] *
// src[off[kk] + t], for i < OB output channels (rows `go_ld` floats apart) and kk < KB column rows (input
// offsets `off`), t over nvec vectors of 16 under masks[v] (the lanes of real output columns); image m
// at go + m * go_image, src + m * src_image.
template <int OB, int KB>
FASTCONV_AVX512 void implicit_dots(const float* go, int64_t go_ld, int64_t go_image, const float* src,
                                   int64_t src_image, int64_t images, const int64_t* off, const __mmask16* masks,
                                   int64_t nvec, float* acc, int64_t Kg) {
  __m512 sum[OB][KB];
  _Pragma("GCC unroll 3") for (int i = 0; i < OB; ++i) {
    _Pragma("GCC unroll 9") for (int j = 0; j < KB; ++j) sum[i][j] = _mm512_setzero_ps();
  }
  for (int64_t m = 0; m < images; ++m) {
    const float* gm = go + m * go_image;
    const float* s[KB];
    _Pragma("GCC unroll 9") for (int j = 0; j < KB; ++j) s[j] = src + m * src_image + off[j];
    for (int64_t v = 0; v < nvec; ++v) {
      const __mmask16 mk = masks[v];
      __m512 a[OB];
      _Pragma("GCC unroll 3") for (int i = 0; i < OB; ++i) a[i] = _mm512_maskz_loadu_ps(mk, gm + i * go_ld + 16 * v);
      _Pragma("GCC unroll 9") for (int j = 0; j < KB; ++j) {
        const __m512 b = _mm512_maskz_loadu_ps(mk, s[j] + 16 * v);
        _Pragma("GCC unroll 3") for (int i = 0; i < OB; ++i) sum[i][j] = _mm512_fmadd_ps(a[i], b, sum[i][j]);
      }
    }
  }
  _Pragma("GCC unroll 3") for (int i = 0; i < OB; ++i) {
    _Pragma("GCC unroll 9") for (int j = 0; j < KB; ++j) _mm512_storeu_ps(acc + (i * Kg + j) * 16, sum[i][j]);
  }
}

inline void run_implicit_dots(int ob, int kb, const float* go, int64_t go_ld, int64_t go_image, const float* src,
                              int64_t src_image, int64_t images, const int64_t* off, const __mmask16* masks,
                              int64_t nvec, float* acc, int64_t Kg) {
  using Fn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, const int64_t*, const __mmask16*,
                      int64_t, float*, int64_t);
#define FASTCONV_IDOTS(O)                                                                                  \
  implicit_dots<O, 1>, implicit_dots<O, 2>, implicit_dots<O, 3>, implicit_dots<O, 4>, implicit_dots<O, 5>, \
      implicit_dots<O, 6>, implicit_dots<O, 7>, implicit_dots<O, 8>, implicit_dots<O, 9>
  static constexpr Fn table[kDotOc][kDotK] = {{FASTCONV_IDOTS(1)}, {FASTCONV_IDOTS(2)}, {FASTCONV_IDOTS(3)}};
#undef FASTCONV_IDOTS
  table[ob - 1][kb - 1](go, go_ld, go_image, src, src_image, images, off, masks, nvec, acc, Kg);
}

// Backward-weight of stride-1 layers with at most 8 output channels per group (grouped layers such as
// ResNeXt's first stages) in the dot form without im2col: the input is zero-padded once and
// grad_output copied onto the padded width (a virtual plane of OH x Wp pixels, zero past the real
// columns), so the input under tap k of virtual pixel t is padded[t + off(k)] for every t, and each
// register block of output channels x column rows reads both straight from the planes, 16 pixels per
// step, lanes past the real columns masked off. With im2col the column matrix had to be written and
// read again for every handful of output channels that use it. Tasks are groups x chunks of images;
// each reduces its images into lane partials (16 per element of grad_W, summed across lanes at the
// end), chunks summed in order (deterministic). Measured (2 threads, Intel host, batch 8, against the
// GEMM form or the packed dot form): 32 groups of 8 at 28x28 0.53x the time (1.9-2.1 -> 1.1x torch), at
// 14x14 0.60x, 8 groups of 8 at 56x56 0.73x, groups of 4 0.9-0.95x; with 16 output channels per group
// on 14x14 planes level, 32 on 7x7 1.5x slower (short planes: 4 vectors per image and channel pair,
// 13% of the time in the two plane copies, 8% summing lanes), so those keep the GEMM form.
inline bool weight_grad_implicit_dots(const Conv2dParams& p) {
  const int64_t OCg = p.out_channels_per_group(), Kg = p.col_rows_per_group();
  if (p.stride_h != 1 || p.stride_w != 1 || p.is_pointwise() || Kg <= kDotRows || OCg > kDotMaxOutChannels) {
    return false;
  }
  return OCg * Kg * 16 * 4 <= kMaxPartialBytes && padded_input_bytes(p) <= kMaxPaddedCopyBytes;
}

inline void backward_weight_implicit_dots(const float* grad_output, const float* input, float* grad_weight,
                                          const Conv2dParams& p) {
  const int64_t N = p.batch, C = p.in_channels, OC = p.out_channels, G = p.groups;
  const int64_t Cg = p.in_channels_per_group(), OCg = p.out_channels_per_group(), Kg = p.col_rows_per_group();
  const int64_t Hp = p.in_h + 2 * p.pad_h, Wp = p.in_w + 2 * p.pad_w, plane = Hp * Wp;
  const int64_t vplane = p.out_h * Wp, nvec = ceil_div(vplane, 16);
  // both group-major ([g][n][channel of the group][plane]): a task's planes are contiguous
  thread_local AlignedBuffer pad_buf(false), go_buf(false);  // written in full; kept across calls
  float* padded = pad_buf.get(N * C * plane);
  float* gov = go_buf.get(N * OC * vplane);
  at::parallel_for(0, G * N, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g = b / N, n = b % N;
      copy_padded(input + (n * C + g * Cg) * p.in_h * p.in_w, Cg, p.in_h, p.in_w, padded + b * Cg * plane, Hp, Wp,
                  p.pad_h, p.pad_w);
      copy_padded(grad_output + (n * OC + g * OCg) * p.out_plane(), OCg, p.out_h, p.out_w, gov + b * OCg * vplane,
                  p.out_h, Wp, 0, 0);
    }
  });
  const std::vector<int64_t> off = padded_tap_offsets(p, Kg, plane, Wp);
  const std::vector<__mmask16> masks = lane_masks(nvec, [&](int64_t t) { return t < vplane && t % Wp < p.out_w; });
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::clamp<int64_t>(ceil_div(2 * threads, G), 1, N);
  const int64_t part = G * OCg * Kg;
  std::unique_ptr<float[]> parts(new float[(chunks - 1) * part]);  // chunk 0 writes grad_weight
  at::parallel_for(0, G * chunks, 1, [&](int64_t t0, int64_t t1) {
    thread_local AlignedBuffer vbuf;
    float* vacc = vbuf.get(OCg * Kg * 16);  // lane partials, each written by one call (no zeroing)
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t g = task / chunks, ch = task % chunks;
      const int64_t n0 = ch * N / chunks, n1 = (ch + 1) * N / chunks;
      const float* src = padded + (g * N + n0) * Cg * plane;
      const float* go = gov + (g * N + n0) * OCg * vplane;
      for (int64_t k0 = 0; k0 < Kg; k0 += kDotK) {
        for (int64_t o0 = 0; o0 < OCg; o0 += kDotOc) {  // every lane partial written once
          run_implicit_dots(static_cast<int>(std::min<int64_t>(kDotOc, OCg - o0)),
                            static_cast<int>(std::min<int64_t>(kDotK, Kg - k0)), go + o0 * vplane, vplane, OCg * vplane,
                            src, Cg * plane, n1 - n0, off.data() + k0, masks.data(), nvec, vacc + (o0 * Kg + k0) * 16,
                            Kg);
        }
      }
      float* dst = (ch == 0 ? grad_weight : parts.get() + (ch - 1) * part) + g * OCg * Kg;
      sum_lanes(vacc, OCg * Kg, dst);
    }
  });
  if (chunks > 1) {
    at::parallel_for(0, part, grain_for(chunks), [&](int64_t e0, int64_t e1) {
      for (int64_t ch = 1; ch < chunks; ++ch) {
        const float* src = parts.get() + (ch - 1) * part;
        for (int64_t e = e0; e < e1; ++e) grad_weight[e] += src[e];
      }
    });
  }
}

// Backward-weight split over pixels: one partial grad_W^T per slot of items, summed in order (for layers
// with too few column rows to share out, e.g. a first layer with C*KH*KW = 9).
inline void backward_weight_by_pixels(const float* grad_output, const float* input, float* grad_weight,
                                      const Conv2dParams& p, bool as_is) {
  const int64_t G = p.groups, OCg = p.out_channels_per_group(), Kg = p.col_rows_per_group();
  const int64_t Cg = p.in_channels_per_group(), L = p.out_plane(), total = p.batch * L;
  const int64_t ldo = ceil_div(OCg, 16) * 16;       // grad_output^T rows, padded to whole vectors
  const BalancedItems pixel_items(total, 256, 16);  // the reduction per item: about 256 pixels
  const int64_t npix = pixel_items.largest(), items = pixel_items.count;
  const KBlocks kb(Kg, std::max<int64_t>(kTileRows, kColumnBlockBytes / (npix * 4) / kTileRows * kTileRows));
  const int64_t slots = std::min<int64_t>(at::get_num_threads(), items);
  const int64_t part = G * Kg * ldo;  // grad_W^T per group: [Kg][ldo]
  // see weight_grad_dots: its lane partials (16 floats per element) while they fit in L2
  const bool dots = Kg <= kDotRows || (OCg <= kDotMaxOutChannels && 16 * part * 4 <= 2 * kMaxPartialBytes);
  // not zeroed (but for the dot form): the first item of each slot writes its whole partial (Init::kZero)
  std::unique_ptr<float[]> parts(new float[slots * part]);
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    thread_local AlignedBuffer cbuf, obuf, vbuf;
    float* cols = cbuf.get(kb.size * npix + kPanelPad);
    float* goT = obuf.get(npix * ldo);
    std::vector<Segment> segs;
    for (int64_t s = s0; s < s1; ++s) {
      float* acc = parts.get() + s * part;
      float* vacc = dots ? vbuf.get(16 * part) : nullptr;  // the dot form's lane partials
      if (dots) std::fill(vacc, vacc + 16 * part, 0.f);
      for (int64_t item = s * items / slots; item < (s + 1) * items / slots; ++item) {
        const int64_t g0 = pixel_items.begin(item), g1 = pixel_items.end(item), len = g1 - g0;
        make_segments(p, g0, g1, npix, 0, segs);  // one panel: cols[k][t]
        if (dots) {
          for (int64_t g = 0; g < G; ++g) {
            for (int64_t b = 0; b < kb.count; ++b) {
              const int64_t kb0 = b * kb.size, kb1 = std::min(Kg, kb0 + kb.size);
              pack_columns(input, p, g * Cg, kb0, kb1, segs, npix, cols);
              for (int64_t t0 = g0; t0 < g1;) {  // grad_output rows are contiguous within an image
                const int64_t n = t0 / L, q = t0 % L, seg = std::min(L - q, g1 - t0);
                const float* go = grad_output + (n * p.out_channels + g * OCg) * L + q;
                for (int64_t k0 = kb0; k0 < kb1; k0 += kDotK) {
                  for (int64_t o0 = 0; o0 < OCg; o0 += kDotOc) {
                    run_weight_grad_dots(static_cast<int>(std::min<int64_t>(kDotOc, OCg - o0)),
                                         static_cast<int>(std::min<int64_t>(kDotK, kb1 - k0)), go + o0 * L, L,
                                         cols + (k0 - kb0) * npix + (t0 - g0), npix, seg,
                                         vacc + ((g * Kg + k0) * ldo + o0) * 16, ldo);
                  }
                }
                t0 += seg;
              }
            }
          }
          continue;
        }
        const Init first = item == s * items / slots ? Init::kZero : Init::kAccumulate;
        for (int64_t g = 0; g < G; ++g) {
          transpose_grad_output_panels(grad_output, p, g * OCg, OCg, g0, g1, npix, 0, goT);
          float* acc_g = acc + g * Kg * ldo;
          if (p.is_pointwise() && L >= 128) {
            // 1x1: the column rows are the input's own rows, read in place (rows L floats apart) per
            // image the item touches; packing them was a copy, 18% of 512->128 at 28x28. Measured (2
            // threads, Intel host, batch 8, against packing): 0.75-0.85x the time on 14x14-56x56 planes;
            // on 7x7 planes 0.93-1.09x (49-pixel reductions per call), so not there.
            for (int64_t t0 = g0; t0 < g1;) {
              const int64_t n = t0 / L, q = t0 % L, seg = std::min(L - q, g1 - t0);
              weight_grad_rows(input + (n * p.in_channels + g * Cg) * L + q, L, Kg, seg, goT, npix, t0 - g0, OCg, ldo,
                               acc_g, t0 == g0 ? first : Init::kAccumulate);
              t0 += seg;
            }
            continue;
          }
          for (int64_t b = 0; b < kb.count; ++b) {
            const int64_t k0 = b * kb.size, kc = std::min(kb.size, Kg - k0);
            pack_columns(input, p, g * Cg, k0, k0 + kc, segs, npix, cols);
            weight_grad_rows(cols, npix, kc, len, goT, npix, 0, OCg, ldo, acc_g + k0 * ldo, first);
          }
        }
      }
      if (dots) {
        sum_lanes(vacc, part, acc);
      }
    }
  });
  write_grad_weight(parts.get(), slots, part, p, ldo, grad_weight, as_is);
}

// By pixels while a partial grad_W^T fits in L2 (each item's freshly transposed grad_output is reused by
// every row there); by rows when partials would live in L3 (measured, 2 threads on Zen 4: AlexNet
// conv3-5 1.09-1.12x -> 0.99-1.03x torch; MNIST conv2 and ResNet 3x3 128 faster by pixels).
inline void backward_weight_split(const float* grad_output, const float* input, float* grad_weight,
                                  const Conv2dParams& p, bool as_is) {
  if (!as_is && weight_grad_implicit_dots(p)) return backward_weight_implicit_dots(grad_output, input, grad_weight, p);
  // rows per task: about four tasks per thread, 8 to 64 rows (whole blocks of the micro-kernel's 8),
  // as many tasks per group as threads share evenly
  const int64_t threads = at::get_num_threads(), Kg = p.col_rows_per_group();
  const int64_t kc =
      std::clamp<int64_t>(ceil_div(ceil_div(p.groups * Kg, 4 * threads), kTileRows) * kTileRows, kTileRows, 64);
  const BalancedItems row_blocks(Kg, kc, kTileRows);
  const int64_t partial_bytes = p.groups * Kg * ceil_div(p.out_channels_per_group(), 16) * 16 * 4;
  if (partial_bytes <= kMaxPartialBytes || p.groups * row_blocks.count < 2 * threads) {
    return backward_weight_by_pixels(grad_output, input, grad_weight, p, as_is);
  }
  backward_weight_by_rows(grad_output, input, grad_weight, p, row_blocks, as_is);
}

// The engine transposes grad_output (each pixel block, once) and reuses it for every column row, so a
// 1x1 layer (one group) with fewer input than output channels runs as the swapped problem: the input
// as "grad_output" (transposed, C rows), grad_output as the "input" (its OC rows read in place), the
// result [OC][C] written as it is. Measured (2 threads, Intel host, in-process interleaved), the direct
// form's time against the swapped one: ResNet-50's 1x1 layers at batch 8 64->256 at 56x56 1.21x,
// 512->2048 at 7x7 1.37x (1.49x at batch 1), 128->512 at 28x28 1.08x, 256->1024 at 14x14 1.06x,
// 256->512 at 56x56 1.09x; 32->64 at 14x14 (batch 100) 1.02x.
inline void backward_weight(const float* grad_output, const float* input, float* grad_weight,
                            const Conv2dParams& params) {
  const Conv2dParams p = flatten_pointwise(params);
  if (p.is_pointwise() && p.groups == 1 && p.in_channels < p.out_channels) {
    Conv2dParams q = p;
    std::swap(q.in_channels, q.out_channels);
    return backward_weight_split(input, grad_output, grad_weight, q, true);
  }
  backward_weight_split(grad_output, input, grad_weight, p, false);
}

}  // namespace engine
}  // namespace cpu
}  // namespace fastconv
#endif  // FASTCONV_HAVE_AVX512_KERNELS
