// Backward-weight of channels_last layers, float32 on AVX-512, reading the NHWC grad_output and input
// in place (cpu/channels_last_weight_grad.h, by contrast, serves NCHW tensors through a channels-last copy
// of the input and a transposed grad_output):
//
//   grad_W[o][c][t] = sum over pixels px of grad_output[px][o] * x[px's input position + tap t][c]
//
// The output channels are the vector lanes (blocks of 1-4 vectors of 16), the rows r = t*C + c
// (tap-major: a tap's channels are consecutive floats of the NHWC input) are the broadcast operand and
// the pixels the reduction: per pixel, its grad_output vectors are loaded once and each row's input
// float is broadcast against them. A register tile is up to 12 rows x 1-2 vectors, 8 x 3 or 6 x 4 (24
// accumulators). The input is read through a zero-padded NHWC copy where the layer pads, else in place.
//
// The NCHW kernels first transpose grad_output and the input: where a layer does few FLOPs an element
// (first layers: 18 for the MNIST CNN's conv1; 1x1 layers) the transposes cost more than the arithmetic
// (the MNIST CNN's conv1 at batch 512: 3.4-4.2x torch's channels_last time that way). Work is cut into
// blocks of pixels whose size depends on the layer only (their data in L2), each summed into a partial
// grad_W of its own, each register tile's accumulators kept over the whole block, the partials added in
// block order: the same bits at any thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_params.h"
#include "cpu/channels_last_conv2d.h"
#include "cpu/conv2d_avx512.h"
#include "cpu/gemm.h"

#if FASTCONV_HAVE_AVX512_KERNELS
namespace fastconv {
namespace cpu {
namespace engine {

// The layers it serves: ungrouped, with the padded copy (channels_last_input's, where the layer pads)
// within the engine's copy budget.
inline bool weight_grad_in_place_applicable(const Conv2dParams& p) {
  if (p.groups != 1) return false;
  if (p.pad_h == 0 && p.pad_w == 0) return true;
  return p.batch * channels_last_padded_rows(p) * channels_last_padded_cols(p) * p.in_channels * 4 <=
         kMaxPaddedCopyBytes;
}

// How many blocks of pixels the kernel sums separately (backward_weight_channels_last_in_place): blocks
// of near-equal size (a short last one left a thread idle: 1x1 64->128/2 at batch 8, 6 x 1024 + 128),
// at most about 512 KiB of grad_output vectors (up to 4 of a pixel) and input pixels each.
inline int64_t weight_grad_in_place_blocks(const Conv2dParams& p) {
  const int64_t OCp = ceil_div(p.out_channels, 16) * 16;
  const int64_t most_block = std::clamp<int64_t>(
      (int64_t(512) << 10) / (4 * (std::min<int64_t>(OCp, 64) + p.in_channels)) / 64 * 64, 512, 4096);
  return ceil_div(p.batch * p.out_plane(), most_block);
}

// A run of consecutive output pixels of one output row: its first pixel's top-left tap at x + off, the
// next ones `step` floats apart (stride_w * C).
struct PixelRun {
  int64_t off, len;
};

// part[r][16v + lane] = sum over the runs' pixels i (in order) of go[i*OC + 16v + lane] *
// x[(pixel i's top-left tap) + roff[r]], for RB rows and NV vectors (the last one's lanes under `last`).
template <int RB, int NV>
FASTCONV_AVX512 void weight_grad_rows(const float* go, int64_t OC, const float* x, const PixelRun* runs, int64_t nruns,
                                      int64_t step, const int64_t* roff, __mmask16 last, float* part, int64_t ldp) {
  __m512 acc[RB][NV];
  int64_t ro[RB];
  _Pragma("GCC unroll 12") for (int r = 0; r < RB; ++r) {
    ro[r] = roff[r];
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) { acc[r][v] = _mm512_setzero_ps(); }
  }
  for (int64_t j = 0; j < nruns; ++j) {
    const float* xp = x + runs[j].off;
    for (int64_t i = 0; i < runs[j].len; ++i, xp += step, go += OC) {
      __m512 g[NV];
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) {
        g[v] = v + 1 < NV ? _mm512_loadu_ps(go + 16 * v) : _mm512_maskz_loadu_ps(last, go + 16 * v);
      }
      _Pragma("GCC unroll 12") for (int r = 0; r < RB; ++r) {
        const __m512 b = _mm512_set1_ps(xp[ro[r]]);
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(b, g[v], acc[r][v]);
      }
    }
  }
  _Pragma("GCC unroll 12") for (int r = 0; r < RB; ++r) {
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) _mm512_store_ps(part + r * ldp + 16 * v, acc[r][v]);
  }
}

// Most rows of a register tile for NV vectors: 24 accumulators (12 rows for one vector: its loads,
// two per row and pixel, are the limit there).
constexpr int weight_grad_tile_rows(int nv) { return nv <= 2 ? 12 : 24 / nv; }

template <int NV>
FASTCONV_AVX512 void run_weight_grad_rows(int rb, const float* go, int64_t OC, const float* x, const PixelRun* runs,
                                          int64_t nruns, int64_t step, const int64_t* roff, __mmask16 last, float* part,
                                          int64_t ldp) {
  switch (rb) {
#define FASTCONV_WEIGHT_GRAD_ROWS_CASE(R)                                                  \
  case R:                                                                                  \
    if constexpr (R <= weight_grad_tile_rows(NV))                                          \
      return weight_grad_rows<R, NV>(go, OC, x, runs, nruns, step, roff, last, part, ldp); \
    break;
    FASTCONV_WEIGHT_GRAD_ROWS_CASE(1)
    FASTCONV_WEIGHT_GRAD_ROWS_CASE(2)
    FASTCONV_WEIGHT_GRAD_ROWS_CASE(3)
    FASTCONV_WEIGHT_GRAD_ROWS_CASE(4)
    FASTCONV_WEIGHT_GRAD_ROWS_CASE(5)
    FASTCONV_WEIGHT_GRAD_ROWS_CASE(6)
    FASTCONV_WEIGHT_GRAD_ROWS_CASE(7)
    FASTCONV_WEIGHT_GRAD_ROWS_CASE(8)
    FASTCONV_WEIGHT_GRAD_ROWS_CASE(9)
    FASTCONV_WEIGHT_GRAD_ROWS_CASE(10)
    FASTCONV_WEIGHT_GRAD_ROWS_CASE(11)
    FASTCONV_WEIGHT_GRAD_ROWS_CASE(12)
#undef FASTCONV_WEIGHT_GRAD_ROWS_CASE
  }
  TORCH_CHECK(false, "fastconv: internal error, in-place backward-weight tile of ", rb, " rows x ", NV, " vectors");
}

// sum[0, n) += src[0, n), 16 floats at a time (n a multiple of 16, both 64-byte aligned).
FASTCONV_AVX512 inline void add_vectors(const float* src, int64_t n, float* sum) {
  for (int64_t o = 0; o < n; o += 16)
    _mm512_store_ps(sum + o, _mm512_add_ps(_mm512_load_ps(sum + o), _mm512_load_ps(src + o)));
}

// grad_weight (NCHW-contiguous [OC][C][KH][KW]) of a channels_last layer from NHWC grad_output and
// NHWC input (weight_grad_in_place_applicable).
inline void backward_weight_channels_last_in_place(const float* grad_output, const float* input, float* grad_weight,
                                                   const Conv2dParams& p) {
  const int64_t C = p.in_channels, OC = p.out_channels, KK = p.kernel_h * p.kernel_w, R = C * KK;
  const int64_t OW = p.out_w, L = p.out_plane(), NL = p.batch * L, step = p.stride_w * C;
  thread_local AlignedBuffer copy_buf(false), part_buf(false);
  // the input in place, or a zero-padded NHWC copy (channels_last_conv2d.h): pixel (n, y, x) at
  // base + n*image + y*row + x*C
  const ClInput x = channels_last_input(input, p, copy_buf);
  const int64_t image = x.Hp * x.Wp * C, row = x.Wp * C;
  // row r = t*C + c reads the pixel's top-left tap + roff[r]
  const std::vector<int64_t> tap_off = nhwc_tap_offsets(p, x.Wp, C);
  std::vector<int64_t> roff(R);
  for (int64_t t = 0; t < KK; ++t) {
    for (int64_t c = 0; c < C; ++c) roff[t * C + c] = tap_off[t] + c;
  }
  // column blocks of at most 4 vectors of output channels; OCp floats a partial row
  const int64_t OCv = ceil_div(OC, 16), OCp = OCv * 16;
  // blocks of pixels, their size set by the layer alone (so the partials, and the bits, are the same at
  // any thread count): a block's grad_output vectors and input pixels in L2, where the row tiles re-read
  // them. Measured, one thread, Zen 4, against blocks of 256+ (64 of them from 16K pixels) each cut into
  // 64-pixel chunks (the grad_output vectors of a chunk in L1 across the row tiles, each tile's
  // accumulators loaded and stored per chunk): the MNIST CNN's conv2 at batch 100 0.88x, its conv1
  // 0.96-0.99x, the ResNet stem 0.90x, AlexNet's conv1 0.88x, 1x1 layers at 28x28-56x56 0.92-0.96x,
  // SimpleConvNet's conv1 0.85x.
  const int64_t blocks = weight_grad_in_place_blocks(p), block = ceil_div(NL, blocks);
  float* parts = part_buf.get(blocks * R * OCp);
  // tasks: (block of pixels, block of at most 4 vectors of output channels, group of row tiles), each
  // writing its own rows of its block's partial; row groups give every thread work where blocks are few
  // (batch 1: one block); they do not change any sum.
  const int64_t cblocks = ceil_div(OCv, 4);
  const int64_t most_tiles = ceil_div(R, weight_grad_tile_rows(std::min<int64_t>(4, OCv)));
  const int64_t rgroups = std::clamp<int64_t>(ceil_div(8 * at::get_num_threads(), blocks * cblocks), 1, most_tiles);
  at::parallel_for(0, blocks * cblocks * rgroups, 1, [&](int64_t b0, int64_t b1) {
    std::vector<PixelRun> runs;
    for (int64_t task = b0; task < b1; ++task) {
      const int64_t rg = task % rgroups, b = task / rgroups / cblocks, v0 = task / rgroups % cblocks * 4;
      const int nv = static_cast<int>(std::min<int64_t>(4, OCv - v0));
      const __mmask16 last = lane_mask(0, OC - 16 * (v0 + nv - 1));
      const int most = weight_grad_tile_rows(nv);
      const int64_t tiles = ceil_div(R, most);
      float* part = parts + b * R * OCp + 16 * v0;
      // the block's runs of pixels along output rows
      const int64_t g0 = b * block, g1 = std::min(NL, g0 + block);
      runs.clear();
      for (int64_t g = g0; g < g1;) {
        const int64_t n = g / L, oh = g % L / OW, ow = g % OW, len = std::min(OW - ow, g1 - g);
        runs.push_back({n * image + oh * p.stride_h * row + ow * step, len});
        g += len;
      }
      const float* gv = grad_output + g0 * OC + 16 * v0;
      const int64_t nr = static_cast<int64_t>(runs.size());
      for (int64_t t = rg * tiles / rgroups; t < (rg + 1) * tiles / rgroups; ++t) {  // near-equal row tiles
        const int64_t r0 = t * R / tiles, r1 = (t + 1) * R / tiles;
        const int rb = static_cast<int>(r1 - r0);
        float* dst = part + r0 * OCp;
        const int64_t* ro = roff.data() + r0;
        switch (nv) {
          case 1:
            run_weight_grad_rows<1>(rb, gv, OC, x.base, runs.data(), nr, step, ro, last, dst, OCp);
            break;
          case 2:
            run_weight_grad_rows<2>(rb, gv, OC, x.base, runs.data(), nr, step, ro, last, dst, OCp);
            break;
          case 3:
            run_weight_grad_rows<3>(rb, gv, OC, x.base, runs.data(), nr, step, ro, last, dst, OCp);
            break;
          default:
            run_weight_grad_rows<4>(rb, gv, OC, x.base, runs.data(), nr, step, ro, last, dst, OCp);
        }
      }
    }
  });
  // grad_weight[o][c][t] = sum over blocks in order of part[b][t*C + c][o]: the blocks added into block
  // 0's partial row by row, 16 lanes at a time, then transposed out
  at::parallel_for(0, R, grain_for(blocks * OCp), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* sum = parts + r * OCp;
      for (int64_t b = 1; b < blocks; ++b) add_vectors(parts + (b * R + r) * OCp, OCp, sum);
      for (int64_t o = 0; o < OC; ++o) grad_weight[(o * C + r % C) * KK + r / C] = sum[o];
    }
  });
}

}  // namespace engine
}  // namespace cpu
}  // namespace fastconv
#endif  // FASTCONV_HAVE_AVX512_KERNELS
