"""fastconv.fuse(): Conv2d -> ReLU [-> MaxPool2d] chains as one fused module.

What is matched: inside every ``nn.Sequential`` of the model (nested ones too), a ``Conv2d``
(torch.nn's or fastconv's, ``padding_mode='zeros'``) directly followed by an ``nn.ReLU`` (in place
or not), optionally followed directly by an ``nn.MaxPool2d`` (torch.nn's or fastconv's). Modules
that call layers in their own ``forward`` are not looked into: their order of calls is not known
from their children.

The chain becomes one :class:`Conv2dReLU` at the conv's position, and the ReLU (and pool) positions
hold ``nn.Identity``, so state_dict keys, the Parameter objects and train/eval mode stay the same.
Forward of Conv2d -> ReLU: ``torch.ops.fastconv.conv2d_relu`` adds the bias and applies ReLU in the
CPU kernel's epilogue (float32 on AVX-512; other CPU paths run conv2d then ReLU) and, on CUDA, in the
bias/layout kernel (no launch of its own where the conv uses that kernel: 2+ images, not 1x1);
backward (csrc/autograd.cpp) masks grad_output with ``output > 0`` (ReLU's own backward kernel) and
calls the conv backward op. Conv2d -> ReLU -> MaxPool2d runs as conv2d -> max-pool -> ReLU: the two
commute exactly (the pooled maximum of ReLU'd values is the ReLU of the pooled maximum, bit for bit),
so ReLU and its backward mask touch the pooled tensor, a quarter of the conv output for 2x2 pools
(MNIST CNN training step: measured in the README). The pool is not fused into the conv's tile.
"""
import torch
from torch import nn

from . import transforms
from ._ops import _output_like, conv_out_size
from .modules import Conv2d, MaxPool2d

__all__ = ["Conv2dReLU", "fuse"]

ops = torch.ops.fastconv


@torch.library.register_fake("fastconv::conv2d_relu")
def _conv2d_relu_fake(input, weight, bias, stride, padding, dilation, groups):
    torch._check(input.dim() == 4, lambda: f"fastconv.conv2d_relu: expected a 4-D input, got {input.dim()}-D")
    oh = conv_out_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    ow = conv_out_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return _output_like(input, (input.shape[0], weight.shape[0], oh, ow), weight=weight)


class Conv2dReLU(Conv2d):
    """A Conv2d followed by ReLU (and optionally a max-pool), computed as one fused op.

    Holds the conv's ``weight``/``bias``; ``pool`` is ``None`` or the max-pool module that follows.
    """

    def __init__(self, *args, pool=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = pool

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() == 3:
            return self._fused_forward(input.unsqueeze(0)).squeeze(0)
        return self._fused_forward(input)

    def _fused_forward(self, input: torch.Tensor) -> torch.Tensor:
        # (self._conv_forward: Conv2d's forward; TorchScript compiles no super())
        if self.pool is not None:
            # max-pooling and ReLU commute exactly (relu(max(a, b)) == max(relu(a), relu(b)) in floating
            # point, NaN and the pool's -inf padding included), so ReLU runs on the pooled tensor: a
            # quarter of the elements for 2x2 pools, in the forward pass and in ReLU's backward mask
            return torch.relu(self.pool(self._conv_forward(input, self.weight, self.bias)))
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return torch.relu(self._conv_forward(input, self.weight, self.bias))
        if not torch.jit.is_scripting():  # (a branch TorchScript does not compile)
            if transforms.active():  # torch.func (fastconv/transforms.py)
                return transforms.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                         self.groups, relu=True)
        # autocast is the op's own (fastconv/_ops.py), so meta tensors pass too
        return ops.conv2d_relu(input.contiguous(memory_format=torch.contiguous_format), self.weight, self.bias,
                               self.stride, self.padding, self.dilation, self.groups)


def _fused_from(conv, pool):
    if pool is not None and type(pool) is nn.MaxPool2d:
        new_pool = MaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                             return_indices=pool.return_indices, ceil_mode=pool.ceil_mode)
        new_pool.train(pool.training)
        pool = new_pool
    new = Conv2dReLU(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                     padding_mode=conv.padding_mode, device="meta", dtype=conv.weight.dtype, pool=pool)
    new.weight = conv.weight  # the same Parameter objects: optimizers and state_dicts stay valid
    new.bias = conv.bias
    new.train(conv.training)
    return new


def _is_conv(m):
    return type(m) in (nn.Conv2d, Conv2d) and m.padding_mode == "zeros"


def fuse(model):
    """Fuses Conv2d -> ReLU [-> MaxPool2d] inside every nn.Sequential of ``model`` (in place;
    returns the model). See the module docstring for exactly what is matched."""
    for child in list(model.children()):
        fuse(child)
    if isinstance(model, nn.Sequential):
        mods = list(model)
        i = 0
        while i < len(mods):
            if _is_conv(mods[i]) and i + 1 < len(mods) and type(mods[i + 1]) is nn.ReLU:
                pool = None
                if i + 2 < len(mods) and type(mods[i + 2]) in (nn.MaxPool2d, MaxPool2d) and not mods[i + 2].return_indices:
                    pool = mods[i + 2]
                model[i] = _fused_from(mods[i], pool)
                model[i + 1] = nn.Identity()
                if pool is not None:
                    model[i + 2] = nn.Identity()
                i += 3 if pool is not None else 2
            else:
                i += 1
    return model
