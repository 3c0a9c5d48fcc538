// max_pool2d on the CPU, forward (values + int64 indices) and backward, one (n, c) plane per task.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "conv_params.h"

namespace fastconv {
namespace {

template <typename T>
void max_pool2d_forward_kernel(const T* in, T* out, int64_t* idx, const Pool2dParams& p) {
  const int64_t planes = p.batch * p.channels, in_plane = p.in_h * p.in_w, out_plane = p.out_h * p.out_w;
  using acc_t = at::opmath_type<T>;
  at::parallel_for(0, planes, 16, [&](int64_t begin, int64_t end) {
    for (int64_t pl = begin; pl < end; ++pl) {
      const T* src = in + pl * in_plane;
      T* dst = out + pl * out_plane;
      int64_t* ind = idx + pl * out_plane;
      for (int64_t oh = 0; oh < p.out_h; ++oh) {
        // Mirrors ATen: the window is clipped to the input, and its first in-range element is
        // the index reported when nothing beats -inf.
        int64_t ih0 = oh * p.stride_h - p.pad_h;
        const int64_t ih1 = std::min(ih0 + (p.kernel_h - 1) * p.dilation_h + 1, p.in_h);
        while (ih0 < 0) ih0 += p.dilation_h;
        for (int64_t ow = 0; ow < p.out_w; ++ow) {
          int64_t iw0 = ow * p.stride_w - p.pad_w;
          const int64_t iw1 = std::min(iw0 + (p.kernel_w - 1) * p.dilation_w + 1, p.in_w);
          while (iw0 < 0) iw0 += p.dilation_w;
          int64_t best = ih0 * p.in_w + iw0;
          acc_t best_val = -std::numeric_limits<acc_t>::infinity();
          for (int64_t ih = ih0; ih < ih1; ih += p.dilation_h) {
            for (int64_t iw = iw0; iw < iw1; iw += p.dilation_w) {
              const int64_t at = ih * p.in_w + iw;
              const acc_t v = static_cast<acc_t>(src[at]);
              if (v > best_val || std::isnan(v)) {  // NaN propagates, as in torch
                best_val = v;
                best = at;
              }
            }
          }
          dst[oh * p.out_w + ow] = static_cast<T>(best_val);
          ind[oh * p.out_w + ow] = best;
        }
      }
    }
  });
}

template <typename T>
void max_pool2d_backward_kernel(const T* go, const int64_t* idx, T* gi, const Pool2dParams& p) {
  const int64_t planes = p.batch * p.channels, in_plane = p.in_h * p.in_w, out_plane = p.out_h * p.out_w;
  at::parallel_for(0, planes, 16, [&](int64_t begin, int64_t end) {
    for (int64_t pl = begin; pl < end; ++pl) {
      T* dst = gi + pl * in_plane;
      std::fill(dst, dst + in_plane, T(0));
      const T* src = go + pl * out_plane;
      const int64_t* ind = idx + pl * out_plane;
      for (int64_t o = 0; o < out_plane; ++o) {
        const int64_t at = ind[o];
        // indices come from the user on this path; never write outside the plane
        TORCH_CHECK(at >= 0 && at < in_plane, "fastconv._max_pool2d_backward: index ", at,
                    " is outside the input plane of ", in_plane, " elements");
        dst[at] += src[o];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode) {
  const Pool2dParams p = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  const at::Tensor input_c = input.contiguous();
  at::Tensor out = at::empty({p.batch, p.channels, p.out_h, p.out_w}, input.options());
  at::Tensor idx = at::empty({p.batch, p.channels, p.out_h, p.out_w}, input.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, idx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastconv_max_pool2d_cpu", [&] {
    max_pool2d_forward_kernel<scalar_t>(input_c.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                        idx.data_ptr<int64_t>(), p);
  });
  return {out, idx};
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool ceil_mode) {
  const Pool2dParams p = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode,
                                          "fastconv._max_pool2d_backward");
  check_max_pool2d_backward(grad_output, input, indices, p);
  at::Tensor grad_input = at::empty({p.batch, p.channels, p.in_h, p.in_w}, input.options());
  if (grad_input.numel() == 0) return grad_input;
  const at::Tensor go_c = grad_output.contiguous();
  const at::Tensor idx_c = indices.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastconv_max_pool2d_backward_cpu",
                                  [&] {
                                    max_pool2d_backward_kernel<scalar_t>(go_c.const_data_ptr<scalar_t>(),
                                                                         idx_c.const_data_ptr<int64_t>(),
                                                                         grad_input.data_ptr<scalar_t>(), p);
                                  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("_max_pool2d_backward", &max_pool2d_backward_cpu);
}

}  // namespace fastconv
