// fastconv._C_emulated: the CUDA backend's own sources (csrc/cuda/*.cu) compiled by the host
// compiler with -DFASTCONV_EMULATE_CUDA and registered for CPU tensors as
// torch.ops.fastconv_emulated.*, with the same schemas as torch.ops.fastconv.* (csrc/fastconv.cpp;
// tests/test_emulated_cuda.py checks that they agree). A test and CI tool, not part of the package:
// every kernel launch runs on the calling thread, block by block, in a shuffled order.
#include <Python.h>
#include <torch/library.h>

#include <vector>

#include "cuda/backend.cuh"

namespace fastconv {
namespace {

int64_t set_workspace_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "fastconv_emulated._set_workspace_limit: expected bytes >= 0 (0: default), got ", bytes);
  return backend::state().workspace_limit.exchange(bytes);
}

bool set_force_index64(bool on) { return backend::state().force_index64.exchange(on); }

void set_seed(int64_t seed) { backend::state().seed.store(static_cast<uint64_t>(seed)); }

// [kernel launches, GEMM calls, workspace bytes allocated (summed), largest workspace] since the last reset.
std::vector<int64_t> counters() {
  auto& s = backend::state();
  return {s.launches.load(), s.gemms.load(), s.workspace_bytes.load(), s.peak_workspace_bytes.load()};
}

void reset_counters() {
  auto& s = backend::state();
  s.launches = 0;
  s.gemms = 0;
  s.workspace_bytes = 0;
  s.peak_workspace_bytes = 0;
}

}  // namespace

TORCH_LIBRARY(fastconv_emulated, m) {
  // Same schemas as TORCH_LIBRARY(fastconv, m) in csrc/fastconv.cpp.
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  m.def("_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
        "bool ceil_mode) -> (Tensor, Tensor)");
  m.def("_max_pool2d_backward(Tensor grad_output, Tensor input, Tensor indices, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
  // Test knobs and counters of the emulated backend.
  m.def("_set_workspace_limit(int bytes) -> int", &set_workspace_limit);
  m.def("_set_force_index64(bool on) -> bool", &set_force_index64);
  m.def("_set_seed(int seed) -> ()", &set_seed);
  m.def("_counters() -> int[]", &counters);
  m.def("_reset_counters() -> ()", &reset_counters);
}

}  // namespace fastconv

extern "C" PyObject* PyInit__C_emulated(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_emulated", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
