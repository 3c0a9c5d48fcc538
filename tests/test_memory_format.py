"""Memory formats of the ops' results: laid out as torch's, on every backend and in the fake kernels.

torch's conv2d gives channels_last results (output, grad_input, grad_weight) when the input's or the
weight's strides suggest channels_last (Tensor.suggest_memory_format: a channels_last tensor, a slice
of one, a tensor that is both layouts with channels_last strides), its max_pool2d when the input's do.
A model moved to channels_last and fed NCHW images thus runs channels_last from its first conv on.
Strides are compared with torch's float32 results (its CPU float64 path lays out some ambiguous
weight gradients differently from its float32 one); values against torch in float64.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastconv
import fastconv.functional as FF

from devices import cpu_emulated_and_cuda

CL = torch.channels_last


def _input(kind, device):
    """An input of the given layout kind; every kind's values are fresh random numbers."""
    if kind == "nchw":
        return torch.randn(2, 8, 9, 7, device=device)
    if kind == "channels_last":
        return torch.randn(2, 8, 9, 7, device=device).to(memory_format=CL)
    if kind == "channel_slice":  # a channels_last tensor's first channels (a split, as ShuffleNet's)
        return torch.randn(2, 16, 9, 7, device=device).to(memory_format=CL)[:, :8]
    if kind == "one_channel":  # both layouts, channels_last strides
        return torch.randn(2, 1, 9, 7, device=device).to(memory_format=CL)
    if kind == "one_pixel":  # both layouts, channels_last strides
        return torch.randn(2, 8, 1, 1, device=device).to(memory_format=CL)
    if kind == "permuted":  # not channels_last: H and W swapped
        return torch.randn(2, 8, 7, 9, device=device).transpose(2, 3)
    raise ValueError(kind)


INPUT_KINDS = ["nchw", "channels_last", "channel_slice", "one_channel", "one_pixel", "permuted"]
WEIGHT_KINDS = ["nchw", "channels_last", "channel_slice"]
CONV_CASES = list(itertools.product(INPUT_KINDS, WEIGHT_KINDS, [(16, 3, 1), (24, 1, 0), (40, 3, 2)]))


def _weight(kind, out_channels, in_channels, k, device):
    """A weight of the given layout kind (as _input's kinds), fresh random values."""
    if kind == "nchw":
        return torch.randn(out_channels, in_channels, k, k, device=device)
    if kind == "channels_last":
        return torch.randn(out_channels, in_channels, k, k, device=device).to(memory_format=CL)
    if kind == "channel_slice":  # a channels_last weight's first input channels: not contiguous either way
        return torch.randn(out_channels, 2 * in_channels, k, k, device=device).to(memory_format=CL)[:, :in_channels]
    raise ValueError(kind)


def _strides(*tensors):
    return [t.stride() for t in tensors]


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
@pytest.mark.parametrize("input_kind,weight_kind,layer", CONV_CASES, ids=lambda v: str(v))
@pytest.mark.usefixtures("poison")
def test_conv2d_results_laid_out_as_torch(device, input_kind, weight_kind, layer):
    out_channels, k, pad = layer
    x = _input(input_kind, device).requires_grad_()
    w = _weight(weight_kind, out_channels, x.shape[1], k, device).requires_grad_()
    b = torch.randn(out_channels, device=device, requires_grad=True)
    y = FF.conv2d(x, w, b, 1, pad)
    ref = F.conv2d(x, w, b, 1, pad)
    g = torch.randn_like(ref)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    rgx, rgw, _ = torch.autograd.grad(ref, (x, w, b), g)
    assert _strides(y, gx, gw) == _strides(ref, rgx, rgw)
    # values, against torch in float64
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref64 = F.conv2d(x64, w64, b64, 1, pad)
    expected = torch.autograd.grad(ref64, (x64, w64, b64), g.double())
    for got, want in zip((y, gx, gw, gb), (ref64, *expected)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
@pytest.mark.parametrize("input_kind", INPUT_KINDS)
@pytest.mark.usefixtures("poison")
def test_max_pool2d_results_laid_out_as_torch(device, input_kind):
    x = _input(input_kind, device).requires_grad_()
    size = min(x.shape[2], x.shape[3], 3)
    y, idx = FF.max_pool2d(x, size, 2 if size > 1 else 1, return_indices=True)
    ref, ridx = F.max_pool2d(x, size, 2 if size > 1 else 1, return_indices=True)
    g = torch.randn_like(ref)
    (gx,), (rgx,) = torch.autograd.grad(y, x, g), torch.autograd.grad(ref, x, g)
    assert _strides(y, idx, gx) == _strides(ref, ridx, rgx)
    assert torch.equal(y, ref) and torch.equal(idx, ridx) and torch.equal(gx, rgx)


@pytest.mark.parametrize("input_kind,weight_kind,layer", CONV_CASES, ids=lambda v: str(v))
def test_fake_kernels_lay_out_as_the_cpu_kernels(input_kind, weight_kind, layer):
    """The fake (meta) kernels, which torch.compile traces with, say the layouts the kernels give."""
    out_channels, k, pad = layer
    x = _input(input_kind, "cpu")
    w = _weight(weight_kind, out_channels, x.shape[1], k, "cpu")

    def meta(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    ops = torch.ops.fastconv
    args = ([1, 1], [pad, pad], [1, 1], 1)
    for op in (ops.conv2d, ops.conv2d_relu):
        y = op(x, w, None, *args)
        assert op(meta(x), meta(w), None, *args).stride() == y.stride()
    grads = ops._conv2d_backward(y, x, w, *args, [True, True, True])
    meta_grads = ops._conv2d_backward(meta(y), meta(x), meta(w), *args, [True, True, True])
    assert _strides(*meta_grads) == _strides(*grads)
    pool_args = ([1, 1], [1, 1], [0, 0], [1, 1], False)
    vals, idx = ops.max_pool2d(x, *pool_args)
    assert _strides(*ops.max_pool2d(meta(x), *pool_args)) == _strides(vals, idx)
    gi = ops._max_pool2d_backward(vals, x, idx, *pool_args)
    assert ops._max_pool2d_backward(meta(vals), meta(x), meta(idx), *pool_args).stride() == gi.stride()


def test_channels_last_model_on_nchw_images_runs_channels_last():
    """model.to(memory_format=torch.channels_last) fed NCHW images: channels_last from the first conv
    on, as the same torch model, with the same values."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(16, 32, 3, padding=1)).to(memory_format=CL)
    model = fastconv.convert(ref).to(memory_format=CL)
    x = torch.randn(2, 3, 12, 12)
    y, expected = model(x), ref(x)
    assert y.is_contiguous(memory_format=CL) and expected.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
