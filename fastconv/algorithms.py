"""Which convolution algorithm fastconv's CPU kernels run, and how to choose it.

On float32 and an AVX-512 CPU each conv pass picks one of:

- ``winograd``: Winograd F(2x2, 3x3) or F(4x4, 3x3) (3x3, stride 1, dilation 1, one group; 5x5 on
  F(2x2, 5x5), other kernels as sums of sub-kernels): 2.25-4x fewer multiplications; float32 results
  within about 5e-7 (F(2x2, 3x3)) to 3e-5 (the larger tiles) of an exact convolution, relative to the
  largest element (README.md: the measured bounds);
- ``implicit-gemm``: stride-1 convolutions read straight from a zero-padded copy of the input;
- ``narrow-direct``: layers with at most 64 output channels (forward of strided ones such as ResNet's
  stem and AlexNet's conv1; backward-weight): register tiles over all channels, broadcasts straight
  from the padded input, no im2col (``"gemm"`` runs these on im2col+gemm instead);
- ``im2col+gemm``: im2col packed into 48-pixel panels, then the same register-blocked micro-kernel;
- ``stride-phases`` (backward-input of strided layers, under ``"benchmark"`` only): one stride-1
  convolution per phase of grad_input on the forward engine (``im2col+gemm+col2im`` is the default);
- ``grouped-direct``: grouped convolutions with 16+ output channels per group (not 1x1): tiles of up to
  48 channels in the vector lanes x a few pixels, broadcasts from a zero-padded input, all three passes
  (3x3 for backward-weight); ``grouped-direct-phases``: strided backward-input of grouped layers with 8+
  input channels per group, one stride-1 pass per phase of grad_input on that kernel. ``"gemm"`` keeps
  them; ``FASTCONV_GROUPED_DIRECT=0`` (or ``1``) turns them off (or on wherever they can run);
- ``channels-last-direct`` (backward-weight): a direct convolution over a zero-padded channels-last
  copy of the input, output channels x (16 input channels, tap) vectors, the pixels the reduction,
  no im2col; by rule for stride-1 layers with 32+ input and output channels per group and 2-9 taps (ResNet's
  3x3 layers, ResNeXt's 32 a group), under ``"benchmark"`` a candidate wherever it applies
  (``FASTCONV_CPU_WEIGHT_GRAD=channels-last`` or ``gemm`` forces either);
- ``direct``: depthwise convolutions (one input channel per group); on the portable path also groups of
  2-4 channels, which run on the engine otherwise;
- ``im2col+gemm-avx2``: float32 on CPUs with AVX2 + FMA but without AVX-512: im2col tiles multiplied by
  fastconv's packed 6x16 AVX2 GEMM (``FASTCONV_CPU_GEMM=avx2`` forces it on AVX-512 CPUs too);
- ``im2col+gemm-aten``: the portable path (float64, CPUs without AVX2, ``FASTCONV_CPU_GEMM=aten``).

``"auto"`` (the default) decides per pass from the layer's shape (rules measured on the benchmark
layers, see benchmarks/README.md); ``"gemm"`` never uses Winograd, narrow-direct or channels-last-direct; ``"winograd"``
uses Winograd wherever it applies; ``"benchmark"`` (like ``torch.backends.cudnn.benchmark``) times
every kernel that can run a pass the first time a shape comes (on its real data, 3 runs each) and
keeps the fastest for the rest of the process, per shape and thread count: the rules were measured
on a few machines, this measures the one it runs on (the first call of each shape costs that
measurement). The environment variable ``FASTCONV_CONV_ALGORITHM`` sets the starting value.
"""
import contextlib

import torch

_CHOICES = ("auto", "gemm", "winograd", "benchmark")


def set_conv_algorithm(name):
    """Sets the algorithm setting for every later CPU convolution in this process: 'auto', 'gemm',
    'winograd' or 'benchmark'."""
    if name not in _CHOICES:
        raise ValueError(f"fastconv.set_conv_algorithm: expected one of {_CHOICES}, got {name!r}")
    torch.ops.fastconv._set_conv_algorithm(name)


def get_conv_algorithm():
    """The current setting: 'auto', 'gemm', 'winograd' or 'benchmark'."""
    return torch.ops.fastconv._get_conv_algorithm()


@contextlib.contextmanager
def conv_algorithm(name):
    """``with fastconv.conv_algorithm("gemm"): ...`` runs the block (forward and any backward
    called inside it) with that setting, then restores the previous one."""
    old = get_conv_algorithm()
    set_conv_algorithm(name)
    try:
        yield
    finally:
        set_conv_algorithm(old)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d_algorithm(input, weight, stride=1, padding=0, dilation=1, groups=1):
    """The CPU algorithm(s) a conv2d with these arguments runs under the current setting: one name
    when all three passes agree, else ``"forward/backward-input/backward-weight"``. Under
    ``"benchmark"``: the measured choice of a pass once that shape has run, the rule's before. Only shapes and
    dtypes are read (meta tensors work), and whether the input and the weight are channels_last (the
    NHWC kernels' layouts). ``padding`` may be an int, a pair or 'valid'/'same'."""
    stride, dilation = _pair(stride), _pair(dilation)
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        k = weight.shape[2:]
        padding = tuple(d * (kk - 1) // 2 for d, kk in zip(dilation, k))
    padding = _pair(padding)
    if input.dim() == 3:
        input = input.unsqueeze(0)
    meta_in = torch.empty_strided(input.shape, input.stride(), dtype=input.dtype, device="meta")
    meta_w = torch.empty_strided(weight.shape, weight.stride(), dtype=weight.dtype, device="meta")
    return torch.ops.fastconv._cpu_conv_algorithm(meta_in, meta_w, list(stride), list(padding), list(dilation), groups)
