// Autograd of the forward ops, in C++ on the Autograd dispatch key (as torchvision registers its
// ops'): fastconv::conv2d, fastconv::conv2d_relu and fastconv::max_pool2d. Python's
// torch.library.register_autograd cost about 20 us per call (a Python setup_context and a Python
// backward), more than a small layer's whole kernel at batch 1.
//
// The backward formulas call the backward ops through the dispatcher, and those ops keep their own
// autograd (fastconv/_ops.py), so double backward works. Saved tensors, the output mask from
// needs_input_grad and the "no input needs a gradient: no graph" rule are torch::autograd::Function's.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace fastconv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

using ConvSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
                           at::IntArrayRef, int64_t);
using ConvBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, at::IntArrayRef,
                                                                       at::IntArrayRef, at::IntArrayRef, int64_t,
                                                                       std::array<bool, 3>);
using PoolSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                                   at::IntArrayRef, bool);
using PoolBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                   at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The convolution arguments kept for backward.
void save_conv_args(AutogradContext* ctx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    int64_t groups, bool has_bias) {
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["groups"] = groups;
  ctx->saved_data["has_bias"] = has_bias;
}

// Gradients of (input, weight, bias, stride, padding, dilation, groups) from grad_output.
variable_list conv_backward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& input,
                            const at::Tensor& weight) {
  static const auto backward_op = find_op<ConvBackwardSig>("fastconv::_conv2d_backward");
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                    has_bias && ctx->needs_input_grad(2)};
  variable_list grads(7);
  if (!(mask[0] || mask[1] || mask[2]) || !grad_output.defined()) return grads;
  const auto stride = ctx->saved_data["stride"].toIntVector();
  const auto padding = ctx->saved_data["padding"].toIntVector();
  const auto dilation = ctx->saved_data["dilation"].toIntVector();
  // Without create_graph nothing differentiates the backward op: straight to its kernel, past its
  // Python autograd (fastconv/_ops.py; about 8 us per call, more than a small layer's kernel).
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!at::GradMode::is_enabled()) below_autograd.emplace();
  auto [gi, gw, gb] = backward_op.call(grad_output.contiguous(), input, weight, stride, padding, dilation,
                                       ctx->saved_data["groups"].toInt(), mask);
  if (mask[0]) grads[0] = gi;
  if (mask[1]) grads[1] = gw;
  if (mask[2]) grads[2] = gb;
  return grads;
}

// conv2d, and with kRelu conv2d_relu, whose backward first applies ReLU's (grad where output > 0).
template <bool kRelu>
class ConvFunction : public torch::autograd::Function<ConvFunction<kRelu>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const OptTensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
    static const auto op = find_op<ConvSig>(kRelu ? "fastconv::conv2d_relu" : "fastconv::conv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    save_conv_args(ctx, stride, padding, dilation, groups, bias.has_value() && bias->defined());
    at::Tensor output = op.call(input, weight, bias, stride, padding, dilation, groups);
    if (kRelu) {
      ctx->save_for_backward({input, weight, output});
    } else {
      ctx->save_for_backward({input, weight});
    }
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(7);
    const at::Tensor grad_output = kRelu ? at::threshold_backward(grads[0], saved[2], 0) : grads[0];
    return conv_backward(ctx, grad_output, saved[0], saved[1]);
  }
};

class MaxPool2dFunction : public torch::autograd::Function<MaxPool2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               bool ceil_mode) {
    static const auto op = find_op<PoolSig>("fastconv::max_pool2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, indices] = op.call(input, kernel_size, stride, padding, dilation, ceil_mode);
    ctx->mark_non_differentiable({indices});
    ctx->save_for_backward({input, indices});
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["ceil_mode"] = ceil_mode;
    return {output, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = find_op<PoolBackwardSig>("fastconv::_max_pool2d_backward");
    variable_list result(6);
    if (!ctx->needs_input_grad(0) || !grads[0].defined()) return result;
    const auto saved = ctx->get_saved_variables();
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;  // as in conv_backward
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    result[0] =
        backward_op.call(grads[0].contiguous(), saved[0], saved[1], ctx->saved_data["kernel_size"].toIntVector(),
                         ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
                         ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["ceil_mode"].toBool());
    return result;
  }
};

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return ConvFunction<false>::apply(input, weight, bias, stride, padding, dilation, groups);
}

at::Tensor conv2d_relu_autograd(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  return ConvFunction<true>::apply(input, weight, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_autograd(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, bool ceil_mode) {
  auto out = MaxPool2dFunction::apply(input, kernel_size, stride, padding, dilation, ceil_mode);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, Autograd, m) {
  m.impl("conv2d", &conv2d_autograd);
  m.impl("conv2d_relu", &conv2d_relu_autograd);
  m.impl("max_pool2d", &max_pool2d_autograd);
}

}  // namespace fastconv
