"""torch.jit.script of the modules and of the models that use them: the scripted module runs the same
registered ops as the eager one (fastconv/modules.py's scripted paths), so results, strides and
gradients are the same bits; a scripted model saves and loads."""
import io
import warnings

import pytest
import torch

import fastconv
from fastconv.models import MODELS, build_model


def script(m):
    with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit (FutureWarning); it still works
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(m)


def save_and_load(s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        buf = io.BytesIO()
        torch.jit.save(s, buf)
        buf.seek(0)
        return torch.jit.load(buf)


MODULES = {
    "conv": lambda: fastconv.Conv2d(4, 6, 3, padding=1),
    "conv-strided-nobias": lambda: fastconv.Conv2d(4, 6, (3, 2), stride=(2, 1), bias=False),
    "conv-same-dilated": lambda: fastconv.Conv2d(4, 6, (3, 4), padding="same", dilation=2),
    "conv-valid-groups": lambda: fastconv.Conv2d(4, 6, 3, padding="valid", groups=2),
    "conv-reflect": lambda: fastconv.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "conv-circular": lambda: fastconv.Conv2d(4, 6, 3, padding=(2, 1), padding_mode="circular"),
    "pool": lambda: fastconv.MaxPool2d(2),
    "pool-ceil-padded-dilated": lambda: fastconv.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True),
    "pool-indices": lambda: fastconv.MaxPool2d((2, 3), return_indices=True),
    "fused-relu": lambda: fastconv.Conv2dReLU(4, 6, 3, padding=1),
    "fused-relu-same": lambda: fastconv.Conv2dReLU(4, 6, 4, padding="same"),
    "fused-relu-pool": lambda: fastconv.Conv2dReLU(4, 6, 3, padding=1, pool=fastconv.MaxPool2d(2)),
}


def as_tuple(y):
    return (y,) if isinstance(y, torch.Tensor) else tuple(y)


def inputs():
    x = torch.randn(2, 4, 9, 10)
    return {"batched": x, "unbatched": torch.randn(4, 9, 10), "channels_last": x.contiguous(memory_format=torch.channels_last)}


@pytest.mark.parametrize("name", list(MODULES))
def test_scripted_module_is_the_eager_module(name):
    torch.manual_seed(0)
    m = MODULES[name]()
    s = script(m)
    loaded = save_and_load(s)
    for kind, x in inputs().items():
        want = as_tuple(m(x))
        for got in (as_tuple(s(x)), as_tuple(loaded(x))):
            assert len(got) == len(want), (name, kind)
            for w, g in zip(want, got):
                assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride(), (name, kind)
                assert torch.equal(g, w), (name, kind)


@pytest.mark.parametrize("name", ["conv", "conv-same-dilated", "conv-reflect", "pool-ceil-padded-dilated", "fused-relu-pool"])
def test_scripted_module_gradients_are_the_eager_ones(name):
    torch.manual_seed(1)
    m = MODULES[name]().double()
    s = script(m)
    x = torch.randn(2, 4, 9, 10, dtype=torch.double, requires_grad=True)
    params = list(m.parameters())
    go = torch.randn_like(m(x))
    want = torch.autograd.grad(m(x), [x] + params, go)
    got = torch.autograd.grad(s(x), [x] + params, go)
    for w, g in zip(want, got):
        assert torch.equal(g, w)
    # and the eager gradient is torch's (the scripted path calls the same op)
    ref = {"conv": torch.nn.Conv2d, "conv-same-dilated": torch.nn.Conv2d, "conv-reflect": torch.nn.Conv2d}.get(name)
    if ref is not None:
        r = ref(4, 6, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                padding_mode=m.padding_mode).double()
        r.load_state_dict(m.state_dict())
        expect = torch.autograd.grad(r(x), [x] + list(r.parameters()), go)
        for e, g in zip(expect, got):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(MODELS))
def test_scripted_model_is_the_eager_model(name):
    torch.manual_seed(0)
    kwargs = {"in_channels": 3} if name == "alexnet" else {}
    size = 64 if name == "alexnet" else 28
    m = build_model(name, "fastconv", **kwargs).eval()
    x = torch.randn(2, kwargs.get("in_channels", 1), size, size)
    s = script(m)
    assert torch.equal(s(x), m(x))
    f = script(fastconv.fuse(build_model(name, "fastconv", **kwargs).eval()))
    f.load_state_dict(m.state_dict())
    torch.testing.assert_close(f(x), m(x), rtol=1e-5, atol=1e-5)  # (fused: bias+ReLU in the epilogue)


def test_scripted_alexnet_rejects_small_inputs_with_the_eager_message():
    m = build_model("alexnet", "fastconv", in_channels=3).eval()
    s = script(m)
    x = torch.randn(1, 3, 40, 40)
    with pytest.raises(ValueError, match=r"at least 63x63 .* got \(40, 40\)") as eager:
        m(x)
    with pytest.raises(Exception, match=r"at least 63x63 .* got \(40, 40\)") as scripted:
        s(x)
    assert "resize=63" in str(eager.value) and "resize=63" in str(scripted.value)
