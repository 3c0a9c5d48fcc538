"""The ops' autograd for ``torch.func`` transforms: ``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``,
``hessian``, ``vmap`` of any of them (per-sample gradients), gradients of gradients, and forward-mode
AD with dual tensors (``torch.autograd.forward_ad``).

The ops' own autograd is C++ (csrc/autograd.cpp: a Python autograd would cost every call
microseconds), and functorch cannot transform a C++ ``torch::autograd::Function``. While a transform
is active, ``fastconv.functional`` and the modules call the ops through the Python
``autograd.Function``\\ s below instead: the same formulas over the same registered ops, each backward
written with these Functions again, so gradients of any order work, as in csrc/autograd.cpp.
``generate_vmap_rule``: under ``vmap`` the ops run once per sample (functorch's fallback for ops
without a batching rule). Outside transforms nothing here runs.
"""
import torch
from torch.autograd import forward_ad as _forward_ad

ops = torch.ops.fastconv

__all__ = ["active", "conv2d", "max_pool2d"]


_functorch_active = torch._C._are_functorch_transforms_active


def active():
    """Whether the calls below must be used: a torch.func transform is active, or a forward-mode AD level
    is open (``torch.autograd.forward_ad.dual_level``: dual tensors need a jvp, which a C++
    ``torch::autograd::Function`` cannot have). Checked on every call of the functional API (about 90 ns)."""
    return _functorch_active() or _forward_ad._current_level >= 0


def _given(t):
    """A gradient that is there: unused outputs' gradients arrive as None or the op's empty placeholder."""
    return t is not None and t.numel() > 0


class _Conv2d(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, geometry, relu):
        op = ops.conv2d_relu if relu else ops.conv2d
        return op(input, weight, bias, *geometry.args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, geometry, relu = inputs
        ctx.save_for_backward(input, weight, output if relu else None)
        ctx.save_for_forward(input, weight, output if relu else None)
        ctx.geometry, ctx.has_bias, ctx.relu, ctx.out_shape = geometry, bias is not None, relu, output.shape

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, *_):
        # bilinear in (input, weight), plus the bias; ReLU's derivative: the tangent where the output is positive
        input, weight, output = ctx.saved_tensors
        terms = []
        if d_input is not None:
            terms.append(_Conv2d.apply(d_input, weight, None, ctx.geometry, False))
        if d_weight is not None:
            terms.append(_Conv2d.apply(input, d_weight, None, ctx.geometry, False))
        if d_bias is not None:
            terms.append(d_bias.view(1, -1, 1, 1).expand(ctx.out_shape))
        tangent = sum(terms[1:], terms[0])
        return torch.where(output > 0, tangent, torch.zeros_like(tangent)) if ctx.relu else tangent

    @staticmethod
    def backward(ctx, grad):
        input, weight, output = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        if ctx.relu:  # ReLU's backward first: the gradient where the output is positive
            grad = torch.where(output > 0, grad, torch.zeros_like(grad))
        gi, gw, gb = _Conv2dBackward.apply(grad, input, weight, ctx.geometry, _Args(*mask))
        return gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None


class _Conv2dBackward(torch.autograd.Function):
    """_conv2d_backward: grad_input, grad_weight, grad_bias are bilinear in (grad_output, weight) and
    (grad_output, input); each term of its backward is one of the partial derivatives."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, input, weight, geometry, mask):
        return ops._conv2d_backward(grad_output, input, weight, *geometry.args, list(mask.args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, weight, geometry, mask = inputs
        ctx.save_for_backward(grad_output, input, weight)
        ctx.save_for_forward(grad_output, input, weight)
        ctx.geometry, ctx.mask = geometry, mask.args

    @staticmethod
    def jvp(ctx, d_go, d_input, d_weight, *_):
        # grad_input is bilinear in (grad_output, weight), grad_weight in (grad_output, input), grad_bias linear
        go, input, weight = ctx.saved_tensors
        out = []
        for i, (other, d_other) in enumerate(((weight, d_weight), (input, d_input), (None, None))):
            if not ctx.mask[i]:
                out.append(torch.empty(0, dtype=go.dtype, device=go.device))
                continue
            mask = _Args(*(j == i for j in range(3)))
            terms = []
            if d_go is not None:
                terms.append(_Conv2dBackward.apply(d_go, input, weight, ctx.geometry, mask)[i])
            if d_other is not None:
                args = (go, input, d_other) if i == 0 else (go, d_other, weight)
                terms.append(_Conv2dBackward.apply(*args, ctx.geometry, mask)[i])
            out.append(sum(terms[1:], terms[0]) if terms else None)
        return tuple(out)

    @staticmethod
    def backward(ctx, ggi, ggw, ggb):
        go, input, weight = ctx.saved_tensors
        geometry = ctx.geometry
        has_gi, has_gw, has_gb = (m and _given(g) for m, g in zip(ctx.mask, (ggi, ggw, ggb)))
        g_go = g_input = g_weight = None
        if ctx.needs_input_grad[0]:
            g_go = torch.zeros_like(go)
            if has_gi:
                g_go = g_go + _Conv2d.apply(ggi, weight, None, geometry, False)
            if has_gw:
                g_go = g_go + _Conv2d.apply(input, ggw, None, geometry, False)
            if has_gb:
                g_go = g_go + ggb.view(1, -1, 1, 1)
        if ctx.needs_input_grad[1] and has_gw:
            g_input = _Conv2dBackward.apply(go, input, ggw, geometry, _Args(True, False, False))[0]
        if ctx.needs_input_grad[2] and has_gi:
            g_weight = _Conv2dBackward.apply(go, ggi, weight, geometry, _Args(False, True, False))[1]
        return g_go, g_input, g_weight, None, None


def _gather(t, indices):
    """t at the positions `indices` (flat within each plane) holds: shaped as `indices`."""
    return t.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)


class _MaxPool2d(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, geometry):
        return ops.max_pool2d(input, *geometry.args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, geometry = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(input, output[1])
        ctx.save_for_forward(output[1])
        ctx.geometry = geometry

    @staticmethod
    def jvp(ctx, d_input, *_):
        # the tangent at each window's argmax
        (indices,) = ctx.saved_tensors
        return _gather(d_input, indices), None

    @staticmethod
    def backward(ctx, grad, _grad_indices):
        input, indices = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or grad is None:
            return None, None
        return _MaxPool2dBackward.apply(grad.contiguous(), input, indices, ctx.geometry), None


class _MaxPool2dBackward(torch.autograd.Function):
    """_max_pool2d_backward scatters grad_output to the argmax positions; its adjoint gathers from them."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, input, indices, geometry):
        return ops._max_pool2d_backward(grad_output, input, indices, *geometry.args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])
        ctx.save_for_forward(inputs[1], inputs[2])
        ctx.geometry = inputs[3]

    @staticmethod
    def jvp(ctx, d_go, *_):
        # linear in grad_output
        input, indices = ctx.saved_tensors
        return _MaxPool2dBackward.apply(d_go.contiguous(), input, indices, ctx.geometry)

    @staticmethod
    def backward(ctx, gg):
        (indices,) = ctx.saved_tensors
        g = None
        if ctx.needs_input_grad[0] and _given(gg):
            g = _gather(gg, indices)
        return g, None, None, None


class _Args:
    """Non-tensor arguments as one object: torch.func flattens lists and tuples among a Function's
    inputs into leaves of their own, which its forward-mode rules then miscount."""

    __slots__ = ("args",)

    def __init__(self, *args):
        self.args = args


def conv2d(input, weight, bias, stride, padding, dilation, groups, relu=False):
    """torch.ops.fastconv.conv2d (conv2d_relu with relu), transformable."""
    geometry = _Args(list(stride), list(padding), list(dilation), int(groups))
    return _Conv2d.apply(input, weight, bias, geometry, relu)


def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    """torch.ops.fastconv.max_pool2d (output, indices), transformable."""
    geometry = _Args(list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode))
    return _MaxPool2d.apply(input, geometry)
