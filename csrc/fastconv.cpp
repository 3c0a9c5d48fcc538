// The op schemas of fastconv and the Python module init. Kernels register themselves per backend
// in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(fastconv, CPU, m)) and csrc/cuda/*.cu (..., CUDA, m);
// every op's autograd is csrc/autograd.cpp; fake (meta) kernels and autocast are registered from
// Python, in fastconv/_ops.py.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "op_schemas.h"

#ifdef FASTCONV_WITH_CUDA
#include <cuda.h>
#endif

namespace fastconv {

// CUDA version the extension was compiled with (major*1000 + minor*10), -1 for a CPU-only build.
int64_t cuda_version() {
#ifdef FASTCONV_WITH_CUDA
  return CUDA_VERSION;
#else
  return -1;
#endif
}

TORCH_LIBRARY(fastconv, m) {
  m.def(schemas::kConv2d);
  m.def(schemas::kConv2dBackward);
  m.def(schemas::kMaxPool2d);
  m.def(schemas::kMaxPool2dBackward);
  m.def(schemas::kConv2dRelu);
  m.def("_cuda_version() -> int", &cuda_version);
}

// Backends without a conv2d_relu kernel of their own (the CPU and CUDA kernels register one): the two
// ops one after the other, so a build without CUDA kernels still answers CUDA tensors with conv2d's
// clear error.
at::Tensor conv2d_relu_composite(const at::Tensor& input, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  static const auto conv = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastconv::conv2d", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                                 at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>();
  return conv.call(input, weight, bias, stride, padding, dilation, groups).relu_();
}

TORCH_LIBRARY_IMPL(fastconv, CompositeExplicitAutograd, m) { m.impl("conv2d_relu", &conv2d_relu_composite); }

}  // namespace fastconv

// `import fastconv._C` loads this library, which runs the registrations above. No Python
// functions live here: everything is reached through torch.ops.fastconv.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
