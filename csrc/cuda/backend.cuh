// The one place where fastconv's CUDA sources meet the CUDA runtime: kernel launches, the current
// stream, the device guard, the launch check, and which dispatch key the kernels register for.
//
// The same .cu sources are compiled twice:
//  - by nvcc into fastconv._C, registering torch.ops.fastconv.* for CUDA tensors;
//  - by the host C++ compiler with -DFASTCONV_EMULATE_CUDA into fastconv._C_emulated, registering
//    torch.ops.fastconv_emulated.* (same schemas) for CPU tensors. There, __global__/__device__ are
//    defined away, blockIdx/threadIdx/blockDim/gridDim are host variables, and launch() runs the
//    grid on the calling thread: blocks in a shuffled order, after checking CUDA's launch limits.
// Kernels therefore must not use shared memory, __syncthreads, warp intrinsics or atomics (each
// thread runs to completion before the next starts) unless the emulator learns to run them.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <mutex>
#include <numeric>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#ifdef FASTCONV_EMULATE_CUDA

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

typedef struct CUstream_st* cudaStream_t;

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
// Per host thread, so that two emulated launches on two Python threads do not mix.
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

#define FASTCONV_BACKEND_LIBRARY fastconv_emulated
#define FASTCONV_BACKEND_KEY CPU
#define FASTCONV_BACKEND_NAME "emulated CUDA"

#else  // nvcc

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#define FASTCONV_BACKEND_LIBRARY fastconv
#define FASTCONV_BACKEND_KEY CUDA
#define FASTCONV_BACKEND_NAME "CUDA"

#endif

#include <ATen/cuda/NumericLimits.cuh>  // at::numeric_limits<T>::lower_bound(); host-safe with the defines above

// Distinct names for the two builds: fastconv._C and fastconv._C_emulated may share a process, and
// the inline functions and statics below must not be merged across them by the dynamic linker.
#ifdef FASTCONV_EMULATE_CUDA
#define FASTCONV_BACKEND_NS backend_emulated
#else
#define FASTCONV_BACKEND_NS backend_cuda
#endif

namespace fastconv {
namespace FASTCONV_BACKEND_NS {

// Knobs and counters. The knobs are only settable in the emulated build (tests use them to reach
// multi-image chunks and the 64-bit index path on small shapes); the CUDA build keeps its defaults.
struct State {
  std::atomic<int64_t> workspace_limit{0};  // bytes; 0: the kernels' default
  std::atomic<bool> force_index64{false};   // take the int64 index path whatever the sizes
  std::atomic<uint64_t> seed{0x5eed};       // block-order shuffle seed (emulation)
  std::atomic<int64_t> launches{0};         // kernel launches (emulation)
  std::atomic<int64_t> gemms{0};            // ATen GEMM calls (mm/bmm/addmm/baddbmm/matmul)
  std::atomic<int64_t> workspace_bytes{0};  // scratch bytes allocated by the conv kernels, summed
  std::atomic<int64_t> peak_workspace_bytes{0};
};
inline State& state() {
  static State s;
  return s;
}

inline void count_gemm() { state().gemms.fetch_add(1, std::memory_order_relaxed); }
inline void count_workspace(int64_t bytes) {
  state().workspace_bytes.fetch_add(bytes, std::memory_order_relaxed);
  int64_t prev = state().peak_workspace_bytes.load(std::memory_order_relaxed);
  while (bytes > prev && !state().peak_workspace_bytes.compare_exchange_weak(prev, bytes)) {
  }
}

inline int64_t workspace_limit(int64_t default_bytes) {
  const int64_t v = state().workspace_limit.load(std::memory_order_relaxed);
  return v > 0 ? v : default_bytes;
}
inline bool force_index64() { return state().force_index64.load(std::memory_order_relaxed); }

// A tensor this backend's kernels can run on (the dispatcher guarantees it; checked all the same).
inline bool on_backend(const at::Tensor& t) {
#ifdef FASTCONV_EMULATE_CUDA
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

#ifdef FASTCONV_EMULATE_CUDA
// Nothing to guard on the host.
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};
inline cudaStream_t current_stream() { return nullptr; }

// CUDA's launch limits (compute capability >= 3.0): the emulator refuses what a GPU would refuse.
inline void check_launch_limits(const dim3& grid, const dim3& block, const char* name) {
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1, "emulated launch of ", name, ": empty grid (", grid.x, ", ",
              grid.y, ", ", grid.z, ")");
  TORCH_CHECK(grid.x <= 2147483647u && grid.y <= 65535u && grid.z <= 65535u, "emulated launch of ", name, ": grid (",
              grid.x, ", ", grid.y, ", ", grid.z, ") exceeds CUDA's limits (2^31-1, 65535, 65535)");
  TORCH_CHECK(block.x >= 1 && block.y >= 1 && block.z >= 1 && block.x <= 1024 && block.y <= 1024 && block.z <= 64 &&
                  uint64_t(block.x) * block.y * block.z <= 1024,
              "emulated launch of ", name, ": block (", block.x, ", ", block.y, ", ", block.z,
              ") exceeds CUDA's limits (at most 1024 threads, z at most 64)");
}
#else
// Runs the kernels on the tensor's device, not the current one.
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(at::device_of(t)) {}
  c10::cuda::OptionalCUDAGuard guard;
};
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
#endif

// kernel<<<grid, block, 0, stream>>>(args...), then the launch check. Arguments are converted to
// the kernel's parameter types here (as a <<<>>> launch would), e.g. int64_t sizes to an int index_t.
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch: wrong number of kernel arguments");
#ifdef FASTCONV_EMULATE_CUDA
  (void)stream;
  check_launch_limits(grid, block, name);
  state().launches.fetch_add(1, std::memory_order_relaxed);
  const std::tuple<Params...> params(static_cast<Params>(std::forward<Args>(args))...);
  const uint64_t n_blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(n_blocks);
  std::iota(order.begin(), order.end(), uint64_t(0));
  std::mt19937_64 rng(state().seed.fetch_add(1, std::memory_order_relaxed));
  std::shuffle(order.begin(), order.end(), rng);
  gridDim = grid;
  blockDim = block;
  for (const uint64_t b : order) {
    blockIdx = uint3{unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / grid.x / grid.y)};
    for (unsigned int tz = 0; tz < block.z; ++tz) {
      for (unsigned int ty = 0; ty < block.y; ++ty) {
        for (unsigned int tx = 0; tx < block.x; ++tx) {
          threadIdx = uint3{tx, ty, tz};
          std::apply(kernel, params);
        }
      }
    }
  }
#else
  (void)name;
  // clang-format off: it takes .cuh for C++ and would split the launch brackets
  kernel<<<grid, block, 0, stream>>>(static_cast<Params>(std::forward<Args>(args))...);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace FASTCONV_BACKEND_NS
namespace backend = FASTCONV_BACKEND_NS;
}  // namespace fastconv
