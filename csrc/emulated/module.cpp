// fastconv._C_emulated: the CUDA backend's own sources (csrc/cuda/*.cu) compiled by the host
// compiler with -DFASTCONV_EMULATE_CUDA and registered for CPU tensors as
// torch.ops.fastconv_emulated.*, with the same schemas as torch.ops.fastconv.* (csrc/fastconv.cpp;
// tests/test_emulated_cuda.py checks that they agree). A test and CI tool, not part of the package:
// every kernel launch runs on the calling thread, block by block, in a shuffled order.
#include <Python.h>
#include <torch/library.h>

#include <vector>

#include "cuda/backend.cuh"
#include "op_schemas.h"

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

// Counts, per thread, how many times it ran: lets tests check that the emulated launcher runs every
// (block, thread) of a grid exactly once, and refuses grids and blocks a GPU would refuse.
__global__ void count_threads_kernel(int64_t* hits) {
  const uint64_t block = blockIdx.x + uint64_t(gridDim.x) * (blockIdx.y + uint64_t(gridDim.y) * blockIdx.z);
  const uint64_t thread = threadIdx.x + uint64_t(blockDim.x) * (threadIdx.y + uint64_t(blockDim.y) * threadIdx.z);
  hits[block * (uint64_t(blockDim.x) * blockDim.y * blockDim.z) + thread] += 1;
}

at::Tensor launch_test(at::IntArrayRef grid, at::IntArrayRef block) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "_launch_test: expected 3 grid and 3 block dimensions");
  const auto dim = [](at::IntArrayRef v) {
    return dim3(static_cast<unsigned>(v[0]), static_cast<unsigned>(v[1]), static_cast<unsigned>(v[2]));
  };
  at::Tensor hits = at::zeros({grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2]}, at::kLong);
  backend::launch("count_threads_kernel", &count_threads_kernel, dim(grid), dim(block), backend::current_stream(),
                  hits.mutable_data_ptr<int64_t>());
  return hits;
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
  m.def(schemas::kConv2d);
  m.def(schemas::kConv2dBackward);
  m.def(schemas::kMaxPool2d);
  m.def(schemas::kMaxPool2dBackward);
  m.def(schemas::kConv2dRelu);
  // Test knobs and counters of the emulated backend.
  m.def("_set_workspace_limit(int bytes) -> int", &set_workspace_limit);
  m.def("_set_force_index64(bool on) -> bool", &set_force_index64);
  m.def("_set_seed(int seed) -> ()", &set_seed);
  m.def("_counters() -> int[]", &counters);
  m.def("_reset_counters() -> ()", &reset_counters);
  m.def("_launch_test(int[3] grid, int[3] block) -> Tensor", &launch_test);
}

}  // namespace fastconv

extern "C" PyObject* PyInit__C_emulated(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_emulated", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
