// conv2d forward and backward on CUDA: batched im2col + one cuBLAS GEMM per group per chunk of
// images (ATen's mm/bmm, on the current stream), then a layout kernel. Unlike ATen's
// slow_conv2d, which runs one im2col and one GEMM per image, a chunk of nb images shares one
// GEMM of width nb * OH * OW, which keeps the GPU busy for small images and large batches.
// Chunk sizes are computed on the host from shapes alone and nothing here waits for the GPU
// (no .item(), no synchronisation), so a whole training step can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "backend.cuh"
#include "conv_params.h"
#include "im2col.cuh"

namespace fastconv {
namespace {

// Bound on the scratch memory of one chunk (column buffer + GEMM-layout output or grad_output).
// 256 MiB holds a whole typical training batch of small images (MNIST, CIFAR) in one chunk, so
// there is a single GEMM per group, while large images are split into several chunks instead of
// allocating gigabytes; an image larger than the bound gets a chunk of its own.
// (Tests of the emulated build lower it, so that small shapes run chunks of several images.)
constexpr int64_t kMaxWorkspaceBytes = int64_t(256) << 20;

int64_t images_per_chunk(int64_t batch, int64_t bytes_per_image) {
  if (bytes_per_image <= 0) {
    return std::max<int64_t>(batch, 1);
  }
  return std::max<int64_t>(1, std::min<int64_t>(batch, backend::workspace_limit(kMaxWorkspaceBytes) / bytes_per_image));
}

ColShape col_shape(const Conv2dParams& p, int64_t batch) {
  return ColShape{batch,   p.in_channels, p.in_h,     p.in_w,       p.kernel_h,   p.kernel_w, p.pad_h,
                  p.pad_w, p.stride_h,    p.stride_w, p.dilation_h, p.dilation_w, p.out_h,    p.out_w};
}

// out[n, oc, l] = tmp[oc, n * L + l] + bias[oc]: from the GEMM's [OC, nb * L] layout to NCHW,
// with the bias added on the way (in opmath precision) and, for conv2d_relu, ReLU: the fused
// epilogue costs no launch of its own. One thread per output element, l fastest, so both the loads
// and the stores are coalesced.
template <typename scalar_t, typename index_t>
__global__ void gemm_to_nchw_kernel(const index_t n_total, const scalar_t* __restrict__ tmp,
                                    const scalar_t* __restrict__ bias, const index_t out_channels, const index_t plane,
                                    const index_t batch, const bool relu, scalar_t* __restrict__ out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const index_t n_cols = batch * plane;
  FASTCONV_KERNEL_LOOP(index_t, idx, n_total) {
    const index_t l = idx % plane;
    const index_t t = idx / plane;
    const index_t oc = t % out_channels;
    const index_t n = t / out_channels;
    opmath_t v = static_cast<opmath_t>(tmp[oc * n_cols + n * plane + l]);
    if (bias != nullptr) {
      v += static_cast<opmath_t>(bias[oc]);
    }
    if (relu && !(v > opmath_t(0)) && v == v) {  // max(v, 0); NaN stays NaN, as torch.relu
      v = opmath_t(0);
    }
    out[idx] = static_cast<scalar_t>(v);
  }
}

// go_t[oc, n * L + l] = grad_output[n, oc, l]: the inverse permutation, so that grad_output
// enters the backward GEMMs in the same [OC, nb * L] layout as the forward's output.
template <typename scalar_t, typename index_t>
__global__ void nchw_to_gemm_kernel(const index_t n_total, const scalar_t* __restrict__ grad_output,
                                    const index_t out_channels, const index_t plane, const index_t batch,
                                    scalar_t* __restrict__ go_t) {
  const index_t n_cols = batch * plane;
  FASTCONV_KERNEL_LOOP(index_t, idx, n_total) {
    const index_t l = idx % plane;
    const index_t t = idx / plane;
    const index_t oc = t % out_channels;
    const index_t n = t / out_channels;
    go_t[oc * n_cols + n * plane + l] = grad_output[idx];
  }
}

template <typename scalar_t>
void gemm_to_nchw(const scalar_t* tmp, const scalar_t* bias, int64_t out_channels, int64_t plane, int64_t batch,
                  bool relu, scalar_t* out, cudaStream_t stream) {
  const int64_t n = batch * out_channels * plane;
  if (n == 0) {
    return;
  }
  if (fits_int32(n)) {
    backend::launch("gemm_to_nchw_kernel", &gemm_to_nchw_kernel<scalar_t, int>, blocks_for(n), kThreadsPerBlock, stream,
                    n, tmp, bias, out_channels, plane, batch, relu, out);
  } else {
    backend::launch("gemm_to_nchw_kernel", &gemm_to_nchw_kernel<scalar_t, int64_t>, blocks_for(n), kThreadsPerBlock,
                    stream, n, tmp, bias, out_channels, plane, batch, relu, out);
  }
}

template <typename scalar_t>
void nchw_to_gemm(const scalar_t* grad_output, int64_t out_channels, int64_t plane, int64_t batch, scalar_t* go_t,
                  cudaStream_t stream) {
  const int64_t n = batch * out_channels * plane;
  if (n == 0) {
    return;
  }
  if (fits_int32(n)) {
    backend::launch("nchw_to_gemm_kernel", &nchw_to_gemm_kernel<scalar_t, int>, blocks_for(n), kThreadsPerBlock, stream,
                    n, grad_output, out_channels, plane, batch, go_t);
  } else {
    backend::launch("nchw_to_gemm_kernel", &nchw_to_gemm_kernel<scalar_t, int64_t>, blocks_for(n), kThreadsPerBlock,
                    stream, n, grad_output, out_channels, plane, batch, go_t);
  }
}

// out[g] = a[g] @ b[g], or out[g] += a[g] @ b[g], for [G, m, k] x [G, k, n]. One group is a
// plain mm (cuBLAS gemm), several a strided-batched gemm; transposed views of a or b are
// handed to cuBLAS as transposes, without a copy.
void grouped_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  backend::count_gemm();
  if (out.size(0) == 1) {
    at::Tensor out0 = out.select(0, 0);
    if (accumulate) {
      out0.addmm_(a.select(0, 0), b.select(0, 0));
    } else {
      at::mm_out(out0, a.select(0, 0), b.select(0, 0));
    }
  } else {
    at::Tensor out_ = out;
    if (accumulate) {
      out_.baddbmm_(a, b);
    } else {
      at::bmm_out(out_, a, b);
    }
  }
}

// conv2d, and with relu conv2d_relu (ReLU in the layout kernel; on the paths without one, one in-place
// ReLU launch after the bias).
at::Tensor conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, bool relu) {
  const Conv2dParams p = check_conv2d(input, weight, bias, stride, padding, dilation, groups);
  TORCH_INTERNAL_ASSERT(backend::on_backend(input), "fastconv.conv2d (" FASTCONV_BACKEND_NAME " kernel): got input on ",
                        input.device());
  const bool has_bias = bias.has_value() && bias->defined();
  const backend::DeviceGuard device_guard(input);

  at::Tensor out = at::empty({p.batch, p.out_channels, p.out_h, p.out_w}, input.options());
  if (p.batch == 0) {
    return out;
  }
  const at::Tensor input_c = input.contiguous();
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();

  const int64_t G = p.groups;
  const int64_t OC = p.out_channels;
  const int64_t OCg = p.out_channels_per_group();
  const int64_t CKKg = p.col_rows_per_group();
  const int64_t col_rows = G * CKKg;
  const int64_t L = p.out_plane();

  if (p.is_pointwise() && G == 1) {
    // out[n] = W @ input[n]: one batched GEMM over the whole batch, the weight broadcast with
    // batch stride 0, writing NCHW directly; no column buffer and no layout kernel.
    at::Tensor out3 = out.view({p.batch, OC, L});
    backend::count_gemm();
    at::bmm_out(out3, weight_c.view({1, OC, p.in_channels}).expand({p.batch, OC, p.in_channels}),
                input_c.view({p.batch, p.in_channels, L}));
    if (has_bias) {
      out.add_(bias_c.view({1, OC, 1, 1}));
    }
    return relu ? out.relu_() : out;
  }

  const int64_t nb = images_per_chunk(p.batch, (col_rows + OC) * L * input.element_size());
  at::Tensor cols_buf = at::empty({col_rows * nb * L}, input_c.options());
  // The GEMM-layout output buffer is only needed when a chunk holds more than one image.
  at::Tensor tmp_buf = nb > 1 ? at::empty({OC * nb * L}, input_c.options()) : at::Tensor();
  backend::count_workspace((col_rows + (nb > 1 ? OC : 0)) * nb * L * input.element_size());
  const at::Tensor w3 = weight_c.view({G, OCg, CKKg});
  const cudaStream_t stream = backend::current_stream();
  const int64_t in_image = p.in_channels * p.in_plane();
  const int64_t out_image = OC * L;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastconv_conv2d_cuda", [&] {
    const scalar_t* in_ptr = input_c.const_data_ptr<scalar_t>();
    const scalar_t* bias_ptr = has_bias ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    for (int64_t n0 = 0; n0 < p.batch; n0 += nb) {
      const int64_t cur = std::min(nb, p.batch - n0);
      const int64_t n_cols = cur * L;
      im2col_cuda<scalar_t>(in_ptr + n0 * in_image, col_shape(p, cur), cols_buf.mutable_data_ptr<scalar_t>(), stream);
      const at::Tensor cols = cols_buf.narrow(0, 0, col_rows * n_cols).view({G, CKKg, n_cols});
      if (cur == 1) {
        // One image: the GEMM's [OC, L] layout is already out[n0]'s NCHW layout.
        const at::Tensor out_n = out.narrow(0, n0, 1).view({G, OCg, L});
        grouped_gemm(out_n, w3, cols, /*accumulate=*/false);
        if (has_bias) {
          out_n.add_(bias_c.view({G, OCg, 1}));
        }
        if (relu) {
          out_n.relu_();
        }
        continue;
      }
      const at::Tensor tmp = tmp_buf.narrow(0, 0, OC * n_cols).view({G, OCg, n_cols});
      grouped_gemm(tmp, w3, cols, /*accumulate=*/false);
      gemm_to_nchw<scalar_t>(tmp.const_data_ptr<scalar_t>(), bias_ptr, OC, L, cur, relu, out_ptr + n0 * out_image,
                             stream);
    }
  });
  return out;
}

// The kernels write NCHW; the result is channels_last where torch's (cuDNN's) is (conv2d_channels_last).
at::Tensor conv2d_cuda(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const at::Tensor out = conv2d_forward_cuda(input, weight, bias, stride, padding, dilation, groups, /*relu=*/false);
  return conv2d_channels_last(input, weight) ? copy_channels_last(out) : out;
}

at::Tensor conv2d_relu_cuda(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const at::Tensor out = conv2d_forward_cuda(input, weight, bias, stride, padding, dilation, groups, /*relu=*/true);
  return conv2d_channels_last(input, weight) ? copy_channels_last(out) : out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cuda(const at::Tensor& grad_output,
                                                                    const at::Tensor& input, const at::Tensor& weight,
                                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                                    at::IntArrayRef dilation, int64_t groups,
                                                                    std::array<bool, 3> output_mask) {
  const char* op = "fastconv._conv2d_backward";
  const Conv2dParams p = check_conv2d(input, weight, c10::nullopt, stride, padding, dilation, groups, op);
  check_conv2d_backward(grad_output, input, p, op);
  TORCH_INTERNAL_ASSERT(backend::on_backend(input), op, " (" FASTCONV_BACKEND_NAME " kernel): got input on ",
                        input.device());
  const backend::DeviceGuard device_guard(input);

  const bool want_input = output_mask[0];
  const bool want_weight = output_mask[1];
  const bool want_bias = output_mask[2];
  // Outputs that are not asked for are empty tensors (the project-wide convention).
  at::Tensor grad_input = want_input ? at::empty(input.sizes(), input.options()) : at::empty({0}, input.options());
  at::Tensor grad_weight = want_weight ? at::empty(weight.sizes(), weight.options()) : at::empty({0}, input.options());
  at::Tensor grad_bias = at::empty({0}, input.options());

  if (p.batch == 0) {
    if (want_weight) {
      grad_weight.zero_();
    }
    if (want_bias) {
      grad_bias = at::zeros({p.out_channels}, input.options());
    }
    return std::make_tuple(grad_input, grad_weight, grad_bias);
  }

  const at::Tensor go_c = grad_output.contiguous();
  const bool reduced = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  if (want_bias) {
    // Sum in float32 for half types: thousands of fp16 partial sums would lose the small terms.
    grad_bias =
        reduced ? at::sum(go_c, {0, 2, 3}, false, at::kFloat).to(input.scalar_type()) : at::sum(go_c, {0, 2, 3});
  }
  if (!want_input && !want_weight) {
    return std::make_tuple(grad_input, grad_weight, grad_bias);
  }

  const at::Tensor input_c = input.contiguous();
  const at::Tensor weight_c = weight.contiguous();
  const int64_t G = p.groups;
  const int64_t C = p.in_channels;
  const int64_t OC = p.out_channels;
  const int64_t OCg = p.out_channels_per_group();
  const int64_t CKKg = p.col_rows_per_group();
  const int64_t col_rows = G * CKKg;
  const int64_t L = p.out_plane();

  const bool input_by_bmm = want_input && p.is_pointwise() && G == 1;
  if (input_by_bmm) {
    // grad_input[n] = W^T @ grad_output[n] for the whole batch in one batched GEMM, NCHW in and out.
    at::Tensor gi3 = grad_input.view({p.batch, C, L});
    backend::count_gemm();
    at::bmm_out(gi3, weight_c.view({1, OC, C}).transpose(1, 2).expand({p.batch, C, OC}), go_c.view({p.batch, OC, L}));
  }
  const bool need_cols = want_weight;                       // im2col only when grad_weight is wanted
  const bool need_grad_cols = want_input && !input_by_bmm;  // col2im only when grad_input is wanted
  if (!need_cols && !need_grad_cols) {
    return std::make_tuple(grad_input, grad_weight, grad_bias);
  }

  // One buffer serves as the chunk's columns (for grad_weight) and then as its grad_columns
  // (for grad_input): kernels and GEMMs are ordered on one stream, so the reuse is safe.
  const int64_t nb = images_per_chunk(p.batch, (col_rows + OC) * L * input.element_size());
  const int64_t n_chunks = (p.batch + nb - 1) / nb;
  at::Tensor cols_buf = at::empty({col_rows * nb * L}, input_c.options());
  at::Tensor go_t_buf = nb > 1 ? at::empty({OC * nb * L}, input_c.options()) : at::Tensor();
  backend::count_workspace((col_rows + (nb > 1 ? OC : 0)) * nb * L * input.element_size());
  const at::Tensor w3 = weight_c.view({G, OCg, CKKg});
  const at::Tensor w3_t = w3.transpose(1, 2);
  // fp16/bf16 grad_weight summed over several chunks: accumulate the per-chunk GEMM results in
  // float32 rather than rounding the running sum to half precision after every chunk.
  at::Tensor gw_acc;
  if (need_cols && reduced && n_chunks > 1) {
    gw_acc = at::zeros({G, OCg, CKKg}, input.options().dtype(at::kFloat));
  }
  const at::Tensor gw3 = need_cols ? grad_weight.view({G, OCg, CKKg}) : at::Tensor();
  const cudaStream_t stream = backend::current_stream();
  const int64_t in_image = C * p.in_plane();
  const int64_t out_image = OC * L;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastconv_conv2d_backward_cuda", [&] {
    const scalar_t* in_ptr = input_c.const_data_ptr<scalar_t>();
    const scalar_t* go_ptr = go_c.const_data_ptr<scalar_t>();
    for (int64_t n0 = 0; n0 < p.batch; n0 += nb) {
      const int64_t cur = std::min(nb, p.batch - n0);
      const int64_t n_cols = cur * L;
      at::Tensor go_t;
      if (cur == 1) {
        // One image: grad_output[n0] viewed [OC, L] is already in the GEMM layout.
        go_t = go_c.narrow(0, n0, 1).view({G, OCg, L});
      } else {
        nchw_to_gemm<scalar_t>(go_ptr + n0 * out_image, OC, L, cur, go_t_buf.mutable_data_ptr<scalar_t>(), stream);
        go_t = go_t_buf.narrow(0, 0, OC * n_cols).view({G, OCg, n_cols});
      }
      const at::Tensor cols = cols_buf.narrow(0, 0, col_rows * n_cols).view({G, CKKg, n_cols});
      if (need_cols) {
        // grad_weight[g] += go_t[g] @ cols[g]^T
        im2col_cuda<scalar_t>(in_ptr + n0 * in_image, col_shape(p, cur), cols_buf.mutable_data_ptr<scalar_t>(), stream);
        if (gw_acc.defined()) {
          backend::count_gemm();
          gw_acc.add_(at::matmul(go_t, cols.transpose(1, 2)));
        } else {
          grouped_gemm(gw3, go_t, cols.transpose(1, 2), /*accumulate=*/n0 > 0);
        }
      }
      if (need_grad_cols) {
        // grad_cols[g] = W[g]^T @ go_t[g], then the col2im gather writes this chunk of grad_input.
        grouped_gemm(cols, w3_t, go_t, /*accumulate=*/false);
        col2im_cuda<scalar_t>(cols.const_data_ptr<scalar_t>(), col_shape(p, cur),
                              grad_input.mutable_data_ptr<scalar_t>() + n0 * in_image, stream);
      }
    }
  });
  if (gw_acc.defined()) {
    grad_weight.copy_(gw_acc.view(weight.sizes()));
  }
  return std::make_tuple(grad_input, grad_weight, grad_bias);
}

// grad_input and grad_weight in the forward result's layout
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cuda_laid_out(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  auto grads = conv2d_backward_cuda(grad_output, input, weight, stride, padding, dilation, groups, output_mask);
  if (conv2d_channels_last(input, weight)) {
    if (output_mask[0]) std::get<0>(grads) = copy_channels_last(std::get<0>(grads));
    if (output_mask[1]) std::get<1>(grads) = copy_channels_last(std::get<1>(grads));
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(FASTCONV_BACKEND_LIBRARY, FASTCONV_BACKEND_KEY, m) {
  m.impl("conv2d", TORCH_FN(conv2d_cuda));
  m.impl("conv2d_relu", TORCH_FN(conv2d_relu_cuda));
  m.impl("_conv2d_backward", TORCH_FN(conv2d_backward_cuda_laid_out));
}

}  // namespace fastconv
