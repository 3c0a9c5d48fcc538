// max_pool2d forward (values + int64 indices) and backward on CUDA, matching
// torch.nn.functional.max_pool2d(..., return_indices=True) exactly: indices are flat positions
// h * W + w within the input plane, padding never wins, NaN propagates, the first maximum wins.
// Both kernels are gathers (one thread per element written): no atomics, deterministic results.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "backend.cuh"  // launch, stream, device guard; at::numeric_limits
#include "conv_params.h"
#include "launch_helpers.cuh"

namespace fastconv {
namespace {

// One thread per output element (n*c, oh, ow), ow fastest: neighbouring threads read
// neighbouring windows and write neighbouring outputs.
template <typename scalar_t, typename index_t>
__global__ void max_pool2d_forward_kernel(const index_t n_total, const scalar_t* __restrict__ input,
                                          const index_t height, const index_t width, const index_t out_h,
                                          const index_t out_w, const index_t kernel_h, const index_t kernel_w,
                                          const index_t stride_h, const index_t stride_w, const index_t pad_h,
                                          const index_t pad_w, const index_t dilation_h, const index_t dilation_w,
                                          scalar_t* __restrict__ output, int64_t* __restrict__ indices) {
  using opmath_t = at::opmath_type<scalar_t>;
  FASTCONV_KERNEL_LOOP(index_t, idx, n_total) {
    const index_t ow = idx % out_w;
    const index_t t = idx / out_w;
    const index_t oh = t % out_h;
    const index_t nc = t / out_h;
    index_t hstart = oh * stride_h - pad_h;
    index_t wstart = ow * stride_w - pad_w;
    const index_t hend_raw = hstart + (kernel_h - 1) * dilation_h + 1;
    const index_t hend = hend_raw < height ? hend_raw : height;
    const index_t wend_raw = wstart + (kernel_w - 1) * dilation_w + 1;
    const index_t wend = wend_raw < width ? wend_raw : width;
    // First tap inside the input: padding is -inf and can never be the maximum.
    if (hstart < 0) {
      hstart += (-hstart + dilation_h - 1) / dilation_h * dilation_h;
    }
    if (wstart < 0) {
      wstart += (-wstart + dilation_w - 1) / dilation_w * dilation_w;
    }
    const scalar_t* plane = input + nc * height * width;
    opmath_t maxval = at::numeric_limits<opmath_t>::lower_bound();  // -inf (integers: their lowest value)
    // As torch: a window of only -inf (or an integer's lowest) reports its first in-bounds tap.
    index_t maxidx = hstart * width + wstart;
    for (index_t h = hstart; h < hend; h += dilation_h) {
      for (index_t w = wstart; w < wend; w += dilation_w) {
        const opmath_t val = static_cast<opmath_t>(plane[h * width + w]);
        // Strict > keeps the first maximum on ties; a NaN always takes over, so it propagates.
        if (val > maxval || at::_isnan(val)) {
          maxval = val;
          maxidx = h * width + w;
        }
      }
    }
    output[idx] = static_cast<scalar_t>(maxval);
    indices[idx] = static_cast<int64_t>(maxidx);
  }
}

// Backward as a gather: one thread per input element (n*c, h, w) visits, in a fixed order, the
// output windows whose span covers it and adds grad_output wherever indices names it. Overlapping
// windows (3x3 stride 2) need no atomics, and the sum is deterministic.
template <typename scalar_t, typename index_t>
__global__ void max_pool2d_backward_kernel(const index_t n_total, const scalar_t* __restrict__ grad_output,
                                           const int64_t* __restrict__ indices, const index_t height,
                                           const index_t width, const index_t out_h, const index_t out_w,
                                           const index_t kernel_h, const index_t kernel_w, const index_t stride_h,
                                           const index_t stride_w, const index_t pad_h, const index_t pad_w,
                                           const index_t dilation_h, const index_t dilation_w,
                                           scalar_t* __restrict__ grad_input) {
  using opmath_t = at::opmath_type<scalar_t>;
  const index_t span_h = (kernel_h - 1) * dilation_h + 1;
  const index_t span_w = (kernel_w - 1) * dilation_w + 1;
  FASTCONV_KERNEL_LOOP(index_t, idx, n_total) {
    const index_t w = idx % width;
    const index_t t = idx / width;
    const index_t h = t % height;
    const index_t nc = t / height;
    // Windows oh with oh*S - P <= h <= oh*S - P + span - 1.
    const index_t ph_start = (h + pad_h < span_h) ? 0 : (h + pad_h - span_h) / stride_h + 1;
    const index_t ph_last = (h + pad_h) / stride_h + 1;
    const index_t ph_end = ph_last < out_h ? ph_last : out_h;
    const index_t pw_start = (w + pad_w < span_w) ? 0 : (w + pad_w - span_w) / stride_w + 1;
    const index_t pw_last = (w + pad_w) / stride_w + 1;
    const index_t pw_end = pw_last < out_w ? pw_last : out_w;
    const index_t offset = nc * out_h * out_w;
    const int64_t target = static_cast<int64_t>(h) * width + w;
    opmath_t acc = 0;
    for (index_t ph = ph_start; ph < ph_end; ++ph) {
      for (index_t pw = pw_start; pw < pw_end; ++pw) {
        const index_t o = offset + ph * out_w + pw;
        if (indices[o] == target) {
          acc += static_cast<opmath_t>(grad_output[o]);
        }
      }
    }
    grad_input[idx] = static_cast<scalar_t>(acc);
  }
}

// The kernels compute window positions in [-(pad + span), size + 2 * pad]: the int path needs these
// (and the strides) to fit, not only the element counts.
bool window_fits_int32(const Pool2dParams& p) {
  return fits_int32({p.in_h + 2 * p.pad_h, p.in_w + 2 * p.pad_w, p.stride_h, p.stride_w, p.dilation_h, p.dilation_w,
                     p.dilation_h * (p.kernel_h - 1) + 1 + p.pad_h, p.dilation_w * (p.kernel_w - 1) + 1 + p.pad_w,
                     p.out_h * p.stride_h, p.out_w * p.stride_w});
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, bool ceil_mode) {
  const Pool2dParams p = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode);
  TORCH_INTERNAL_ASSERT(backend::on_backend(input),
                        "fastconv.max_pool2d (" FASTCONV_BACKEND_NAME " kernel): got input on ", input.device());
  const backend::DeviceGuard device_guard(input);

  at::Tensor output = at::empty({p.batch, p.channels, p.out_h, p.out_w}, input.options());
  at::Tensor indices = at::empty({p.batch, p.channels, p.out_h, p.out_w}, input.options().dtype(at::kLong));
  const int64_t n = output.numel();
  if (n == 0) {
    return std::make_tuple(output, indices);
  }
  const at::Tensor input_c = input.contiguous();
  const cudaStream_t stream = backend::current_stream();
  const unsigned int blocks = blocks_for(n);

  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastconv_max_pool2d_cuda", [&] {
    const scalar_t* in_ptr = input_c.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = output.mutable_data_ptr<scalar_t>();
    int64_t* idx_ptr = indices.mutable_data_ptr<int64_t>();
    if (fits_int32(input_c.numel()) && fits_int32(n) && window_fits_int32(p)) {
      backend::launch("max_pool2d_forward_kernel", &max_pool2d_forward_kernel<scalar_t, int>, blocks, kThreadsPerBlock,
                      stream, n, in_ptr, p.in_h, p.in_w, p.out_h, p.out_w, p.kernel_h, p.kernel_w, p.stride_h,
                      p.stride_w, p.pad_h, p.pad_w, p.dilation_h, p.dilation_w, out_ptr, idx_ptr);
    } else {
      backend::launch("max_pool2d_forward_kernel", &max_pool2d_forward_kernel<scalar_t, int64_t>, blocks,
                      kThreadsPerBlock, stream, n, in_ptr, p.in_h, p.in_w, p.out_h, p.out_w, p.kernel_h, p.kernel_w,
                      p.stride_h, p.stride_w, p.pad_h, p.pad_w, p.dilation_h, p.dilation_w, out_ptr, idx_ptr);
    }
  });
  return std::make_tuple(output, indices);
}

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "fastconv._max_pool2d_backward";
  const Pool2dParams p = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, op);
  check_max_pool2d_backward(grad_output, input, indices, p, op);
  TORCH_INTERNAL_ASSERT(backend::on_backend(input), op, " (" FASTCONV_BACKEND_NAME " kernel): got input on ",
                        input.device());
  const backend::DeviceGuard device_guard(input);

  // Every element is written by the gather kernel (zero where no window routed to it).
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  const int64_t n = grad_input.numel();
  if (n == 0) {
    return grad_input;
  }
  const at::Tensor go_c = grad_output.contiguous();
  const at::Tensor indices_c = indices.contiguous();
  const cudaStream_t stream = backend::current_stream();
  const unsigned int blocks = blocks_for(n);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "fastconv_max_pool2d_backward_cuda", [&] {
        const scalar_t* go_ptr = go_c.const_data_ptr<scalar_t>();
        const int64_t* idx_ptr = indices_c.const_data_ptr<int64_t>();
        scalar_t* gi_ptr = grad_input.mutable_data_ptr<scalar_t>();
        if (fits_int32(n) && fits_int32(go_c.numel()) && window_fits_int32(p)) {
          backend::launch("max_pool2d_backward_kernel", &max_pool2d_backward_kernel<scalar_t, int>, blocks,
                          kThreadsPerBlock, stream, n, go_ptr, idx_ptr, p.in_h, p.in_w, p.out_h, p.out_w, p.kernel_h,
                          p.kernel_w, p.stride_h, p.stride_w, p.pad_h, p.pad_w, p.dilation_h, p.dilation_w, gi_ptr);
        } else {
          backend::launch("max_pool2d_backward_kernel", &max_pool2d_backward_kernel<scalar_t, int64_t>, blocks,
                          kThreadsPerBlock, stream, n, go_ptr, idx_ptr, p.in_h, p.in_w, p.out_h, p.out_w, p.kernel_h,
                          p.kernel_w, p.stride_h, p.stride_w, p.pad_h, p.pad_w, p.dilation_h, p.dilation_w, gi_ptr);
        }
      });
  return grad_input;
}

// The kernels write NCHW; values, indices and grad_input are channels_last where the input's strides
// suggest it, as torch's.
std::tuple<at::Tensor, at::Tensor> max_pool2d_cuda_laid_out(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                                            at::IntArrayRef dilation, bool ceil_mode) {
  auto [out, idx] = max_pool2d_cuda(input, kernel_size, stride, padding, dilation, ceil_mode);
  if (!suggests_channels_last(input)) return {out, idx};
  return {copy_channels_last(out), copy_channels_last(idx)};
}

at::Tensor max_pool2d_backward_cuda_laid_out(const at::Tensor& grad_output, const at::Tensor& input,
                                             const at::Tensor& indices, at::IntArrayRef kernel_size,
                                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                             bool ceil_mode) {
  const at::Tensor gi =
      max_pool2d_backward_cuda(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode);
  return suggests_channels_last(input) ? copy_channels_last(gi) : gi;
}

}  // namespace

TORCH_LIBRARY_IMPL(FASTCONV_BACKEND_LIBRARY, FASTCONV_BACKEND_KEY, m) {
  m.impl("max_pool2d", TORCH_FN(max_pool2d_cuda_laid_out));
  m.impl("_max_pool2d_backward", TORCH_FN(max_pool2d_backward_cuda_laid_out));
}

}  // namespace fastconv
