// Backward-input of a stride-1 convolution as a forward convolution: grad_input is grad_output
// convolved with the weights flipped in space and transposed within each group (in and out channels
// swap roles), with padding dilation*(K-1) - pad. Shared by the packed engine, Winograd and the
// direct grouped kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "conv_params.h"

namespace fastconv {
namespace cpu {

// Whether the transformed padding is non-negative (it is for every usual padding).
inline bool backward_input_as_forward(const Conv2dParams& p) {
  return p.stride_h == 1 && p.stride_w == 1 && p.pad_h <= p.dilation_h * (p.kernel_h - 1) &&
         p.pad_w <= p.dilation_w * (p.kernel_w - 1);
}

// The parameters of that forward convolution (input: grad_output, output: grad_input).
inline Conv2dParams backward_input_params(const Conv2dParams& p) {
  Conv2dParams q = p;
  q.in_channels = p.out_channels;
  q.in_h = p.out_h;
  q.in_w = p.out_w;
  q.out_channels = p.in_channels;
  q.out_h = p.in_h;
  q.out_w = p.in_w;
  q.pad_h = p.dilation_h * (p.kernel_h - 1) - p.pad_h;
  q.pad_w = p.dilation_w * (p.kernel_w - 1) - p.pad_w;
  return q;
}

// Its weights: w_t[g*Cg + c][o][kh][kw] = w[g*OCg + o][c][KH-1-kh][KW-1-kw].
template <typename T>
std::vector<T> flipped_transposed_weight(const T* weight, const Conv2dParams& p) {
  const int64_t G = p.groups, OCg = p.out_channels_per_group(), Cg = p.in_channels_per_group();
  const int64_t KK = p.kernel_h * p.kernel_w;
  std::vector<T> w_t(p.out_channels * Cg * KK);
  at::parallel_for(0, G * OCg, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, Cg * KK)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {  // source row b = g*OCg + o, read contiguously
      const int64_t g = b / OCg, o = b % OCg;
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t k = 0; k < KK; ++k)
          w_t[((g * Cg + c) * OCg + o) * KK + k] = weight[(b * Cg + c) * KK + (KK - 1 - k)];
    }
  });
  return w_t;
}

}  // namespace cpu
}  // namespace fastconv
