"""fastconv.fuse(): same outputs and gradients as the unfused model (float64 and float32), same
state_dict keys and Parameter objects, train/eval kept, torch.compile traces it."""
import pytest
import torch
from torch import nn

import fastconv
from fastconv.models import build_model


def _twin(model_fn):
    torch.manual_seed(0)
    a = model_fn()
    b = model_fn()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["mnist_cnn", "lenet", "simple_convnet", "configurable_cnn"])
def test_fused_model_matches_unfused(name, dtype, poison):
    ref, fused = _twin(lambda: build_model(name).to(dtype))
    params_before = [id(p) for p in fused.parameters()]
    keys_before = list(fused.state_dict().keys())
    fastconv.fuse(fused)
    assert any(isinstance(m, fastconv.Conv2dReLU) for m in fused.modules())
    assert [id(p) for p in fused.parameters()] == params_before
    assert list(fused.state_dict().keys()) == keys_before
    ref.eval()
    fused.eval()
    x = torch.randn(5, 1, 28, 28, dtype=dtype)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fused(xf)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(yf, yr, **tol)
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, **tol)
    for (n, pr), pf in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, **tol, msg=lambda m: f"{n}: {m}")


def test_what_is_matched_and_modes_kept():
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3), nn.Tanh(),                    # not ReLU: left alone
                        nn.Conv2d(8, 4, 1), nn.ReLU(),                    # conv-relu without a pool
                        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU()))
    seq.eval()
    fastconv.fuse(seq)
    assert isinstance(seq[0], fastconv.Conv2dReLU) and isinstance(seq[0].pool, fastconv.MaxPool2d)
    assert isinstance(seq[1], nn.Identity) and isinstance(seq[2], nn.Identity)
    assert type(seq[3]) is nn.Conv2d and isinstance(seq[4], nn.Tanh)
    assert isinstance(seq[5], fastconv.Conv2dReLU) and seq[5].pool is None
    assert type(seq[7][0]) is nn.Conv2d  # reflect padding is not fused
    assert not seq[0].training and not seq[5].training


def test_relu_mask_gradient_on_the_op():
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: torch.ops.fastconv.conv2d_relu(x, w, b, [1, 1], [1, 1], [1, 1], 1)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True)
    torch.library.opcheck(torch.ops.fastconv.conv2d_relu, (x.detach(), w.detach(), b.detach(), [1, 1], [1, 1], [1, 1], 1))


def test_fused_model_compiles_fullgraph():
    torch.manual_seed(0)
    model = fastconv.fuse(build_model("mnist_cnn"))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("algorithm", ["gemm", "winograd"])
def test_conv2d_relu_keeps_nan_like_relu(algorithm):
    # the ReLU in the CPU kernels' epilogue (GEMM and Winograd) lets NaN through, as torch.relu does
    x = torch.randn(2, 16, 9, 9)
    x[0, 3, 4, 4] = float("nan")
    w = torch.randn(24, 16, 3, 3)
    b = torch.randn(24)
    with fastconv.conv_algorithm(algorithm):
        fused = torch.ops.fastconv.conv2d_relu(x, w, b, [1, 1], [1, 1], [1, 1], 1)
        plain = torch.ops.fastconv.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1)
    assert torch.isnan(fused).any()
    torch.testing.assert_close(fused, plain.relu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("geometry", [
    ((2, 3, 35, 90), (40, 3, 11, 11), 4, 2),  # narrow-direct, weights past 64 KiB: a row buffer, 21-pixel rows
    ((2, 3, 30, 37), (50, 3, 7, 7), 2, 3),    # narrow-direct, weights in one block
])
def test_conv2d_relu_is_relu_of_conv2d_on_the_narrow_kernel(geometry):
    # the narrow-direct forward applies bias and ReLU as it stores: bitwise the unfused op then relu
    xs, ws, s, p = geometry
    x, w, b = torch.randn(xs), torch.randn(ws), torch.randn(ws[0])
    args = ([s, s], [p, p], [1, 1], 1)
    if fastconv.conv2d_algorithm(x, w, s, p).split("/")[0] != "narrow-direct":
        pytest.skip("no AVX-512 narrow-direct kernel on this CPU")
    fused = torch.ops.fastconv.conv2d_relu(x, w, b, *args)
    torch.testing.assert_close(fused, torch.ops.fastconv.conv2d(x, w, b, *args).relu(), rtol=0, atol=0)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), s, p).relu()
    torch.testing.assert_close(fused.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)])
def test_conv_relu_pool_is_bitwise_the_unfused_chain(pool, poison):
    # the fused chain runs conv -> pool -> ReLU (they commute): exactly the unfused conv -> ReLU -> pool,
    # including windows with no positive value (negative bias) and NaN
    torch.manual_seed(0)
    ref = nn.Sequential(fastconv.Conv2d(3, 8, 3, padding=1), nn.ReLU(), pool)
    with torch.no_grad():
        ref[0].bias.copy_(torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.2, 0.5, 1.0, 3.0]))
    fused = fastconv.fuse(nn.Sequential(*ref))
    assert isinstance(fused[0], fastconv.Conv2dReLU) and fused[0].pool is not None
    x = torch.randn(4, 3, 11, 13)
    x[1, 0, 3, 4] = float("nan")
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr = ref(xr)
    yf = fused(xf)
    assert torch.equal(yr.isnan(), yf.isnan()) and torch.equal(yr.nan_to_num(), yf.nan_to_num())
    assert (yr == 0).any() and (yr > 0).any()
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    assert torch.equal(xr.grad.nan_to_num(), xf.grad.nan_to_num())
