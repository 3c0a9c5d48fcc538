"""Fake (meta) kernels, autocast rules and decompositions of the registered ops ``torch.ops.fastconv.*``.

The C++/CUDA kernels compute; this file registers, on the dispatcher, what every caller of the ops
gets (``fastconv.functional``, the modules and ``torch.ops.fastconv.*`` alike):
- fake kernels: output shapes for torch.compile/FakeTensor tracing, and the kernels of meta tensors;
- autocast (``AutocastCPU``/``AutocastCUDA``), as torchvision's ``csrc/ops/autocast`` kernels do;
- decompositions into the equivalent aten ops, which only exporters that run torch's whole
  decomposition table apply: ``torch.onnx.export(model, args, dynamo=True)`` then writes standard
  ONNX ``Conv`` and ``MaxPool`` nodes. Eager calls, autograd and torch.compile keep fastconv's kernels.
"""
import torch
from torch._prims_common import suggest_memory_format

from ._extension import has_cuda_kernels

ops = torch.ops.fastconv


def conv_out_size(size, kernel, stride, pad, dilation):
    """The output-size formula of a convolution: (H + 2P - dilation*(K-1) - 1) // S + 1."""
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def pool_out_size(size, kernel, stride, pad, dilation, ceil_mode):
    """torch's pooling output size: floor or ceil division; with ceil_mode the last window must start inside."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out = out - 1
    return out


# ---------------------------------------------------------------------------------------------
# fake kernels: shapes and dtypes only, for torch.compile / FakeTensor tracing
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("fastconv::conv2d")
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups):
    torch._check(input.dim() == 4, lambda: f"fastconv.conv2d: expected a 4-D input, got {input.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"fastconv.conv2d: expected a 4-D weight, got {weight.dim()}-D")
    torch._check(input.shape[1] == weight.shape[1] * groups, lambda: "fastconv.conv2d: channel mismatch")
    torch._check(input.device == weight.device,
                 lambda: f"fastconv.conv2d: input is on {input.device} but weight is on {weight.device}")
    torch._check(input.dtype == weight.dtype,
                 lambda: f"fastconv.conv2d: input ({input.dtype}) and weight ({weight.dtype}) must have the same dtype")
    oh = conv_out_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_out_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return _output_like(input, (input.shape[0], weight.shape[0], oh, ow), weight=weight)


def _suggests_channels_last(t):
    """Whether t's strides suggest channels_last (C++'s Tensor::suggest_memory_format: a channels_last
    tensor, a slice of one, or one that is both layouts with channels_last strides)."""
    return t.dim() == 4 and suggest_memory_format(t) == torch.channels_last


def _output_like(input, shape, dtype=None, weight=None):
    """An empty result of the ops, laid out as their kernels' (csrc/conv_params.h, as torch's): channels_last
    where the input's strides suggest it or, for conv2d (``weight`` given), the weight's do."""
    if _suggests_channels_last(input) or (weight is not None and _suggests_channels_last(weight)):
        # (torch.empty's channels_last strides, as the kernels' at::empty: a 1x1 result's differ from
        # .contiguous(memory_format=...)'s, which keeps a tensor that is both layouts as it is)
        return torch.empty(shape, dtype=dtype or input.dtype, device=input.device, memory_format=torch.channels_last)
    return input.new_empty(shape, dtype=dtype)


@torch.library.register_fake("fastconv::_conv2d_backward")
def _conv2d_backward_fake(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    # (channels_last where the forward's result is)
    gi = _output_like(input, input.shape, weight=weight) if output_mask[0] else input.new_empty((0,))
    gw = _output_like(weight, weight.shape, weight=input) if output_mask[1] else input.new_empty((0,))
    gb = input.new_empty((weight.shape[0],)) if output_mask[2] else input.new_empty((0,))
    return gi, gw, gb


@torch.library.register_fake("fastconv::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    torch._check(input.dim() == 4, lambda: f"fastconv.max_pool2d: expected a 4-D input, got {input.dim()}-D")
    oh = pool_out_size(input.shape[2], kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = pool_out_size(input.shape[3], kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    shape = (input.shape[0], input.shape[1], oh, ow)
    return _output_like(input, shape), _output_like(input, shape, torch.long)


@torch.library.register_fake("fastconv::_max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    return _output_like(input, input.shape)


# ---------------------------------------------------------------------------------------------
# autocast: conv2d runs in the autocast dtype, as torch's conv2d does (its lower-precision list)
# ---------------------------------------------------------------------------------------------
_lib = torch.library.Library("fastconv", "IMPL")


def _autocast_eligible(t, device_type):
    # at::autocast::is_eligible: a floating tensor of the autocast's device type, float64 excepted
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type)


def _conv2d_autocast(name, device_type):
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    below = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    op = getattr(ops, name)

    def kernel(input, weight, bias, stride, padding, dilation, groups):
        dtype = torch.get_autocast_dtype(device_type)  # read per call: the dtype of the enclosing autocast
        input, weight, bias = (t.to(dtype) if _autocast_eligible(t, device_type) else t
                               for t in (input, weight, bias))
        with torch._C._ExcludeDispatchKeyGuard(below):  # then run the op with autocast off, once
            return op(input, weight, bias, stride, padding, dilation, groups)

    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", key):
        _lib.impl(name, kernel, key)


# conv2d_relu: the fused op of fastconv.fuse() (fastconv/fused.py), same arguments as conv2d
_CONV_OPS = ("conv2d", "conv2d_relu")
for _name in _CONV_OPS:
    for _device_type in ("cpu", "cuda"):
        _conv2d_autocast(_name, _device_type)


# ---------------------------------------------------------------------------------------------
# decompositions into aten, for exporters (ONNX): the same math as the kernels, as standard ops
# ---------------------------------------------------------------------------------------------
@torch._decomp.register_decomposition(ops.conv2d.default)
def _conv2d_decomposition(input, weight, bias, stride, padding, dilation, groups):
    return torch.ops.aten.convolution.default(input, weight, bias, stride, padding, dilation, False, [0, 0], groups)


@torch._decomp.register_decomposition(ops.conv2d_relu.default)
def _conv2d_relu_decomposition(input, weight, bias, stride, padding, dilation, groups):
    return torch.ops.aten.relu.default(_conv2d_decomposition(input, weight, bias, stride, padding, dilation, groups))


@torch._decomp.register_decomposition(ops.max_pool2d.default)
def _max_pool2d_decomposition(input, kernel_size, stride, padding, dilation, ceil_mode):
    return torch.ops.aten.max_pool2d_with_indices.default(input, kernel_size, stride, padding, dilation, ceil_mode)


# ---------------------------------------------------------------------------------------------
# a CPU-only build still gets a clear message for CUDA tensors
# ---------------------------------------------------------------------------------------------
def _no_cuda_kernels(name):
    def kernel(*args, **kwargs):
        raise RuntimeError(
            f"fastconv.{name.lstrip('_')}: this build of fastconv has no CUDA kernels, but got CUDA tensors. "
            "Rebuild with a CUDA build of torch and the CUDA toolkit (nvcc) available: "
            "`pip install --no-build-isolation -e .` (set FASTCONV_FORCE_CUDA=1 to make the build fail "
            "instead of silently skipping CUDA), or move the tensors to the CPU."
        )

    return kernel


if not torch._C._dispatch_has_kernel_for_dispatch_key("fastconv::conv2d", "CUDA"):
    for _name in ("conv2d", "_conv2d_backward", "max_pool2d", "_max_pool2d_backward"):
        torch.library.impl(f"fastconv::{_name}", "CUDA")(_no_cuda_kernels(_name))

__all__ = ["conv_out_size", "pool_out_size", "has_cuda_kernels"]
