// conv2d on the CPU: im2col + GEMM, forward and backward.
//
// Work is split into (image, band of output rows) items run in parallel with at::parallel_for.
// Each item builds the column tile of its band in a per-thread buffer small enough to stay in
// cache, and multiplies it at once with the weight (at::mm_out, ATen's BLAS). Per-item GEMMs are
// single-threaded; the parallelism is ours. This keeps the column buffer bounded at any batch size
// (one tile per thread) and writes the output in NCHW directly, with no transpose pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "conv_params.h"
#include "cpu/im2col.h"

namespace fastconv {
namespace {

// A column tile of about this size stays in L2 between im2col and the GEMM that reads it.
constexpr int64_t kColTileBytes = 256 * 1024;

bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// 1x1 kernel, stride 1, no padding: the image itself is its column matrix.
bool is_pointwise(const Conv2dParams& p) {
  return p.kernel_h == 1 && p.kernel_w == 1 && p.stride_h == 1 && p.stride_w == 1 && p.pad_h == 0 && p.pad_w == 0;
}

int64_t band_rows(const Conv2dParams& p, int64_t elem_size) {
  if (is_pointwise(p)) return p.out_h;
  const int64_t row_bytes = p.in_channels * p.kernel_h * p.kernel_w * p.out_w * elem_size;
  return std::clamp<int64_t>(kColTileBytes / std::max<int64_t>(row_bytes, 1), 1, p.out_h);
}

// The column tile of rows [oh0, oh1) of image n, viewed [G, CKK/G, band*OW].
template <typename T>
at::Tensor column_tile(const at::Tensor& input, const at::Tensor& buffer, const Conv2dParams& p, int64_t n,
                       int64_t oh0, int64_t oh1) {
  const int64_t G = p.groups, width = (oh1 - oh0) * p.out_w;
  if (is_pointwise(p)) {
    return input[n].view({G, p.in_channels_per_group(), p.in_plane()}).narrow(2, oh0 * p.out_w, width);
  }
  const int64_t rows = p.col_rows_per_group() * G;
  T* col = buffer.data_ptr<T>();
  cpu::im2col_band(input.const_data_ptr<T>() + n * p.in_channels * p.in_plane(), p.in_channels, p, oh0, oh1, col,
                   width);
  return buffer.view(-1).narrow(0, 0, rows * width).view({G, p.col_rows_per_group(), width});
}

template <typename T>
void conv2d_forward_kernel(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& output, const Conv2dParams& p) {
  const int64_t G = p.groups, L = p.out_plane();
  const int64_t rows = band_rows(p, sizeof(T));
  const int64_t bands = (p.out_h + rows - 1) / rows;
  const at::Tensor w3 = weight.view({G, p.out_channels_per_group(), p.col_rows_per_group()});
  const at::Tensor out4 = output.view({p.batch, G, p.out_channels_per_group(), L});
  const at::Tensor bias3 = bias.defined() ? bias.view({G, p.out_channels_per_group(), 1}) : at::Tensor();

  at::parallel_for(0, p.batch * bands, 1, [&](int64_t begin, int64_t end) {
    const at::Tensor buffer = is_pointwise(p)
        ? at::Tensor()
        : at::empty({p.col_rows_per_group() * G * rows * p.out_w}, input.options());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / bands, oh0 = (item % bands) * rows, oh1 = std::min(p.out_h, oh0 + rows);
      const at::Tensor col = column_tile<T>(input, buffer, p, n, oh0, oh1);
      for (int64_t g = 0; g < G; ++g) {
        at::Tensor out = out4[n][g].narrow(1, oh0 * p.out_w, (oh1 - oh0) * p.out_w);
        if (bias3.defined()) {
          at::addmm_out(out, bias3[g], w3[g], col[g]);
        } else {
          at::mm_out(out, w3[g], col[g]);
        }
      }
    }
  });
}

template <typename T>
void conv2d_backward_kernel(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& grad_input, const at::Tensor& grad_weight, const Conv2dParams& p) {
  const int64_t G = p.groups, L = p.out_plane();
  const int64_t OCg = p.out_channels_per_group(), CKKg = p.col_rows_per_group();
  const int64_t rows = band_rows(p, sizeof(T));
  const bool want_input = grad_input.defined(), want_weight = grad_weight.defined();
  const at::Tensor w3 = weight.view({G, OCg, CKKg});
  const at::Tensor go4 = grad_output.view({p.batch, G, OCg, L});
  // One partial grad_weight per thread, summed at the end: no races, and a fixed order.
  const int64_t slots = at::get_num_threads();
  const at::Tensor weight_parts = want_weight ? at::zeros({slots, G, OCg, CKKg}, weight.options()) : at::Tensor();

  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    const int64_t slot = std::min<int64_t>(at::get_thread_num(), slots - 1);
    const int64_t tile = CKKg * G * rows * p.out_w;
    const bool pointwise = is_pointwise(p);
    const at::Tensor col_buf = (want_weight && !pointwise) ? at::empty({tile}, input.options()) : at::Tensor();
    const at::Tensor gcol_buf = (want_input && !pointwise) ? at::empty({tile}, input.options()) : at::Tensor();
    for (int64_t n = begin; n < end; ++n) {
      T* gi = want_input ? grad_input.data_ptr<T>() + n * p.in_channels * p.in_plane() : nullptr;
      if (want_input && !pointwise) std::fill(gi, gi + p.in_channels * p.in_plane(), T(0));
      for (int64_t oh0 = 0; oh0 < p.out_h; oh0 += rows) {
        const int64_t oh1 = std::min(p.out_h, oh0 + rows), width = (oh1 - oh0) * p.out_w;
        const at::Tensor go = go4[n].narrow(2, oh0 * p.out_w, width);  // [G, OCg, width]
        if (want_weight) {
          const at::Tensor col = column_tile<T>(input, col_buf, p, n, oh0, oh1);
          for (int64_t g = 0; g < G; ++g) {
            weight_parts[slot][g].addmm_(go[g], col[g].t());
          }
        }
        if (want_input) {
          if (pointwise) {
            const at::Tensor gi3 = grad_input[n].view({G, CKKg, p.in_plane()});
            for (int64_t g = 0; g < G; ++g) {
              at::Tensor dst = gi3[g].narrow(1, oh0 * p.out_w, width);
              at::mm_out(dst, w3[g].t(), go[g]);
            }
          } else {
            const at::Tensor gcol = gcol_buf.view(-1).narrow(0, 0, CKKg * G * width).view({G, CKKg, width});
            for (int64_t g = 0; g < G; ++g) {
              at::Tensor dst = gcol[g];
              at::mm_out(dst, w3[g].t(), go[g]);
            }
            cpu::col2im_band_add(gcol_buf.const_data_ptr<T>(), width, p.in_channels, p, oh0, oh1, gi);
          }
        }
      }
    }
  });
  if (want_weight) {
    grad_weight.view({G, OCg, CKKg}).copy_(weight_parts.sum(0));
  }
}

at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Conv2dParams p = check_conv2d(input, weight, bias, stride, padding, dilation, groups);
  // the ATen calls below (views, GEMMs) are implementation details, invisible to autograd
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool has_bias = bias.has_value() && bias->defined();
  if (is_reduced_float(input.scalar_type())) {
    // float16/bfloat16 on the CPU: compute in float32, round once at the end.
    const c10::optional<at::Tensor> bias_f = has_bias ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt;
    return conv2d_cpu(input.to(at::kFloat), weight.to(at::kFloat), bias_f, stride, padding, dilation, groups)
        .to(input.scalar_type());
  }
  const at::Tensor input_c = input.contiguous();
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor output = at::empty({p.batch, p.out_channels, p.out_h, p.out_w}, input.options());
  if (p.batch == 0) return output;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastconv_conv2d_cpu", [&] {
    conv2d_forward_kernel<scalar_t>(input_c, weight_c, bias_c, output, p);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const Conv2dParams p = check_conv2d(input, weight, c10::nullopt, stride, padding, dilation, groups,
                                      "fastconv._conv2d_backward");
  check_conv2d_backward(grad_output, input, p);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (is_reduced_float(input.scalar_type())) {
    auto [gi, gw, gb] = conv2d_backward_cpu(grad_output.to(at::kFloat), input.to(at::kFloat), weight.to(at::kFloat),
                                            stride, padding, dilation, groups, output_mask);
    const auto t = input.scalar_type();
    return {gi.to(t), gw.to(t), gb.to(t)};
  }
  const at::Tensor empty = at::empty({0}, input.options());
  const at::Tensor go_c = grad_output.contiguous();
  at::Tensor grad_input = output_mask[0] ? at::empty(input.sizes(), input.options()) : at::Tensor();
  at::Tensor grad_weight = output_mask[1] ? at::zeros(weight.sizes(), weight.options()) : at::Tensor();  // zeros: N may be 0
  at::Tensor grad_bias = output_mask[2] ? go_c.sum({0, 2, 3}) : empty;
  if (p.batch > 0 && (output_mask[0] || output_mask[1])) {
    const at::Tensor input_c = input.contiguous();
    const at::Tensor weight_c = weight.contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastconv_conv2d_backward_cpu", [&] {
      conv2d_backward_kernel<scalar_t>(go_c, input_c, weight_c, grad_input, grad_weight, p);
    });
  }
  return {output_mask[0] ? grad_input : empty, output_mask[1] ? grad_weight : empty, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
  m.impl("_conv2d_backward", &conv2d_backward_cpu);
}

}  // namespace fastconv
