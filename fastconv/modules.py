"""Drop-in replacements for torch.nn.Conv2d and torch.nn.MaxPool2d, convert() and its inverse revert().

The classes subclass torch.nn's, so constructor signatures, parameter names, initialisation,
``reset_parameters``, ``extra_repr`` and state_dict keys are torch.nn's own; only ``forward``
differs, running fastconv's kernels. A state_dict moves between fastconv and torch.nn both ways.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.jit.annotations import BroadcastingList2

from . import functional as FC

__all__ = ["Conv2d", "MaxPool2d", "convert", "revert"]


class Conv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` computed by fastconv's im2col+GEMM kernels.

    Same arguments as torch.nn.Conv2d: ``in_channels, out_channels, kernel_size, stride=1,
    padding=0, dilation=1, groups=1, bias=True, padding_mode='zeros', device=None, dtype=None``.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        if torch.jit.is_scripting():
            if self.padding_mode != "zeros" or isinstance(self.padding, str):  # 'same'/'valid': padded here
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
                return _scripted_conv2d(input, weight, bias, self.stride, (0, 0), self.dilation, self.groups)
            return _scripted_conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return FC.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return FC.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class MaxPool2d(nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` computed by fastconv's kernels.

    Same arguments as torch.nn.MaxPool2d: ``kernel_size, stride=None, padding=0, dilation=1,
    return_indices=False, ceil_mode=False``.
    """

    def forward(self, input):
        if torch.jit.is_scripting():
            out, indices = _scripted_max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                                                self.ceil_mode)
            if self.return_indices:
                return out, indices
            return out
        return FC.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                             ceil_mode=self.ceil_mode, return_indices=self.return_indices)


# TorchScript's paths (torch.jit.script of a model using the modules): the registered ops with the
# arguments the module holds, through fastconv.functional's shared tail. The eager paths above
# (fastconv.functional) normalise more forms than TorchScript compiles, and are what runs outside a script.
def _scripted_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     stride: BroadcastingList2[int], padding: BroadcastingList2[int], dilation: BroadcastingList2[int],
                     groups: int) -> torch.Tensor:
    unbatched = input.dim() == 3
    return FC._run_conv2d(input.unsqueeze(0) if unbatched else input, weight, bias, stride, padding, dilation,
                          groups, unbatched)


def _scripted_max_pool2d(input: torch.Tensor, kernel_size: BroadcastingList2[int], stride: BroadcastingList2[int],
                         padding: BroadcastingList2[int], dilation: BroadcastingList2[int], ceil_mode: bool):
    unbatched = input.dim() == 3
    return FC._run_max_pool2d(input.unsqueeze(0) if unbatched else input, kernel_size, stride, padding, dilation,
                              ceil_mode, unbatched)


def _copy_conv(m, cls):
    new = cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
              dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
              device="meta", dtype=m.weight.dtype)
    # share the Parameter objects: weights, device, dtype and any optimizer holding them stay valid
    new.weight = m.weight
    new.bias = m.bias
    return new


def _copy_pool(m, cls):
    return cls(m.kernel_size, m.stride, m.padding, m.dilation, return_indices=m.return_indices,
               ceil_mode=m.ceil_mode)


def _swap(model, conv_from, conv_to, pool_from, pool_to):
    if type(model) is conv_from:
        new = _copy_conv(model, conv_to)
    elif type(model) is pool_from:
        new = _copy_pool(model, pool_to)
    else:
        for name, child in model.named_children():
            swapped = _swap(child, conv_from, conv_to, pool_from, pool_to)
            if swapped is not child:
                setattr(model, name, swapped)
        return model
    new.train(model.training)
    return new


def convert(model):
    """Replaces every ``nn.Conv2d`` and ``nn.MaxPool2d`` in ``model`` (nested too) by fastconv's.

    Parameters are kept (the same Parameter objects, so device, dtype and optimizer state stay),
    and so are training/eval mode. Returns the model; a bare ``nn.Conv2d``/``nn.MaxPool2d`` passed
    in is returned converted. :func:`revert` undoes it.
    """
    return _swap(model, nn.Conv2d, Conv2d, nn.MaxPool2d, MaxPool2d)


def revert(model):
    """The inverse of :func:`convert`: every fastconv ``Conv2d``/``MaxPool2d`` in ``model`` becomes
    ``torch.nn``'s again, with the same Parameter objects and training/eval mode. Returns the model;
    a bare fastconv module passed in is returned reverted.
    """
    return _swap(model, Conv2d, nn.Conv2d, MaxPool2d, nn.MaxPool2d)
