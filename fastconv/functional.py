"""F-style functions with torch.nn.functional's semantics.

``conv2d`` and ``max_pool2d`` normalise their arguments once (ints or pairs, ``padding='same'``,
unbatched input, memory format) and call the registered ops ``torch.ops.fastconv.*``. Everything
else lives on the dispatcher: autograd (csrc/autograd.cpp; no graph when no input needs a gradient),
autocast and the fake/meta kernels (fastconv/_ops.py).
"""
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.jit.annotations import BroadcastingList2

from . import _ops, transforms  # noqa: F401  (_ops registers autograd and fake kernels)

ops = torch.ops.fastconv

__all__ = ["conv2d", "max_pool2d", "Conv2dFunction", "MaxPool2dFunction"]


def _pair(value, name, op):
    kind = type(value)  # fast paths first: this runs several times per call of a small layer
    if kind is int:
        return (value, value)
    if kind is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
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


class Conv2dFunction:
    """Kept for compatibility: ``apply(input, weight, bias, stride, padding, dilation, groups)`` (4-D
    input, pairs of ints) calls ``torch.ops.fastconv.conv2d``, whose autograd is registered on the op."""

    @staticmethod
    def apply(input, weight, bias, stride, padding, dilation, groups):
        return ops.conv2d(input, weight, bias, list(stride), list(padding), list(dilation), int(groups))


class MaxPool2dFunction:
    """Kept for compatibility: ``apply(input, kernel_size, stride, padding, dilation, ceil_mode)`` calls
    ``torch.ops.fastconv.max_pool2d`` and returns ``(output, indices)`` (int64 flat positions within
    each input plane, exactly as torch's)."""

    @staticmethod
    def apply(input, kernel_size, stride, padding, dilation, ceil_mode):
        return ops.max_pool2d(input, list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode))


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
    if type(groups) is not int and (isinstance(groups, bool) or not isinstance(groups, numbers.Integral)):
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
    return _run_conv2d(input, weight, bias, stride, padding, dilation, int(groups), unbatched)


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
    out, indices = _run_max_pool2d(input, kernel_size, stride, padding, dilation, bool(ceil_mode), unbatched)
    return (out, indices) if return_indices else out


# The registered ops on a 4-D input with normalised arguments, for the functions above and for the
# modules' TorchScript path (fastconv/modules.py): the ops lay their results out as torch's (channels_last
# where the input's, or a conv's weight's, strides suggest it), `unbatched` drops the batch dimension the
# caller added, and under a torch.func transform the ops go through fastconv/transforms.py (their C++ autograd cannot be
# transformed; TorchScript compiles only the first branch).
def _run_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: BroadcastingList2[int], padding: BroadcastingList2[int], dilation: BroadcastingList2[int],
                groups: int, unbatched: bool) -> torch.Tensor:
    if torch.jit.is_scripting():
        out = torch.ops.fastconv.conv2d(input, weight, bias, stride, padding, dilation, groups)
    elif transforms.active():
        out = transforms.conv2d(input, weight, bias, stride, padding, dilation, groups)
    else:
        out = ops.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return out.squeeze(0) if unbatched else out


def _run_max_pool2d(input: torch.Tensor, kernel_size: BroadcastingList2[int], stride: BroadcastingList2[int],
                    padding: BroadcastingList2[int], dilation: BroadcastingList2[int], ceil_mode: bool,
                    unbatched: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if torch.jit.is_scripting():
        out, indices = torch.ops.fastconv.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
    elif transforms.active():
        out, indices = transforms.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
    else:
        out, indices = ops.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
    if unbatched:
        out, indices = out.squeeze(0), indices.squeeze(0)
    return out, indices
