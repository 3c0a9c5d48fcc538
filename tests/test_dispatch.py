"""What the dispatcher gives every caller of the ops: autocast, meta/FakeTensor inputs, one autograd path."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import fastconv
import fastconv.functional as FC

ops = torch.ops.fastconv
ARGS = ([1, 1], [1, 1], [1, 1], 1)  # stride, padding, dilation, groups


# ---------------------------------------------------------------------------------------------
# autocast on the op itself (AutocastCPU), not only in fastconv.functional
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_registered_op_runs_in_the_autocast_dtype(dtype):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    with torch.autocast("cpu", dtype=dtype):
        out = ops.conv2d(x, w, b, *ARGS)
        expected = F.conv2d(x, w, b, 1, 1)
    assert out.dtype == expected.dtype == dtype
    # the op computed on the cast inputs: equal to running it on them outside autocast
    torch.testing.assert_close(out, ops.conv2d(x.to(dtype), w.to(dtype), b.to(dtype), *ARGS), rtol=0, atol=0)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=5e-2)
    # autocast off again: float32 in, float32 out
    assert ops.conv2d(x, w, b, *ARGS).dtype == torch.float32


def test_fused_conv2d_relu_op_runs_in_the_autocast_dtype():
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.conv2d_relu(x, w, b, *ARGS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ops.conv2d_relu(x.bfloat16(), w.bfloat16(), b.bfloat16(), *ARGS), rtol=0, atol=0)


def test_fused_model_on_meta_tensors():
    model = fastconv.fuse(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                              torch.nn.MaxPool2d(2))).to("meta")
    assert isinstance(model[0], fastconv.Conv2dReLU)
    out = model(torch.empty(2, 1, 10, 10, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 4, 5, 5)


def test_autocast_leaves_float64_alone_as_torch_does():
    x, w = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.conv2d(x, w, None, *ARGS)
        expected = F.conv2d(x, w, None, 1, 1)
    assert out.dtype == expected.dtype == torch.float64


def test_autocast_gradients_reach_float32_parameters():
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(3, 4, 3, padding=1)
    mod = fastconv.Conv2d(3, 4, 3, padding=1)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = mod(x), ref(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    out.float().sum().backward()
    expected.float().sum().backward()
    assert mod.weight.grad.dtype == mod.bias.grad.dtype == torch.float32
    scale = ref.weight.grad.abs().max().item()
    torch.testing.assert_close(mod.weight.grad, ref.weight.grad, rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(mod.bias.grad, ref.bias.grad, rtol=2e-2, atol=2e-2 * ref.bias.grad.abs().max().item())


def test_autocast_under_torch_compile():
    torch.manual_seed(0)
    conv = fastconv.Conv2d(3, 4, 3, padding=1)
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = compiled(x), conv(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_max_pool2d_is_not_cast_by_autocast():
    x = torch.randn(1, 2, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, idx = ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert out.dtype == F.max_pool2d(x, 2).dtype == torch.float32 and idx.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# meta tensors and FakeTensors through the functions and the modules
# ---------------------------------------------------------------------------------------------
def test_modules_on_meta_tensors():
    conv = fastconv.Conv2d(3, 8, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), device="meta")
    pool = fastconv.MaxPool2d(3, 2, 1, ceil_mode=True, return_indices=True)
    x = torch.empty(5, 3, 17, 11, device="meta")
    y = conv(x)
    ref = torch.nn.Conv2d(3, 8, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), device="meta")(x)
    assert y.device.type == "meta" and y.shape == ref.shape == (5, 8, 9, 11)
    out, idx = pool(y)
    ref_out, ref_idx = torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True, return_indices=True)(ref)
    assert out.device.type == idx.device.type == "meta"
    assert out.shape == ref_out.shape and idx.shape == ref_idx.shape and idx.dtype == torch.int64
    # backward on meta tensors too (the weight requires grad)
    out.sum().backward()
    assert conv.weight.grad.device.type == "meta" and conv.weight.grad.shape == conv.weight.shape


def test_functional_on_meta_tensors():
    x = torch.empty(3, 9, 8, device="meta")  # unbatched
    w = torch.empty(4, 3, 2, 4, device="meta")  # even kernel: 'same' pads one side more
    out = FC.conv2d(x, w, None, padding="same")
    assert out.device.type == "meta" and out.shape == F.conv2d(x, w, None, padding="same").shape == (4, 9, 8)
    assert FC.max_pool2d(out, 2).shape == (4, 4, 4)
    assert ops.conv2d(x.unsqueeze(0), w, None, *ARGS).device.type == "meta"


def test_fake_tensors_through_the_modules():
    conv = fastconv.Conv2d(1, 4, 3, padding=1)
    pool = fastconv.MaxPool2d(2)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = pool(conv(torch.empty(2, 1, 28, 28)))
    assert isinstance(y, FakeTensor) and y.shape == (2, 4, 14, 14)


def test_meta_autocast_does_not_raise():
    # fastconv.functional asked torch.is_autocast_enabled("meta") before: "unknown device type for autocast"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FC.conv2d(torch.empty(1, 2, 5, 5, device="meta"), torch.empty(3, 2, 3, 3, device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 3, 3, 3)


# ---------------------------------------------------------------------------------------------
# one autograd path: the op's registered autograd, for the functions, the modules and the ops
# ---------------------------------------------------------------------------------------------
def test_functional_and_op_share_one_autograd_node():
    x, w, b = (torch.randn(*s, requires_grad=True) for s in ((1, 2, 6, 6), (3, 2, 3, 3), (3,)))
    node = type(ops.conv2d(x, w, b, *ARGS).grad_fn)
    assert type(FC.conv2d(x, w, b, 1, 1).grad_fn) is node
    assert type(fastconv.Conv2dFunction.apply(x, w, b, (1, 1), (1, 1), (1, 1), 1).grad_fn) is node
    pool_node = type(ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)[0].grad_fn)
    assert type(FC.max_pool2d(x, 2).grad_fn) is pool_node
    # no input needs a gradient, or grad mode is off: no autograd node at all
    assert FC.conv2d(x.detach(), w.detach(), b.detach(), 1, 1).grad_fn is None
    with torch.no_grad():
        assert FC.conv2d(x, w, b, 1, 1).grad_fn is None and FC.max_pool2d(x, 2).grad_fn is None


def test_only_the_bias_needs_a_gradient():
    x, w = torch.randn(2, 2, 5, 5), torch.randn(3, 2, 3, 3)
    b = torch.randn(3, requires_grad=True)
    out = FC.conv2d(x, w, b)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(b.grad, torch.full((3,), 2.0 * 3 * 3))
