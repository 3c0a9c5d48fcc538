"""fastconv: im2col+GEMM ``conv2d`` and ``max_pool2d`` kernels for PyTorch (C++ on the CPU, CUDA on the GPU).

Swap ``nn.Conv2d``/``nn.MaxPool2d`` for :class:`fastconv.Conv2d`/:class:`fastconv.MaxPool2d`, or call
:func:`fastconv.convert` on a model. The kernels are registered torch ops (``torch.ops.fastconv.*``)
with autograd and fake kernels, so they work with ``torch.compile`` and ``torch.library.opcheck``.
"""
import torch  # noqa: F401  (torch first: the extension links against its libraries)

from . import _ops, functional  # noqa: F401  (_ops: autograd, autocast and fake kernels of the ops)
from ._extension import cuda_version, has_cuda_kernels  # loads fastconv._C, registering the ops
from .algorithms import conv2d_algorithm, conv_algorithm, get_conv_algorithm, set_conv_algorithm
from .functional import Conv2dFunction, MaxPool2dFunction
from .fused import Conv2dReLU, fuse
from .modules import Conv2d, MaxPool2d, convert, revert

__version__ = "0.1.0"

__all__ = [
    "Conv2d",
    "MaxPool2d",
    "convert",
    "revert",
    "functional",
    "Conv2dFunction",
    "MaxPool2dFunction",
    "has_cuda_kernels",
    "cuda_version",
    "Conv2dReLU",
    "fuse",
    "conv2d_algorithm",
    "conv_algorithm",
    "get_conv_algorithm",
    "set_conv_algorithm",
]
