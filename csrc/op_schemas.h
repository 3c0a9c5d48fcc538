// The schemas of the ops, shared by TORCH_LIBRARY(fastconv) (csrc/fastconv.cpp) and the emulated CUDA
// backend's TORCH_LIBRARY(fastconv_emulated) (csrc/emulated/module.cpp), so the two cannot drift.
#pragma once

namespace fastconv {
namespace schemas {

constexpr const char* kConv2d =
    "conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
    "int groups) -> Tensor";
// Returns (grad_input, grad_weight, grad_bias); an entry whose output_mask is false is an empty tensor.
constexpr const char* kConv2dBackward =
    "_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)";
// Returns (output, indices): indices are flat positions within each input plane, as torch's.
constexpr const char* kMaxPool2d =
    "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
    "bool ceil_mode) -> (Tensor, Tensor)";
constexpr const char* kMaxPool2dBackward =
    "_max_pool2d_backward(Tensor grad_output, Tensor input, Tensor indices, int[2] kernel_size, "
    "int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor";
// conv2d followed by ReLU, ReLU applied in the kernel's epilogue where the backend can (fastconv.fuse()).
constexpr const char* kConv2dRelu =
    "conv2d_relu(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
    "int groups) -> Tensor";

}  // namespace schemas
}  // namespace fastconv
