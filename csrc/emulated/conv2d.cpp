// The CUDA backend's conv2d, compiled by the host compiler (see csrc/cuda/backend.cuh).
#include "cuda/conv2d.cu"
