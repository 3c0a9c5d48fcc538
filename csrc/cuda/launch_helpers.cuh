// The launch helpers shared by fastconv's CUDA kernels (csrc/cuda/*.cu): threads per block, the grid
// size of a grid-stride loop, whether a kernel may index in int, and the grid-stride loop itself.
// Like every CUDA source here they compile for a GPU (nvcc) and for the CPU (the emulated backend,
// backend.cuh).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "backend.cuh"

namespace fastconv {
namespace {

constexpr int kThreadsPerBlock = 256;
// Grid-stride loops make any cap correct; 65536 blocks of 256 threads fill every SM many times over.
constexpr int64_t kMaxBlocks = 65536;

inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreadsPerBlock - 1) / kThreadsPerBlock, kMaxBlocks)));
}

// True when `numel` elements can be indexed with int, including the last grid-stride step
// (idx + blockDim.x * gridDim.x must not overflow either). Tests can force the int64 path
// (backend::force_index64, emulated build only) to run it on small shapes.
inline bool fits_int32(int64_t numel) {
  return !backend::force_index64() &&
         numel <= static_cast<int64_t>(std::numeric_limits<int>::max()) - kThreadsPerBlock * kMaxBlocks;
}

// True when every value (an element count, or a stride, padding, dilation or extent that a kernel
// computes with) fits the int path. Element counts alone are not enough: a stride of 2^32 cut to
// int is 0 and divides by zero, a padding of 1.5e9 doubled overflows.
inline bool fits_int32(std::initializer_list<int64_t> values) {
  for (const int64_t v : values) {
    if (!fits_int32(v)) {
      return false;
    }
  }
  return true;
}

// Grid-stride loop over [0, n) with an index of type index_t.
// Every operand is cast first so that the arithmetic happens in index_t, not in unsigned int.
#define FASTCONV_KERNEL_LOOP(index_t, i, n)                                                                         \
  for (index_t i =                                                                                                  \
           static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) + static_cast<index_t>(threadIdx.x); \
       i < (n); i += static_cast<index_t>(blockDim.x) * static_cast<index_t>(gridDim.x))

}  // namespace
}  // namespace fastconv
