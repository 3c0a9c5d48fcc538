"""F-style functions with torch.nn.functional's semantics, and the autograd.Function classes.

``conv2d`` and ``max_pool2d`` normalise their arguments once (ints or pairs, ``padding='same'``,
unbatched input, autocast, memory format) and call the autograd Functions, whose forward and
backward are the registered ops ``torch.ops.fastconv.*``.
"""
import numbers

import torch
import torch.nn.functional as F

from . import _ops  # noqa: F401  (registers autograd and fake kernels)

ops = torch.ops.fastconv

__all__ = ["conv2d", "max_pool2d", "Conv2dFunction", "MaxPool2dFunction"]


def _pair(value, name, op):
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, numbers.Integral):
        return (int(value), int(value))
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) == 1:
        items = items * 2
    if len(items) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    return (int(items[0]), int(items[1]))


def _autocast(*tensors):
    """Casts floating tensors to the autocast dtype when autocast is on for their device.

    Custom ops have no autocast kernel of their own, so fastconv does here what autocast does for
    F.conv2d: run the op in the lower precision.
    """
    first = tensors[0]
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _needs_grad(*tensors):
    # autograd.Function.apply costs ~20 us of Python per call: inference skips it (batch-1 latency)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _channels_last(t):
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class Conv2dFunction(torch.autograd.Function):
    """conv2d as an autograd.Function over the ops ``fastconv::conv2d`` and ``fastconv::_conv2d_backward``.

    ``apply(input, weight, bias, stride, padding, dilation, groups)`` with 4-D input and pairs of ints.
    Gradients that ``ctx.needs_input_grad`` does not ask for are not computed. The backward op is
    itself differentiable, so double backward works.
    """

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups):
        return ops.conv2d(input, weight, bias, stride, padding, dilation, groups)

    # the same autograd formulas as the registered op's (fastconv/_ops.py), so both paths agree
    setup_context = staticmethod(_ops._conv2d_setup_context)
    backward = staticmethod(_ops._conv2d_backward)


class MaxPool2dFunction(torch.autograd.Function):
    """max_pool2d as an autograd.Function over ``fastconv::max_pool2d`` and ``fastconv::_max_pool2d_backward``.

    ``apply(input, kernel_size, stride, padding, dilation, ceil_mode)`` returns ``(output, indices)``;
    indices are int64 flat positions within each input plane, exactly as torch's.
    """

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode):
        return ops.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)

    setup_context = staticmethod(_ops._max_pool2d_setup_context)
    backward = staticmethod(_ops._max_pool2d_backward)


def _check_tensor(t, name, op):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution with :func:`torch.nn.functional.conv2d`'s signature and semantics.

    ``input`` is ``(N, C, H, W)`` or unbatched ``(C, H, W)``; ``weight`` is ``(out, C/groups, kH, kW)``;
    ``stride``, ``padding`` and ``dilation`` are ints or pairs; ``padding`` may also be ``'valid'`` or
    ``'same'``. Output size per dimension: ``(H + 2P - dilation*(K-1) - 1) // S + 1``.
    """
    op = "fastconv.conv2d"
    _check_tensor(input, "input", op)
    _check_tensor(weight, "weight", op)
    if bias is not None:
        _check_tensor(bias, "bias", op)
    if input.dim() not in (3, 4):
        raise RuntimeError(f"{op}: expected a 3-D (unbatched) or 4-D (batched) input, "
                           f"got {input.dim()}-D input of size {list(input.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"{op}: expected a 4-D weight (out_channels, in_channels/groups, kH, kW), "
                           f"got {weight.dim()}-D weight of size {list(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"{op}: groups must be an int, got {groups!r}")
    stride = _pair(stride, "stride", op)
    dilation = _pair(dilation, "dilation", op)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' is not supported for strided convolutions")
            if min(dilation) <= 0:
                raise RuntimeError(f"{op}: dilation must be positive, got {list(dilation)}")
            pads = []
            extra = []
            for d, k in zip(dilation, weight.shape[2:]):
                total = d * (k - 1)
                pads.append(total // 2)
                extra.append(total - 2 * (total // 2))
            if any(extra):
                # an even kernel needs one more row/column on the far side, as torch does it
                input = F.pad(input, (0, extra[1], 0, extra[0]))
            padding = tuple(pads)
        else:
            raise ValueError(f"{op}: invalid padding string {padding!r}, should be one of 'valid' or 'same'")
    else:
        padding = _pair(padding, "padding", op)
    channels_last = _channels_last(input)
    input, weight, bias = _autocast(input, weight, bias)
    args = (input, weight, bias, list(stride), list(padding), list(dilation), int(groups))
    out = Conv2dFunction.apply(*args) if _needs_grad(input, weight, bias) else ops.conv2d(*args)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out.squeeze(0) if unbatched else out


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """2-D max pooling with :func:`torch.nn.functional.max_pool2d`'s signature and semantics.

    ``stride`` defaults to ``kernel_size``; ``padding`` is at most half the effective kernel; with
    ``return_indices=True`` also returns int64 indices (flat position within each input plane).
    """
    op = "fastconv.max_pool2d"
    _check_tensor(input, "input", op)
    if input.dim() not in (3, 4):
        raise RuntimeError(f"{op}: expected a 3-D (unbatched) or 4-D (batched) input, "
                           f"got {input.dim()}-D input of size {list(input.shape)}")
    kernel_size = _pair(kernel_size, "kernel_size", op)
    if stride is None or (not isinstance(stride, numbers.Integral) and len(stride) == 0):
        stride = kernel_size
    stride = _pair(stride, "stride", op)
    padding = _pair(padding, "padding", op)
    dilation = _pair(dilation, "dilation", op)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    channels_last = _channels_last(input)
    args = (input, list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode))
    out, indices = MaxPool2dFunction.apply(*args) if _needs_grad(input) else ops.max_pool2d(*args)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
        indices = indices.contiguous(memory_format=torch.channels_last)
    if unbatched:
        out, indices = out.squeeze(0), indices.squeeze(0)
    return (out, indices) if return_indices else out
