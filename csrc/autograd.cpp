// Autograd of fastconv's ops, in C++ on the Autograd dispatch key (as torchvision registers its ops'):
// fastconv::conv2d, fastconv::conv2d_relu and fastconv::max_pool2d, and of their backward ops
// fastconv::_conv2d_backward and fastconv::_max_pool2d_backward (double backward). Python's
// torch.library.register_autograd cost about 20 us per forward call (a Python setup_context and a
// Python backward), more than a small layer's whole kernel at batch 1, and 5.6 us on every direct call
// of a backward op even where nothing needed a gradient (a 2x2 pool's backward on 16 channels of 8x8:
// 9.9 us, 4.3 us without it, torch's 6.2 us).
//
// The backward formulas call the backward ops through the dispatcher, and the backward ops' own
// formulas call the forward and backward ops the same way, so gradients of any order work. Saved
// tensors, the output mask from needs_input_grad and the "no input needs a gradient: no graph" rule are
// torch::autograd::Function's.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <initializer_list>
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

// The ops' handles, each looked up once.
const c10::TypedOperatorHandle<ConvSig>& conv_op(bool relu) {
  static const auto conv = find_op<ConvSig>("fastconv::conv2d");
  static const auto conv_relu = find_op<ConvSig>("fastconv::conv2d_relu");
  return relu ? conv_relu : conv;
}
const c10::TypedOperatorHandle<ConvBackwardSig>& conv_backward_op() {
  static const auto op = find_op<ConvBackwardSig>("fastconv::_conv2d_backward");
  return op;
}
const c10::TypedOperatorHandle<PoolSig>& pool_op() {
  static const auto op = find_op<PoolSig>("fastconv::max_pool2d");
  return op;
}
const c10::TypedOperatorHandle<PoolBackwardSig>& pool_backward_op() {
  static const auto op = find_op<PoolBackwardSig>("fastconv::_max_pool2d_backward");
  return op;
}

// An op's kernel, called below the Autograd key (no graph): the Functions' forwards, and every call
// that needs no gradient.
template <typename Sig, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Sig>& op, const Args&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(args...);
}

// The integer arguments kept for backward, all in one saved_data entry ("args"), each list preceded by
// its length: every entry is a string-keyed hash insert and a boxed list, and five of them per call
// were a measurable part of a small layer's time (a 2x2 pool on 16 channels of 8x8 at batch 1).
void save_args(AutogradContext* ctx, std::initializer_list<at::IntArrayRef> lists,
               std::initializer_list<int64_t> scalars) {
  std::vector<int64_t> args;
  args.reserve(lists.size() * 3 + scalars.size());
  for (at::IntArrayRef list : lists) {
    args.push_back(static_cast<int64_t>(list.size()));
    args.insert(args.end(), list.begin(), list.end());
  }
  args.insert(args.end(), scalars.begin(), scalars.end());
  ctx->saved_data["args"] = std::move(args);
}

// save_args' entry read back: list(i) is the i-th list, scalar(j) the j-th scalar after the lists.
class SavedArgs {
 public:
  SavedArgs(AutogradContext* ctx, int num_lists) : args_(ctx->saved_data["args"].toIntVector()) {
    int64_t at = 0;
    for (int i = 0; i < num_lists; ++i) {
      starts_.push_back(at);
      at += 1 + args_[at];
    }
    scalars_ = at;
  }
  at::IntArrayRef list(int i) const { return at::IntArrayRef(args_).slice(starts_[i] + 1, args_[starts_[i]]); }
  int64_t scalar(int j) const { return args_[scalars_ + j]; }

 private:
  std::vector<int64_t> args_;
  std::vector<int64_t> starts_;
  int64_t scalars_ = 0;
};

// The convolution arguments kept for backward: lists stride, padding, dilation; scalars groups, has_bias
// and the three entries of an output mask (ConvBackwardFunction's).
void save_conv_args(AutogradContext* ctx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    int64_t groups, bool has_bias, std::array<bool, 3> mask = {false, false, false}) {
  save_args(ctx, {stride, padding, dilation}, {groups, has_bias, mask[0], mask[1], mask[2]});
}

// Gradients of (input, weight, bias, stride, padding, dilation, groups) from grad_output.
variable_list conv_backward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& input,
                            const at::Tensor& weight) {
  const SavedArgs args(ctx, 3);
  const bool has_bias = args.scalar(1) != 0;
  const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                    has_bias && ctx->needs_input_grad(2)};
  variable_list grads(7);
  if (!(mask[0] || mask[1] || mask[2]) || !grad_output.defined()) return grads;
  // Without create_graph nothing differentiates the backward op: straight to its kernel, past its
  // autograd (ConvBackwardFunction below).
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!at::GradMode::is_enabled()) below_autograd.emplace();
  // (each backend's kernel makes grad_output contiguous its own way: the CPU one transposes a
  // channels_last grad_output itself, much faster than ATen's copy)
  auto [gi, gw, gb] = conv_backward_op().call(grad_output, input, weight, args.list(0), args.list(1), args.list(2),
                                              args.scalar(0), mask);
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
    ctx->set_materialize_grads(false);  // every backward here takes undefined gradients as zero
    save_conv_args(ctx, stride, padding, dilation, groups, bias.has_value() && bias->defined());
    at::Tensor output = call_below_autograd(conv_op(kRelu), input, weight, bias, stride, padding, dilation, groups);
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
    auto [output, indices] = call_below_autograd(pool_op(), input, kernel_size, stride, padding, dilation, ceil_mode);
    ctx->set_materialize_grads(false);  // no zeros made for the indices' gradient (2 us at batch 1)
    ctx->mark_non_differentiable({indices});
    ctx->save_for_backward({input, indices});
    save_args(ctx, {kernel_size, stride, padding, dilation}, {ceil_mode});
    return {output, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(6);
    if (!ctx->needs_input_grad(0) || !grads[0].defined()) return result;
    const auto saved = ctx->get_saved_variables();
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;  // as in conv_backward
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    const SavedArgs args(ctx, 4);
    // grad_output as it comes: each backend's kernel lays it out as its input's (a contiguous() here
    // made a channels_last gradient NCHW, which the CPU kernel then copied back: two copies, 57 of a
    // batch-1 pool's 82 us forward and backward)
    result[0] = pool_backward_op().call(grads[0], saved[0], saved[1], args.list(0), args.list(1), args.list(2),
                                        args.list(3), args.scalar(0) != 0);
    return result;
  }
};

// An output's gradient that is there: unused outputs' gradients arrive undefined or as the op's empty
// placeholder.
bool given(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

// _conv2d_backward: grad_input, grad_weight and grad_bias are bilinear in (grad_output, weight) and
// (grad_output, input); each term of the backward is one of the two partial derivatives, written with
// the same ops, so it is differentiable again.
class ConvBackwardFunction : public torch::autograd::Function<ConvBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
    ctx->set_materialize_grads(false);
    save_conv_args(ctx, stride, padding, dilation, groups, false, output_mask);
    ctx->save_for_backward({grad_output, input, weight});
    auto [gi, gw, gb] = call_below_autograd(conv_backward_op(), grad_output, input, weight, stride, padding, dilation,
                                            groups, output_mask);
    return {gi, gw, gb};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& conv = conv_op(false);
    const auto& backward_op = conv_backward_op();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &go = saved[0], &input = saved[1], &weight = saved[2];
    const SavedArgs args(ctx, 3);
    const at::IntArrayRef stride = args.list(0), padding = args.list(1), dilation = args.list(2);
    const int64_t groups = args.scalar(0);
    const bool has_gi = args.scalar(2) != 0 && given(grads[0]);
    const bool has_gw = args.scalar(3) != 0 && given(grads[1]);
    const bool has_gb = args.scalar(4) != 0 && given(grads[2]);
    variable_list result(8);
    if (ctx->needs_input_grad(0)) {
      at::Tensor g_go = at::zeros_like(go);
      if (has_gi) g_go = g_go + conv.call(grads[0], weight, c10::nullopt, stride, padding, dilation, groups);
      if (has_gw) g_go = g_go + conv.call(input, grads[1], c10::nullopt, stride, padding, dilation, groups);
      if (has_gb) g_go = g_go + grads[2].view({1, -1, 1, 1});
      result[0] = g_go;
    }
    if (ctx->needs_input_grad(1) && has_gw) {
      result[1] =
          std::get<0>(backward_op.call(go, input, grads[1], stride, padding, dilation, groups, {true, false, false}));
    }
    if (ctx->needs_input_grad(2) && has_gi) {
      result[2] =
          std::get<1>(backward_op.call(go, grads[0], weight, stride, padding, dilation, groups, {false, true, false}));
    }
    return result;
  }
};

// _max_pool2d_backward scatters grad_output to the argmax positions; its adjoint gathers from them.
class MaxPool2dBackwardFunction : public torch::autograd::Function<MaxPool2dBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& input,
                            const at::Tensor& indices, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({indices});
    ctx->saved_data["out_shape"] = grad_output.sizes().vec();
    return call_below_autograd(pool_backward_op(), grad_output, input, indices, kernel_size, stride, padding, dilation,
                               ceil_mode);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(8);
    if (ctx->needs_input_grad(0) && given(grads[0])) {
      const at::Tensor indices = ctx->get_saved_variables()[0];
      result[0] = grads[0].flatten(2).gather(2, indices.flatten(2)).view(ctx->saved_data["out_shape"].toIntVector());
    }
    return result;
  }
};

// Whether a call must go through its autograd Function: some input requires a gradient (with grad
// mode on) or carries a forward-mode tangent (which the Functions reject, as before). Otherwise the
// call goes straight to the kernel below autograd: Function::apply's bookkeeping cost 1.2 us per call
// (a 2x2 pool's backward on 16 channels of 8x8: 5.5 us through it).
bool needs_autograd(std::initializer_list<const at::Tensor*> tensors) {
  const bool grad_mode = at::GradMode::is_enabled();
  for (const at::Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) continue;
    if ((grad_mode && t->requires_grad()) || t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!needs_autograd({&input, &weight, bias ? &*bias : nullptr})) {
    return call_below_autograd(conv_op(false), input, weight, bias, stride, padding, dilation, groups);
  }
  return ConvFunction<false>::apply(input, weight, bias, stride, padding, dilation, groups);
}

at::Tensor conv2d_relu_autograd(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  if (!needs_autograd({&input, &weight, bias ? &*bias : nullptr})) {
    return call_below_autograd(conv_op(true), input, weight, bias, stride, padding, dilation, groups);
  }
  return ConvFunction<true>::apply(input, weight, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_autograd(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, bool ceil_mode) {
  if (!needs_autograd({&input})) {
    return call_below_autograd(pool_op(), input, kernel_size, stride, padding, dilation, ceil_mode);
  }
  auto out = MaxPool2dFunction::apply(input, kernel_size, stride, padding, dilation, ceil_mode);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  if (!needs_autograd({&grad_output, &input, &weight})) {
    return call_below_autograd(conv_backward_op(), grad_output, input, weight, stride, padding, dilation, groups,
                               output_mask);
  }
  auto out = ConvBackwardFunction::apply(grad_output, input, weight, stride, padding, dilation, groups, output_mask);
  return {out[0], out[1], out[2]};
}

at::Tensor max_pool2d_backward_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                        const at::Tensor& indices, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  if (!needs_autograd({&grad_output, &input, &indices})) {
    return call_below_autograd(pool_backward_op(), grad_output, input, indices, kernel_size, stride, padding, dilation,
                               ceil_mode);
  }
  return MaxPool2dBackwardFunction::apply(grad_output, input, indices, kernel_size, stride, padding, dilation,
                                          ceil_mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastconv, Autograd, m) {
  m.impl("conv2d", &conv2d_autograd);
  m.impl("conv2d_relu", &conv2d_relu_autograd);
  m.impl("max_pool2d", &max_pool2d_autograd);
  m.impl("_conv2d_backward", &conv2d_backward_autograd);
  m.impl("_max_pool2d_backward", &max_pool2d_backward_autograd);
}

}  // namespace fastconv
