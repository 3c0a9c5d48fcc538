// Argument checks and output-size arithmetic shared by the CPU and CUDA kernels.
// Messages name the problem and print what was got, the way ATen's own checks do.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <string>
#include <vector>

namespace fastconv {

// Everything a conv2d kernel needs to know about its problem, checked once.
struct Conv2dParams {
  int64_t batch, in_channels, in_h, in_w;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t groups;
  int64_t in_channels_per_group() const { return in_channels / groups; }
  int64_t out_channels_per_group() const { return out_channels / groups; }
  // rows of one group's column matrix: (C/groups) * KH * KW
  int64_t col_rows_per_group() const { return in_channels_per_group() * kernel_h * kernel_w; }
  int64_t out_plane() const { return out_h * out_w; }
  int64_t in_plane() const { return in_h * in_w; }
  // 1x1 kernel, stride 1, no padding: image n's column matrix is input[n] viewed [C, H*W] itself.
  bool is_pointwise() const {
    return kernel_h == 1 && kernel_w == 1 && stride_h == 1 && stride_w == 1 && pad_h == 0 && pad_w == 0;
  }
};

// A channels_last tensor that is not NCHW-contiguous too (a 1x1 plane or one channel is both): its
// memory is NHWC and not NCHW.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Whether t's strides suggest channels_last (at::Tensor::suggest_memory_format: a channels_last tensor,
// a slice of one, or one that is both layouts with channels_last strides). torch's max_pool2d gives its
// results in its input's suggested layout, its conv2d channels_last when the input's or the weight's
// suggest it (CPU and cuDNN alike); fastconv's ops do the same on every backend (fastconv/_ops.py's fake
// kernels too).
inline bool suggests_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

inline bool conv2d_channels_last(const at::Tensor& input, const at::Tensor& weight) {
  return suggests_channels_last(input) || suggests_channels_last(weight);
}

// t's values with channels_last strides as at::empty gives them (for a tensor that is both layouts,
// .contiguous(ChannelsLast) keeps the strides it has).
inline at::Tensor copy_channels_last(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::ChannelsLast)).copy_(t);
}

struct Pool2dParams {
  int64_t batch, channels, in_h, in_w, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  bool ceil_mode;
};

namespace detail {

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (const auto i : c10::irange(s.size())) {
    out += (i ? ", " : "") + std::to_string(s[i]);
  }
  return out + "]";
}

inline void check_pair(at::IntArrayRef v, const char* op, const char* name) {
  TORCH_CHECK(v.size() == 2, op, ": expected ", name, " to have 2 elements, got ", v.size());
}

inline void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  // The four dtypes the kernels are compiled for; not at::isFloatingType, which admits float8 too.
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": expected ", name,
              " to be a floating-point tensor (float32, float64, float16 or bfloat16), got ", st);
}

// max_pool2d's forward also takes the integer dtypes (label maps, masks, quantised images), as torch's CPU
// kernel does (its CUDA kernel takes floating point only; fastconv's takes both); bool is rejected, as
// torch does. The backward stays floating-point (check_max_pool2d_backward).
inline void check_pool_input_dtype(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.defined(), op, ": input is undefined");
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16 || st == at::kByte ||
                  st == at::kChar || st == at::kShort || st == at::kInt || st == at::kLong,
              op,
              ": expected input to be a floating-point tensor (float32, float64, float16 or bfloat16) or an integer ",
              "tensor (uint8, int8, int16, int32 or int64), got ", st);
}

// Bound on stride, padding and dilation (and dilation * (kernel - 1)), so that the output-size
// arithmetic below cannot overflow int64. torch accepts larger values; none describes a tensor
// that fits in memory.
constexpr int64_t kMaxWindowValue = int64_t(1) << 48;

// stride, padding and dilation: pairs, positive, positive, non-negative (conv and pool alike)
inline void check_window(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, const char* op) {
  check_pair(stride, op, "stride");
  check_pair(padding, op, "padding");
  check_pair(dilation, op, "dilation");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation must be positive, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ", padding);
  const auto check_bound = [op](at::IntArrayRef v, const char* name) {
    TORCH_CHECK(v[0] <= kMaxWindowValue && v[1] <= kMaxWindowValue, op, ": ", name, " must be at most 2^48, got ", v);
  };
  check_bound(stride, "stride");
  check_bound(padding, "padding");
  check_bound(dilation, "dilation");
}

// dilation * (kernel - 1) + 1, the extent of a window, checked against the same bound.
inline int64_t window_span(int64_t kernel, int64_t dilation, const char* op) {
  TORCH_CHECK(kernel - 1 <= kMaxWindowValue / dilation, op, ": dilation (", dilation, ") times kernel size - 1 (",
              kernel - 1, ") must be at most 2^48");
  return dilation * (kernel - 1) + 1;
}

// Copies the (checked) stride, padding and dilation pairs into a Conv2dParams or Pool2dParams.
template <typename Params>
inline void set_window(Params& p, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  p.stride_h = stride[0];
  p.stride_w = stride[1];
  p.pad_h = padding[0];
  p.pad_w = padding[1];
  p.dilation_h = dilation[0];
  p.dilation_w = dilation[1];
}

}  // namespace detail

// The output-size formula of a convolution: (H + 2P - dilation*(K-1) - 1) // S + 1.
inline int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  return (in + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

// torch's pooling_output_shape: floor or ceil division, and with ceil_mode the last window must
// start inside the input or its left padding.
inline int64_t pool_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
                             bool ceil_mode) {
  const int64_t span = in + 2 * pad - dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (span >= 0 ? span / stride : -((-span + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) {
    --out;
  }
  return out;
}

inline Conv2dParams check_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups, const char* op = "fastconv.conv2d") {
  using detail::shape_str;
  detail::check_float_tensor(input, op, "input");
  detail::check_float_tensor(weight, op, "weight");
  TORCH_CHECK(input.dim() == 4, op, ": expected a 4-D input (N, C, H, W), got ", input.dim(), "-D input of size ",
              shape_str(input.sizes()));
  TORCH_CHECK(weight.dim() == 4, op, ": expected a 4-D weight (out_channels, in_channels/groups, kH, kW), got ",
              weight.dim(), "-D weight of size ", shape_str(weight.sizes()));
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), op, ": input (", input.scalar_type(), ") and weight (",
              weight.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(input.device() == weight.device(), op, ": input is on ", input.device(), " but weight is on ",
              weight.device(), "; move them to the same device");
  detail::check_window(stride, padding, dilation, op);
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);

  Conv2dParams p;
  p.batch = input.size(0);
  p.in_channels = input.size(1);
  p.in_h = input.size(2);
  p.in_w = input.size(3);
  p.out_channels = weight.size(0);
  p.kernel_h = weight.size(2);
  p.kernel_w = weight.size(3);
  detail::set_window(p, stride, padding, dilation);
  p.groups = groups;

  TORCH_CHECK(p.out_channels > 0 && p.kernel_h > 0 && p.kernel_w > 0 && weight.size(1) > 0, op,
              ": weight must have no zero-size dimension, got ", shape_str(weight.sizes()));
  TORCH_CHECK(p.in_channels % groups == 0, op, ": in_channels (", p.in_channels, ") must be divisible by groups (",
              groups, ")");
  TORCH_CHECK(p.out_channels % groups == 0, op, ": out_channels (", p.out_channels, ") must be divisible by groups (",
              groups, ")");
  TORCH_CHECK(weight.size(1) * groups == p.in_channels, op, ": weight of size ", shape_str(weight.sizes()),
              " with groups=", groups, " expects ", weight.size(1) * groups, " input channels, but got input of size ",
              shape_str(input.sizes()), " with ", p.in_channels, " channels");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.out_channels, op, ": expected bias of size [", p.out_channels,
                "], got ", shape_str(bias->sizes()));
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias (", bias->scalar_type(),
                ") must have the input's dtype (", input.scalar_type(), ")");
    TORCH_CHECK(bias->device() == input.device(), op, ": bias is on ", bias->device(), " but input is on ",
                input.device());
  }
  // torch: "Only zero batch or zero channel inputs are supported"; an empty plane with padding
  // would otherwise give an output of bias values only.
  TORCH_CHECK(p.batch == 0 || (p.in_h > 0 && p.in_w > 0), op,
              ": only zero batch or zero channel inputs are supported, got input of size ", shape_str(input.sizes()),
              " (zero height or width)");
  const int64_t eff_kh = detail::window_span(p.kernel_h, p.dilation_h, op);
  const int64_t eff_kw = detail::window_span(p.kernel_w, p.dilation_w, op);
  TORCH_CHECK(p.in_h + 2 * p.pad_h >= eff_kh && p.in_w + 2 * p.pad_w >= eff_kw, op, ": kernel size (", eff_kh, " x ",
              eff_kw, ", dilation included) can't be greater than the padded input size (", p.in_h + 2 * p.pad_h, " x ",
              p.in_w + 2 * p.pad_w, ")");
  p.out_h = conv_out_size(p.in_h, p.kernel_h, p.stride_h, p.pad_h, p.dilation_h);
  p.out_w = conv_out_size(p.in_w, p.kernel_w, p.stride_w, p.pad_w, p.dilation_w);
  TORCH_CHECK(p.out_h > 0 && p.out_w > 0, op, ": output size is too small: ", p.out_h, " x ", p.out_w);
  return p;
}

inline Pool2dParams check_max_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode,
                                     const char* op = "fastconv.max_pool2d") {
  using detail::shape_str;
  detail::check_pool_input_dtype(input, op);
  TORCH_CHECK(input.dim() == 4, op, ": expected a 4-D input (N, C, H, W), got ", input.dim(), "-D input of size ",
              shape_str(input.sizes()));
  detail::check_pair(kernel_size, op, "kernel_size");
  TORCH_CHECK(kernel_size[0] > 0 && kernel_size[1] > 0, op, ": kernel_size must be positive, got ", kernel_size);
  detail::check_window(stride, padding, dilation, op);
  detail::window_span(kernel_size[0], dilation[0], op);
  detail::window_span(kernel_size[1], dilation[1], op);
  Pool2dParams p;
  p.batch = input.size(0);
  p.channels = input.size(1);
  p.in_h = input.size(2);
  p.in_w = input.size(3);
  p.kernel_h = kernel_size[0];
  p.kernel_w = kernel_size[1];
  detail::set_window(p, stride, padding, dilation);
  p.ceil_mode = ceil_mode;
  TORCH_CHECK(p.channels > 0 && p.in_h > 0 && p.in_w > 0, op,
              ": expected input with non-zero channels, height and width, got ", shape_str(input.sizes()));
  // torch's max_pool2d_with_indices requires pad <= kernel/2 (dilation not counted), the stricter of
  // its two checks (the no-indices path allows half the effective kernel); mirror the stricter one.
  TORCH_CHECK(p.pad_h <= p.kernel_h / 2 && p.pad_w <= p.kernel_w / 2, op,
              ": pad should be at most half of kernel size, but got pad=", padding, ", kernel_size=", kernel_size,
              " and dilation=", dilation);
  p.out_h = pool_out_size(p.in_h, p.kernel_h, p.stride_h, p.pad_h, p.dilation_h, ceil_mode);
  p.out_w = pool_out_size(p.in_w, p.kernel_w, p.stride_w, p.pad_w, p.dilation_w, ceil_mode);
  TORCH_CHECK(p.out_h > 0 && p.out_w > 0, op, ": given input size ", shape_str(input.sizes()),
              ", the calculated output size (", p.out_h, " x ", p.out_w, ") is too small");
  // With dilation and padding a window can miss the input altogether; torch then returns -inf and
  // an index outside the input plane (which its backward writes through). Refuse it instead.
  const auto empty_window = [](int64_t out, int64_t in, int64_t k, int64_t s, int64_t pad, int64_t d) {
    for (int64_t o = 0; o < out; ++o) {
      bool hit = false;
      for (int64_t i = 0; i < k && !hit; ++i) {
        const int64_t x = o * s - pad + i * d;
        hit = x >= 0 && x < in;
      }
      if (!hit) return o;
    }
    return int64_t(-1);
  };
  const int64_t bad_h = empty_window(p.out_h, p.in_h, p.kernel_h, p.stride_h, p.pad_h, p.dilation_h);
  const int64_t bad_w = empty_window(p.out_w, p.in_w, p.kernel_w, p.stride_w, p.pad_w, p.dilation_w);
  TORCH_CHECK(bad_h < 0 && bad_w < 0, op, ": with input size ", shape_str(input.sizes()), ", kernel_size=", kernel_size,
              ", stride=", stride, ", padding=", padding, " and dilation=", dilation, " the pooling window of output ",
              bad_h >= 0 ? "row " : "column ", bad_h >= 0 ? bad_h : bad_w, " lies entirely in the padding");
  return p;
}

// Backward semantics, one for every backend: grad_output[o] goes to input position indices[o] when
// that position lies in output o's window (as every index the forward returns does); an index
// outside its window (or outside the plane) contributes nothing. This is what a gather (CUDA: one
// thread per input element visits the windows covering it) can do without atomics, and torch's
// own CUDA kernel behaves the same way.
inline void check_max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                                      const Pool2dParams& p, const char* op = "fastconv._max_pool2d_backward") {
  detail::check_float_tensor(input, op, "input");  // the forward also pools integers; gradients are floating
  const std::vector<int64_t> expect{p.batch, p.channels, p.out_h, p.out_w};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expect), op, ": expected grad_output of size ",
              detail::shape_str(expect), ", got ", detail::shape_str(grad_output.sizes()));
  TORCH_CHECK(indices.sizes() == at::IntArrayRef(expect), op, ": expected indices of size ", detail::shape_str(expect),
              ", got ", detail::shape_str(indices.sizes()));
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": expected int64 indices, got ", indices.scalar_type());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output (", grad_output.scalar_type(),
              ") and input (", input.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(grad_output.device() == input.device() && indices.device() == input.device(), op,
              ": grad_output, input and indices must be on one device");
}

inline void check_conv2d_backward(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dParams& p,
                                  const char* op = "fastconv._conv2d_backward") {
  const std::vector<int64_t> expect{p.batch, p.out_channels, p.out_h, p.out_w};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expect), op, ": expected grad_output of size ",
              detail::shape_str(expect), ", got ", detail::shape_str(grad_output.sizes()));
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output (", grad_output.scalar_type(),
              ") and input (", input.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(grad_output.device() == input.device(), op, ": grad_output is on ", grad_output.device(),
              " but input is on ", input.device());
}

}  // namespace fastconv
