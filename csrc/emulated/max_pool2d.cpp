// The CUDA backend's max_pool2d, compiled by the host compiler (see csrc/cuda/backend.cuh).
#include "cuda/max_pool2d.cu"
