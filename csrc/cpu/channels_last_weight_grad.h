// Backward-weight as a direct convolution over a zero-padded channels-last copy of the input, for
// float32 on AVX-512 (any stride, padding, dilation, groups).
//
//   grad_W[o][c][tap] = sum over pixels px of grad_output[o][px] * x[c][px's input position + tap]
//
// With the input copied once into [g][n][Hp][Wp][Cv] (Cv: a group's input channels rounded up to
// whole vectors of 16), the 16 channels of one vector at any pixel and tap are one aligned load at a
// fixed offset from the pixel's position (OffsetB: a table of pixel offsets, one base per tap), and
// grad_output's rows are the broadcast operand read in order: the micro-kernel of gemm.h runs with the
// output channels as its 8 rows, (channel vector, tap) pairs as its 1-3 vectors and the pixels as the
// reduction, with no im2col packing at all (the GEMM engine packs every column element once per
// call and transposes grad_output per pixel block: 14% and 7% of ResNet-18's 3x3/2 64->128 backward-
// weight at batch 8 on one Zen 4 core, and on grouped layers, whose few output channels reuse each
// packed element only OCg/16 times, most of the time).
//
// Tasks are (group, block of 8 output channels, channel vector): each reduces over every pixel of the
// batch into its own KH*KW x 8 x 16 tile and writes its part of grad_weight, so the result is the same
// at any thread count and there are no partials to add. Tasks number G * ceil(OCg/8) * Cv/16 (16 for
// the MNIST CNN's conv2, 256 for ResNeXt's 32 groups of 32, 2048 for ResNet's 512 at 7x7): work for 64
// threads on the layers this serves.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "conv_params.h"
#include "cpu/conv2d_avx512.h"
#include "cpu/gemm.h"

#if FASTCONV_HAVE_AVX512_KERNELS
namespace fastconv {
namespace cpu {
namespace engine {

// The padded copy's geometry: the rows and columns the output pixels' taps reach.
struct ChannelsLastCopy {
  int64_t Hp, Wp, Cv;
  explicit ChannelsLastCopy(const Conv2dParams& p)
      : Hp((p.out_h - 1) * p.stride_h + (p.kernel_h - 1) * p.dilation_h + 1),
        Wp((p.out_w - 1) * p.stride_w + (p.kernel_w - 1) * p.dilation_w + 1),
        Cv(ceil_div(p.in_channels_per_group(), 16) * 16) {}
  int64_t image() const { return Hp * Wp * Cv; }
};

// dst[g][n][y][x][c] = input[n][g*Cg + c][y - pad_h][x - pad_w] (zero outside the input and for c >= Cg):
// from an NCHW input by register transposes; from an NHWC one (nhwc) each pixel's group channels copied
// as they are (whole rows where one group fills the vectors).
inline void copy_channels_last(const float* input, const Conv2dParams& p, const ChannelsLastCopy& s, float* dst,
                               bool nhwc = false) {
  const int64_t G = p.groups, N = p.batch, C = p.in_channels, Cg = p.in_channels_per_group(), H = p.in_h, W = p.in_w;
  const int64_t plane = H * W, vectors = s.Cv / 16;
  at::parallel_for(0, G * N * s.Hp, grain_for(s.Wp * s.Cv), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g = b / (N * s.Hp), n = (b / s.Hp) % N, y = b % s.Hp, ih = y - p.pad_h;
      float* row = dst + b * s.Wp * s.Cv;
      if (ih < 0 || ih >= H) {
        std::memset(row, 0, sizeof(float) * s.Wp * s.Cv);
        continue;
      }
      // input columns [w0, w1) land in the copy's columns [w0 + pad_w, w1 + pad_w)
      const int64_t w0 = std::max<int64_t>(0, -p.pad_w), w1 = std::min<int64_t>(W, s.Wp - p.pad_w);
      const int64_t x0 = w0 + p.pad_w, x1 = std::max(x0, w1 + p.pad_w);
      std::memset(row, 0, sizeof(float) * x0 * s.Cv);
      std::memset(row + x1 * s.Cv, 0, sizeof(float) * (s.Wp - x1) * s.Cv);
      if (x1 == x0) continue;
      if (nhwc) {
        const float* src = input + ((n * H + ih) * W + w0) * C + g * Cg;
        if (G == 1 && Cg == s.Cv) {
          std::memcpy(row + x0 * s.Cv, src, sizeof(float) * (x1 - x0) * C);
          continue;
        }
        for (int64_t x = x0; x < x1; ++x, src += C) {
          std::memcpy(row + x * s.Cv, src, sizeof(float) * Cg);
          std::memset(row + x * s.Cv + Cg, 0, sizeof(float) * (s.Cv - Cg));
        }
        continue;
      }
      for (int64_t v = 0; v < vectors; ++v) {
        const int64_t c0 = 16 * v;
        const float* src = input + ((n * C + g * Cg + c0) * H + ih) * W + w0;
        float* d = row + x0 * s.Cv + c0;
        transpose_columns(src, plane, std::min<int64_t>(16, Cg - c0), w1 - w0,
                          [&](int64_t i, __m512 col) FASTCONV_AVX512 { _mm512_store_ps(d + i * s.Cv, col); });
      }
    }
  });
}

// nhwc: grad_output and the input NHWC (the copy made from the input's pixels, grad_output's rows by one
// transpose), where the NCHW route transposed both in and the copy transposed the input back.
inline void backward_weight_channels_last(const float* grad_output, const float* input, float* grad_weight,
                                          const Conv2dParams& p, bool nhwc = false) {
  const ChannelsLastCopy s(p);
  const int64_t G = p.groups, OCg = p.out_channels_per_group(), Cg = p.in_channels_per_group();
  const int64_t N = p.batch, L = p.out_plane(), NL = N * L, KK = p.kernel_h * p.kernel_w;
  const int64_t oc_blocks = ceil_div(OCg, kTileRows), cvecs = s.Cv / 16;
  // per calling thread, kept across calls (fresh buffers of these sizes page-fault on every call under
  // glibc's default allocator); written in full before any read
  thread_local AlignedBuffer copy_buf(false), go_buf(false);
  thread_local std::vector<int64_t> koff;
  float* x = copy_buf.get(G * N * s.image());
  copy_channels_last(input, p, s, x, nhwc);
  // grad_output as rows of the batch's pixels: [oc][n*L + q] (in place at batch 1)
  const float* go = grad_output;
  if (nhwc) {
    float* t = go_buf.get(p.out_channels * NL);
    transpose_batch(grad_output, 1, NL, p.out_channels, t);
    go = t;
  } else if (N > 1) {
    float* t = go_buf.get(p.out_channels * NL);
    at::parallel_for(0, p.out_channels, grain_for(NL), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t n = 0; n < N; ++n)
          std::memcpy(t + c * NL + n * L, grad_output + (n * p.out_channels + c) * L, sizeof(float) * L);
      }
    });
    go = t;
  }
  // each pixel's top-left tap in the copy; a tap adds tap_off[t]
  nhwc_pixel_offsets(p, s.Hp, s.Wp, s.Cv, koff);
  const int64_t* pixel_off = koff.data();  // (a thread_local named inside the tasks would be the worker's own)
  const std::vector<int64_t> tap_off = nhwc_tap_offsets(p, s.Wp, s.Cv);
  // pixels per micro-kernel call: the 8 rows of grad_output it broadcasts from stay in L1 (16 KiB)
  const int64_t chunk = std::min<int64_t>(NL, 512);
  at::parallel_for(0, G * oc_blocks * cvecs, 1, [&](int64_t b0, int64_t b1) {
    thread_local AlignedBuffer tile_buf;
    float* tile = tile_buf.get(KK * kTileRows * 16);  // [tap][row][16]
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g = b / (oc_blocks * cvecs), cv = (b / oc_blocks) % cvecs, ob = b % oc_blocks;
      const int64_t o0 = ob * kTileRows;
      const int mr = static_cast<int>(std::min<int64_t>(kTileRows, OCg - o0));
      const float* a = go + (g * OCg + o0) * NL;
      const float* xg = x + g * N * s.image() + 16 * cv;
      for (int64_t k0 = 0; k0 < NL; k0 += chunk) {
        const int64_t len = std::min(chunk, NL - k0);
        const Init init = k0 == 0 ? Init::kZero : Init::kAccumulate;
        for (int64_t t0 = 0, nv = 0; t0 < KK; t0 += nv) {
          nv = vectors_of_tile(KK, t0);
          OffsetB bsrc;
          bsrc.koff = pixel_off + k0;
          TileDest d;
          d.ldc = 16;
          for (int v = 0; v < kTileVectors; ++v) {
            const int64_t t = std::min(t0 + v, KK - 1);
            bsrc.base[v] = xg + tap_off[t];
            d.ptr[v][0] = d.ptr[v][1] = tile + t * kTileRows * 16;
            d.mask[v][0] = v < nv ? __mmask16(0xFFFF) : __mmask16(0);
            d.mask[v][1] = 0;
          }
          run_micro_kernel(mr, static_cast<int>(nv), len, a + k0, NL, 1, bsrc, d, init, nullptr);
        }
      }
      // grad_weight[g*OCg + o0 + i][16 cv + c][t] = tile[t][i][c]
      const int64_t cn = std::min<int64_t>(16, Cg - 16 * cv);
      // 16 taps at a time through register transposes (element by element: 7.5% of ResNet-18's 3x3/2
      // 256->512 backward-weight at batch 8, one thread)
      for (int i = 0; i < mr; ++i) {
        float* dst = grad_weight + ((g * OCg + o0 + i) * Cg + 16 * cv) * KK;
        for (int64_t t0 = 0; t0 < KK; t0 += 16) {
          const int64_t taps = std::min<int64_t>(16, KK - t0);
          const __mmask16 m = lane_mask(0, taps);
          transpose_columns(tile + (t0 * kTileRows + i) * 16, kTileRows * 16, taps, cn,
                            [&](int64_t c, __m512 v)
                                FASTCONV_AVX512 { _mm512_mask_storeu_ps(dst + c * KK + t0, m, v); });
        }
      }
    }
  });
}

// A 1x1 layer's backward-weight straight from NHWC tensors: grad_W[o][c] = sum over pixels px of
// grad_output[px][o] * x[px's input pixel][c], a GEMM whose two operands are both pixel-major: the
// micro-kernel's 8 rows broadcast grad_output's 8 consecutive channels of a pixel, its 3 vectors load 48
// consecutive input channels of the pixel's input position (OffsetB: the stride's pixels by a table of
// offsets, no copy of the input). The pixels run in chunks whose rows of both tensors stay in L2; each
// thread owns blocks of 8 output channels (every input channel of them), so each element of grad_weight
// is summed by one thread in pixel order: the same bits at any thread count. Needs padding 0 and input
// channels a multiple of 16 (whole vectors: unmasked loads).
inline bool pointwise_weight_grad_applicable(const Conv2dParams& p) {
  return p.kernel_h == 1 && p.kernel_w == 1 && p.pad_h == 0 && p.pad_w == 0 && p.groups == 1 && p.in_channels % 16 == 0;
}

inline void backward_weight_pointwise_channels_last(const float* grad_output, const float* input, float* grad_weight,
                                                    const Conv2dParams& p) {
  const int64_t C = p.in_channels, OC = p.out_channels, P = p.batch * p.out_plane();
  std::vector<int64_t> pixel_off;  // each output pixel's input pixel
  nhwc_pixel_offsets(p, p.in_h, p.in_w, C, pixel_off);
  // pixels a chunk: both tensors' rows of the chunk within 512 KiB
  const int64_t chunk = std::max<int64_t>(64, (int64_t(512) << 10) / (4 * (C + OC)));
  const int64_t o_blocks = ceil_div(OC, kTileRows), c_tiles = ceil_div(C, kTileCols);
  at::parallel_for(0, o_blocks, 1, [&](int64_t ob0, int64_t ob1) {
    for (int64_t p0 = 0; p0 < P; p0 += chunk) {
      const int64_t kc = std::min(chunk, P - p0);
      for (int64_t ob = ob0; ob < ob1; ++ob) {
        const int64_t o0 = ob * kTileRows, mr = std::min<int64_t>(kTileRows, OC - o0);
        for (int64_t ct = 0; ct < c_tiles; ++ct) {
          const int64_t c0 = ct * kTileCols, nv = std::min<int64_t>(kTileVectors, (C - c0) / 16);
          OffsetB bs{};
          TileDest d{};
          for (int64_t v = 0; v < nv; ++v) {
            bs.base[v] = input + c0 + 16 * v;
            d.ptr[v][0] = d.ptr[v][1] = grad_weight + o0 * C + c0 + 16 * v;
            d.mask[v][0] = __mmask16(0xFFFF);
          }
          bs.koff = pixel_off.data() + p0;
          d.ldc = C;
          run_micro_kernel(static_cast<int>(mr), static_cast<int>(nv), kc, grad_output + p0 * OC + o0, 1, OC, bs, d,
                           p0 == 0 ? Init::kZero : Init::kAccumulate, nullptr);
        }
      }
    }
  });
}

// Whether the padded copy stays within the engine's copy budget (any float32 layer otherwise).
inline bool channels_last_weight_grad_applicable(const Conv2dParams& p) {
  const ChannelsLastCopy s(p);
  return p.groups * p.batch * s.image() * 4 <= kMaxPaddedCopyBytes;
}

// FASTCONV_CPU_WEIGHT_GRAD=channels-last (1: wherever it applies, before every other kernel) or gemm
// (0: never); -1 otherwise (the rules decide). For tests and comparisons.
inline int channels_last_weight_grad_forced(const Conv2dParams& p) {
  const char* force = std::getenv("FASTCONV_CPU_WEIGHT_GRAD");
  if (force && std::string(force) == "channels-last") return channels_last_weight_grad_applicable(p) ? 1 : -1;
  if (force && std::string(force) == "gemm") return 0;
  return -1;
}

// Where backward-weight takes this form by rule rather than the im2col+GEMM engine: stride 1, at least
// 32 input and output channels a group with at most a quarter of the copy's lanes idle, kernels of 2-9
// taps. Measured (in-process A/B, Zen 4, the GEMM engine's time = 1): ResNeXt's 32 groups of 32 at 7x7
// 0.93-0.95, ResNet-18's 512 at 7x7 0.95-0.96, 256 at 14x14 0.97, AlexNet conv4 at batch 8 0.96 (one
// thread); in the suite (2 threads, against torch, session 16's run -> 84c841f's): ResNeXt's 1.27 ->
// 0.66, ResNet-18's 512 at 7x7 0.99 -> 0.81, 256 at 14x14 1.00 -> 0.87, AlexNet conv4/conv5 at batch 8
// 1.01 -> 0.91.
// Strided layers stay on the GEMM: the copy holds every input pixel for a quarter as many outputs
// (3x3/2 64->128 from 56x56: 0.91-1.06 in A/B runs, 1.03 -> 1.24 against torch in the suite). The
// kernels that go first keep their layers (forced here, 2 threads): the MNIST CNN's conv2 (32 -> 64)
// 1.12-1.15x narrow-direct's time, ResNeXt's groups of 16 at 14x14 1.09-1.15x the grouped direct
// kernel's, AlexNet's 5x5 conv2 1.31-1.54x Winograd's. Below 32 channels a group and past 9 taps it
// was not measured against the GEMM.
inline bool channels_last_weight_grad_wanted(const Conv2dParams& p) {
  const int64_t Cg = p.in_channels_per_group(), KK = p.kernel_h * p.kernel_w;
  return channels_last_weight_grad_applicable(p) && p.stride_h == 1 && p.stride_w == 1 && Cg >= 32 &&
         4 * Cg >= 3 * ChannelsLastCopy(p).Cv && p.out_channels_per_group() >= 32 && KK >= 2 && KK <= 9;
}

}  // namespace engine
}  // namespace cpu
}  // namespace fastconv
#endif  // FASTCONV_HAVE_AVX512_KERNELS
