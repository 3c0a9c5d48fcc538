// im2col / col2im on the GPU.
//
// Column layout: cols[(c * KH + kh) * KW + kw][n * L + l] for a chunk of nb images, L = OH * OW,
// i.e. a [C * KH * KW, nb * L] row-major matrix. Putting the images of a chunk side by side along
// the columns lets one GEMM per group cover the whole chunk instead of one GEMM per image.
//
// Every kernel is templated on its index type: int where all the tensors it touches stay below
// 2^31 elements (cheaper integer division), int64_t otherwise. torchvision's deform_conv2d
// computed these indices in int and failed on large inputs (pytorch/vision#4269, fixed in
// pytorch/vision#4351 by the same int/int64 switch at runtime).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "backend.cuh"
#include "launch_helpers.cuh"

namespace fastconv {
namespace {

// One thread per (c, n, oh, ow) of the chunk, ow fastest, so that consecutive threads write
// consecutive column entries (coalesced stores); each thread writes its KH * KW rows.
template <typename scalar_t, typename index_t>
__global__ void im2col_kernel(const index_t n_threads, const scalar_t* __restrict__ input, const index_t channels,
                              const index_t height, const index_t width, const index_t kernel_h, const index_t kernel_w,
                              const index_t pad_h, const index_t pad_w, const index_t stride_h, const index_t stride_w,
                              const index_t dilation_h, const index_t dilation_w, const index_t out_h,
                              const index_t out_w, const index_t batch, scalar_t* __restrict__ cols) {
  const index_t n_cols = batch * out_h * out_w;
  FASTCONV_KERNEL_LOOP(index_t, idx, n_threads) {
    const index_t ow = idx % out_w;
    index_t t = idx / out_w;
    const index_t oh = t % out_h;
    t /= out_h;
    const index_t n = t % batch;
    const index_t c = t / batch;
    const index_t h0 = oh * stride_h - pad_h;
    const index_t w0 = ow * stride_w - pad_w;
    const scalar_t* plane = input + (n * channels + c) * height * width;
    scalar_t* out = cols + c * kernel_h * kernel_w * n_cols + (n * out_h + oh) * out_w + ow;
    for (index_t kh = 0; kh < kernel_h; ++kh) {
      const index_t h = h0 + kh * dilation_h;
      const bool h_ok = h >= 0 && h < height;
      for (index_t kw = 0; kw < kernel_w; ++kw) {
        const index_t w = w0 + kw * dilation_w;
        *out = (h_ok && w >= 0 && w < width) ? plane[h * width + w] : scalar_t(0);
        out += n_cols;
      }
    }
  }
}

// col2im as a gather: one thread per input element (n, c, h, w) sums, in a fixed order, the
// column entries that were copied from it. No atomics, so the result is deterministic and
// written (not accumulated) into grad_input.
template <typename scalar_t, typename index_t>
__global__ void col2im_kernel(const index_t n_threads, const scalar_t* __restrict__ cols, const index_t channels,
                              const index_t height, const index_t width, const index_t kernel_h, const index_t kernel_w,
                              const index_t pad_h, const index_t pad_w, const index_t stride_h, const index_t stride_w,
                              const index_t dilation_h, const index_t dilation_w, const index_t out_h,
                              const index_t out_w, const index_t batch, scalar_t* __restrict__ grad_input) {
  using opmath_t = at::opmath_type<scalar_t>;
  const index_t n_cols = batch * out_h * out_w;
  FASTCONV_KERNEL_LOOP(index_t, idx, n_threads) {
    const index_t w = idx % width;
    index_t t = idx / width;
    const index_t h = t % height;
    t /= height;
    const index_t c = t % channels;
    const index_t n = t / channels;
    const scalar_t* col_base = cols + c * kernel_h * kernel_w * n_cols + n * out_h * out_w;
    opmath_t acc = 0;
    for (index_t kh = 0; kh < kernel_h; ++kh) {
      const index_t hp = h + pad_h - kh * dilation_h;
      if (hp < 0) {
        break;  // hp only decreases with kh
      }
      if (hp % stride_h != 0) {
        continue;
      }
      const index_t oh = hp / stride_h;
      if (oh >= out_h) {
        continue;
      }
      for (index_t kw = 0; kw < kernel_w; ++kw) {
        const index_t wp = w + pad_w - kw * dilation_w;
        if (wp < 0) {
          break;
        }
        if (wp % stride_w != 0) {
          continue;
        }
        const index_t ow = wp / stride_w;
        if (ow >= out_w) {
          continue;
        }
        acc += static_cast<opmath_t>(col_base[(kh * kernel_w + kw) * n_cols + oh * out_w + ow]);
      }
    }
    grad_input[idx] = static_cast<scalar_t>(acc);
  }
}

// Shape of one im2col/col2im problem: `batch` images of [channels, height, width].
struct ColShape {
  int64_t batch, channels, height, width;
  int64_t kernel_h, kernel_w, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w;
  int64_t out_h, out_w;
  int64_t input_numel() const { return batch * channels * height * width; }
  int64_t cols_numel() const { return channels * kernel_h * kernel_w * batch * out_h * out_w; }
  // The kernels compute positions in [-(pad + span), height + 2 * pad]: bounded by these.
  bool fits_int32() const {
    return fastconv::fits_int32({cols_numel(), input_numel(), height + 2 * pad_h, width + 2 * pad_w, stride_h, stride_w,
                                 dilation_h, dilation_w, dilation_h * (kernel_h - 1) + 1 + pad_h,
                                 dilation_w * (kernel_w - 1) + 1 + pad_w});
  }
};

// cols[C*KH*KW, batch*L] <- input[batch, C, H, W] (both contiguous, on the current device).
template <typename scalar_t>
void im2col_cuda(const scalar_t* input, const ColShape& s, scalar_t* cols, cudaStream_t stream) {
  const int64_t n = s.channels * s.batch * s.out_h * s.out_w;
  if (n == 0) {
    return;
  }
  if (s.fits_int32()) {
    backend::launch("im2col_kernel", &im2col_kernel<scalar_t, int>, blocks_for(n), kThreadsPerBlock, stream, n, input,
                    s.channels, s.height, s.width, s.kernel_h, s.kernel_w, s.pad_h, s.pad_w, s.stride_h, s.stride_w,
                    s.dilation_h, s.dilation_w, s.out_h, s.out_w, s.batch, cols);
  } else {
    backend::launch("im2col_kernel", &im2col_kernel<scalar_t, int64_t>, blocks_for(n), kThreadsPerBlock, stream, n,
                    input, s.channels, s.height, s.width, s.kernel_h, s.kernel_w, s.pad_h, s.pad_w, s.stride_h,
                    s.stride_w, s.dilation_h, s.dilation_w, s.out_h, s.out_w, s.batch, cols);
  }
}

// grad_input[batch, C, H, W] <- col2im(cols[C*KH*KW, batch*L]); overwrites grad_input.
template <typename scalar_t>
void col2im_cuda(const scalar_t* cols, const ColShape& s, scalar_t* grad_input, cudaStream_t stream) {
  const int64_t n = s.input_numel();
  if (n == 0) {
    return;
  }
  if (s.fits_int32()) {
    backend::launch("col2im_kernel", &col2im_kernel<scalar_t, int>, blocks_for(n), kThreadsPerBlock, stream, n, cols,
                    s.channels, s.height, s.width, s.kernel_h, s.kernel_w, s.pad_h, s.pad_w, s.stride_h, s.stride_w,
                    s.dilation_h, s.dilation_w, s.out_h, s.out_w, s.batch, grad_input);
  } else {
    backend::launch("col2im_kernel", &col2im_kernel<scalar_t, int64_t>, blocks_for(n), kThreadsPerBlock, stream, n,
                    cols, s.channels, s.height, s.width, s.kernel_h, s.kernel_w, s.pad_h, s.pad_w, s.stride_h,
                    s.stride_w, s.dilation_h, s.dilation_w, s.out_h, s.out_w, s.batch, grad_input);
  }
}

}  // namespace
}  // namespace fastconv
