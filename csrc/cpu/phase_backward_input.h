// Backward-input of a strided convolution as stride-1 convolutions, one per phase of grad_input.
//
// With stride s, the input row ih = a + s*i (phase a = ih mod s) receives gradient only through
// the kernel rows kh = r + s*t with r = (a + pad) mod s, from output row oh = i + q - t with
// q = (a + pad) div s. So each phase plane grad_input[:, :, a::s_h, b::s_w] is a stride-1
// correlation of grad_output (shifted by q - (T-1), zero outside) with the sub-kernel of taps
// r, r+s, ... flipped and transposed (in and out channels swap roles). Every phase runs on the
// forward engine, which flattens pixels over the batch: no scatter-add (col2im), no races, and
// the GEMM's long dimension is all phase pixels of all images rather than one image's output
// plane (a 7x7 plane fills one 48-pixel panel and one 1-pixel panel under col2im with one image per
// item, which col2im now keeps only where W^T fits in L2).
//
// Needs stride > 1, dilation 1, groups 1. Not taken by auto any more, a candidate of the "benchmark"
// setting: it was wanted where col2im's per-image GEMM was short (output planes under 128 pixels;
// measured then, 2 threads, Intel Xeon with AMX: ResNet-18's layer4 downsampling 3x3/2, 14x14 -> 7x7,
// 0.82x col2im's time at batch 8, 0.69x at batch 32), until col2im took several images per GEMM
// (conv2d_avx512.h, backward_input_col2im): then col2im measured 0.74x this route's time there at
// batch 8, 0.87x at batch 32, 0.56-0.93x on 3x3/2 and 5x5/2 layers with 16-64 pixel output planes
// (equal on a 2x2/2), interleaved, same host. Copying the weights into the phases' sub-kernels alone
// (4.7 MB through L3 on that layer) took 12-14% of this route.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "conv_params.h"
#include "cpu/channels_last_conv2d.h"
#include "cpu/conv2d_avx512.h"
#include "cpu/flipped_conv.h"

namespace fastconv {
namespace cpu {

inline bool backward_input_by_phases_applicable(const Conv2dParams& p) {
  return (p.stride_h > 1 || p.stride_w > 1) && p.dilation_h == 1 && p.dilation_w == 1 && p.groups == 1;
}

// One dimension of one phase: the phase's rows a, a+s, ... of grad_input (count), the sub-kernel's
// first tap r and tap count taps, and the shift of grad_output: phase row i reads grad_output rows
// i + shift + u for u in [0, taps) against flipped tap u.
struct PhaseDim {
  int64_t count, r, taps, shift;
  PhaseDim(int64_t a, int64_t size, int64_t kernel, int64_t stride, int64_t pad) {
    count = a < size ? (size - a + stride - 1) / stride : 0;
    r = (a + pad) % stride;
    taps = r < kernel ? (kernel - r + stride - 1) / stride : 0;
    shift = (a + pad) / stride - (taps - 1);
  }
  int64_t span() const { return count + taps - 1; }  // grad_output rows the phase reads (padded)
};

// A phase (rows dh, columns dw) of grad_input as a stride-1 forward of grad_output itself (its padding -shift,
// phases_are_padded_forwards): input and output channels swapped as in backward_input_params.
inline Conv2dParams phase_forward_params(const Conv2dParams& p, const PhaseDim& dh, const PhaseDim& dw) {
  Conv2dParams q = backward_input_params(p);  // grad_output in, the channels swapped
  q.kernel_h = dh.taps;
  q.kernel_w = dw.taps;
  q.out_h = dh.count;
  q.out_w = dw.count;
  q.stride_h = q.stride_w = q.dilation_h = q.dilation_w = 1;
  q.pad_h = -dh.shift;
  q.pad_w = -dw.shift;
  return q;
}

// The kernel tap (kh*KW + kw) that each of the phase's flipped taps (u, v) is, in (u, v) order:
// (r_h + s_h (T_h-1-u), r_w + s_w (T_w-1-v)).
inline std::vector<int64_t> phase_taps(const Conv2dParams& p, const PhaseDim& dh, const PhaseDim& dw) {
  std::vector<int64_t> taps;
  for (int64_t u = 0; u < dh.taps; ++u) {
    for (int64_t v = 0; v < dw.taps; ++v)
      taps.push_back((dh.r + p.stride_h * (dh.taps - 1 - u)) * p.kernel_w + dw.r + p.stride_w * (dw.taps - 1 - v));
  }
  return taps;
}

// Whether every phase with pixels has taps (kernel >= stride) and reads grad_output from its first row and
// column on (shift <= 0): then each phase is a stride-1 forward of grad_output itself with padding -shift.
inline bool phases_are_padded_forwards(const Conv2dParams& p) {
  for (int64_t a = 0; a < p.stride_h; ++a) {
    const PhaseDim d(a, p.in_h, p.kernel_h, p.stride_h, p.pad_h);
    if (d.count > 0 && (d.taps == 0 || d.shift > 0)) return false;
  }
  for (int64_t b = 0; b < p.stride_w; ++b) {
    const PhaseDim d(b, p.in_w, p.kernel_w, p.stride_w, p.pad_w);
    if (d.count > 0 && (d.taps == 0 || d.shift > 0)) return false;
  }
  return true;
}

#if FASTCONV_HAVE_AVX512_KERNELS
// grad_input (written whole) from grad_output and weight (OIHW). `forward(input, weight, bias,
// output, params)` is a float32 forward convolution (the engine's). Scratch is per thread and kept
// across calls (fresh buffers of this size page-fault on every call).
template <typename Forward>
void backward_input_by_phases(const float* grad_output, const float* weight, float* grad_input, const Conv2dParams& p,
                              Forward&& forward) {
  const int64_t N = p.batch, C = p.in_channels, OC = p.out_channels, H = p.in_h, W = p.in_w;
  const int64_t OH = p.out_h, OW = p.out_w, KH = p.kernel_h, KW = p.kernel_w, SH = p.stride_h, SW = p.stride_w;
  std::vector<PhaseDim> rows, cols;
  for (int64_t a = 0; a < SH; ++a) rows.emplace_back(a, H, KH, SH, p.pad_h);
  for (int64_t b = 0; b < SW; ++b) cols.emplace_back(b, W, KW, SW, p.pad_w);

  // Every phase's sub-kernel, flipped and transposed, in one pass over the weights (each tap
  // belongs to exactly one phase): wf[phase][c][oc][u][v] = w[oc][c][r_h + s_h(T_h-1-u)][r_w + s_w(T_w-1-v)].
  // Blocks of 16 input channels, so each weight row is read in runs of 16*KH*KW contiguous floats.
  std::vector<int64_t> wf_offset(SH * SW + 1, 0);
  for (int64_t a = 0; a < SH; ++a)
    for (int64_t b = 0; b < SW; ++b)
      wf_offset[a * SW + b + 1] = wf_offset[a * SW + b] + C * OC * rows[a].taps * cols[b].taps;
  thread_local engine::AlignedBuffer wf_buf, gop_buf, out_buf;
  float* wf = wf_buf.get(std::max<int64_t>(1, wf_offset.back()));
  // per kernel row / column: its phase and its flipped tap index there (no divisions in the loop)
  std::vector<int64_t> tap_phase_h(KH), tap_u(KH), tap_phase_w(KW), tap_v(KW);
  for (int64_t a = 0; a < SH; ++a)
    for (int64_t t = 0; t < rows[a].taps; ++t) {
      tap_phase_h[rows[a].r + SH * t] = a;
      tap_u[rows[a].r + SH * t] = rows[a].taps - 1 - t;
    }
  for (int64_t b = 0; b < SW; ++b)
    for (int64_t t = 0; t < cols[b].taps; ++t) {
      tap_phase_w[cols[b].r + SW * t] = b;
      tap_v[cols[b].r + SW * t] = cols[b].taps - 1 - t;
    }
  constexpr int64_t kCB = 16;
  at::parallel_for(0, (C + kCB - 1) / kCB, 1, [&](int64_t cb0, int64_t cb1) {
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      const int64_t c0 = cb * kCB, c1 = std::min(C, c0 + kCB);
      for (int64_t kh = 0; kh < KH; ++kh) {
        const int64_t a = tap_phase_h[kh], TH = rows[a].taps, u = tap_u[kh];
        for (int64_t kw = 0; kw < KW; ++kw) {
          const int64_t b = tap_phase_w[kw], TW = cols[b].taps, tap = u * TW + tap_v[kw];
          float* dst = wf + wf_offset[a * SW + b] + tap;
          const int64_t c_step = OC * TH * TW, oc_step = TH * TW;
          for (int64_t c = c0; c < c1; ++c) {
            const float* src = weight + c * KH * KW + kh * KW + kw;
            float* d = dst + c * c_step;
            for (int64_t oc = 0; oc < OC; ++oc) d[oc * oc_step] = src[oc * C * KH * KW];
          }
        }
      }
    }
  });

  for (int64_t a = 0; a < SH; ++a) {
    const PhaseDim& dh = rows[a];
    for (int64_t b = 0; b < SW; ++b) {
      const PhaseDim& dw = cols[b];
      const int64_t ni = dh.count, nj = dw.count;
      if (ni == 0 || nj == 0) continue;
      if (dh.taps == 0 || dw.taps == 0) {  // no kernel tap reaches these rows/columns: zero gradient
        at::parallel_for(0, N * C, 64, [&](int64_t b0, int64_t b1) {
          for (int64_t nc = b0; nc < b1; ++nc)
            for (int64_t i = 0; i < ni; ++i) {
              float* row = grad_input + nc * H * W + (a + SH * i) * W + b;
              for (int64_t j = 0; j < nj; ++j) row[SW * j] = 0.f;
            }
        });
        continue;
      }
      // grad_output shifted and zero-padded to the phase's span (when it differs from grad_output)
      const int64_t HV = dh.span(), WV = dw.span();
      const float* input = grad_output;
      if (dh.shift != 0 || dw.shift != 0 || HV != OH || WV != OW) {
        float* gop = gop_buf.get(N * OC * HV * WV);  // gop[y][x] = grad_output[y + shift_h][x + shift_w]
        engine::copy_padded(grad_output, N * OC, OH, OW, gop, HV, WV, -dh.shift, -dw.shift);
        input = gop;
      }
      Conv2dParams q{};
      q.batch = N;
      q.in_channels = OC;
      q.in_h = HV;
      q.in_w = WV;
      q.out_channels = C;
      q.kernel_h = dh.taps;
      q.kernel_w = dw.taps;
      q.out_h = ni;
      q.out_w = nj;
      q.stride_h = q.stride_w = q.dilation_h = q.dilation_w = q.groups = 1;
      q.pad_h = q.pad_w = 0;
      float* out = out_buf.get(N * C * ni * nj);
      forward(input, wf + wf_offset[a * SW + b], nullptr, out, q);
      // the phase plane into grad_input[:, :, a::s_h, b::s_w]
      at::parallel_for(0, N * C, std::max<int64_t>(1, 4096 / (ni * nj)), [&](int64_t b0, int64_t b1) {
        for (int64_t nc = b0; nc < b1; ++nc)
          for (int64_t i = 0; i < ni; ++i) {
            const float* src = out + (nc * ni + i) * nj;
            float* row = grad_input + nc * H * W + (a + SH * i) * W + b;
            for (int64_t j = 0; j < nj; ++j) row[SW * j] = src[j];
          }
      });
    }
  }
}

// The same for channels_last tensors (backward_input_by_phases_applicable and phases_are_padded_forwards
// hold): grad_input (NHWC, written whole) from NHWC grad_output and channels_last weights, each phase one
// NHWC direct forward of grad_output (engine::forward_channels_last, padding -shift) with its taps of the
// weights read in place (ClWeights::kFlippedOTI) and its pixels stored straight into grad_input's. No
// transposes of grad_output or grad_input, no copies of the weights or of phase planes.
inline void backward_input_by_phases_channels_last(const float* grad_output, const float* weight, float* grad_input,
                                                   const Conv2dParams& p) {
  const int64_t N = p.batch, C = p.in_channels, H = p.in_h, W = p.in_w, KW = p.kernel_w;
  for (int64_t a = 0; a < p.stride_h; ++a) {
    const PhaseDim dh(a, H, p.kernel_h, p.stride_h, p.pad_h);
    for (int64_t b = 0; b < p.stride_w; ++b) {
      const PhaseDim dw(b, W, KW, p.stride_w, p.pad_w);
      if (dh.count == 0 || dw.count == 0) continue;
      const Conv2dParams q = phase_forward_params(p, dh, dw);
      const engine::ClTaps taps{phase_taps(p, dh, dw), p.kernel_h * KW};
      std::vector<int64_t> pixels(N * dh.count * dw.count);  // phase pixel (n, i, j) in grad_input
      for (int64_t n = 0, r = 0; n < N; ++n) {
        for (int64_t i = 0; i < dh.count; ++i) {
          for (int64_t j = 0; j < dw.count; ++j, ++r)
            pixels[r] = ((n * H + a + p.stride_h * i) * W + b + p.stride_w * j) * C;
        }
      }
      engine::forward_channels_last(grad_output, weight, nullptr, grad_input, q, false, engine::ClWeights::kFlippedOTI,
                                    &taps, pixels.data());
    }
  }
}
#endif  // FASTCONV_HAVE_AVX512_KERNELS

}  // namespace cpu
}  // namespace fastconv
