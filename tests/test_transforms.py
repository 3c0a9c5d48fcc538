"""torch.func transforms over fastconv (fastconv/transforms.py): grad, vjp, jvp, jacrev, jacfwd, hessian,
vmap of grad (per-sample gradients) and gradients of gradients, each against the same transform of
torch.nn.functional in float64."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fastconv
from fastconv import functional as FC
from fastconv.models import build_model

D = torch.double

# (input shape, weight shape, stride, padding, dilation, groups, bias): stride, dilation, groups,
# padding on each side, no bias
CONVS = [
    ((3, 2, 6, 7), (4, 2, 3, 3), 1, 1, 1, 1, True),
    ((2, 4, 7, 6), (6, 2, 3, 2), (2, 1), (1, 0), (1, 2), 2, False),
    ((2, 3, 5, 5), (5, 3, 1, 1), 1, 0, 1, 1, True),
]


def close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        a, b = tuple(a.values()), tuple(b[k] for k in a)
    a = (a,) if isinstance(a, torch.Tensor) else tuple(a)
    b = (b,) if isinstance(b, torch.Tensor) else tuple(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


@pytest.fixture(autouse=True)
def _quiet_vmap_fallback():
    with warnings.catch_warnings():  # vmap runs the ops once per sample (no batching rule) and says so
        warnings.simplefilter("ignore", UserWarning)
        yield


def conv_case(case, relu=False):
    xs, ws, s, p, d, g, has_bias = case
    torch.manual_seed(0)
    x, w = torch.randn(xs, dtype=D), torch.randn(ws, dtype=D)
    b = torch.randn(ws[0], dtype=D) if has_bias else None

    m = fastconv.Conv2dReLU(ws[1] * g, ws[0], ws[2:], stride=s, padding=p, dilation=d, groups=g, bias=has_bias)

    def fc(x, w, b):
        if relu:  # the fused module's op, conv2d_relu
            return functional_call(m, {"weight": w} | ({"bias": b} if has_bias else {}), (x,))
        return FC.conv2d(x, w, b, s, p, d, g)

    def th(x, w, b):
        y = F.conv2d(x, w, b, s, p, d, g)
        return torch.relu(y) if relu else y

    return x, w, b, fc, th


TRANSFORMS = {
    "grad": lambda f, x, w, b: grad(lambda w: f(x, w, b).pow(2).sum())(w),
    "grad-input": lambda f, x, w, b: grad(lambda x: f(x, w, b).sin().sum())(x),
    "vjp": lambda f, x, w, b: vjp(lambda x, w: f(x, w, b), x, w)[1](torch.cos(f(x, w, b).detach())),
    "jvp": lambda f, x, w, b: jvp(lambda x, w: f(x, w, b), (x, w), (torch.sin(x), torch.cos(w))),
    "jacrev": lambda f, x, w, b: jacrev(lambda w: f(x[:1], w, b).sum((0, 2)))(w),
    "jacfwd": lambda f, x, w, b: jacfwd(lambda x: f(x, w, b).sum((1, 2, 3)))(x[:1]),
    "per-sample-grad": lambda f, x, w, b: vmap(grad(lambda w, xi: f(xi[None], w, b).pow(2).sum()),
                                               in_dims=(None, 0))(w, x),
    "grad-of-grad": lambda f, x, w, b: grad(lambda x: grad(lambda w2: f(x, w2, b).pow(3).sum())(w).pow(2).sum())(x),
    "hessian": lambda f, x, w, b: hessian(lambda w: f(x[:1], w, b).pow(3).sum())(w),
}


@pytest.mark.parametrize("case", CONVS, ids=["3x3", "strided-dilated-groups-nobias", "1x1"])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_conv2d_under_torch_func(case, name):
    x, w, b, fc, th = conv_case(case)
    close(TRANSFORMS[name](fc, x, w, b), TRANSFORMS[name](th, x, w, b))


@pytest.mark.parametrize("name", ["grad", "grad-input", "vjp", "jvp", "per-sample-grad", "grad-of-grad", "hessian"])
def test_fused_conv_relu_under_torch_func(name):
    x, w, b, fc, th = conv_case(CONVS[0], relu=True)
    close(TRANSFORMS[name](fc, x, w, b), TRANSFORMS[name](th, x, w, b))


POOL_TRANSFORMS = {
    "grad": lambda f, x: grad(lambda x: f(x).pow(2).sum())(x),
    "jvp": lambda f, x: jvp(f, (x,), (torch.sin(x),)),
    "per-sample-grad": lambda f, x: vmap(grad(lambda xi: f(xi[None]).pow(2).sum()))(x),
    "grad-of-grad": lambda f, x: grad(lambda x: grad(lambda y: f(y).pow(3).sum())(x).pow(2).sum())(x),
    "hessian": lambda f, x: hessian(lambda y: f(y).pow(3).sum())(x[:1, :1]),
}


@pytest.mark.parametrize("name", list(POOL_TRANSFORMS))
def test_max_pool2d_under_torch_func(name):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 7, 6, dtype=D)
    args = (3, 2, 1, 1, True)  # kernel, stride, padding, dilation, ceil_mode
    close(POOL_TRANSFORMS[name](lambda y: FC.max_pool2d(y, *args), x),
          POOL_TRANSFORMS[name](lambda y: F.max_pool2d(y, *args), x))


@pytest.mark.parametrize("fused", [False, True])
def test_per_sample_gradients_of_a_model(fused):
    """The torch.func recipe for per-sample gradients (functional_call + vmap(grad)) on the MNIST CNN."""
    torch.manual_seed(0)
    mf = build_model("mnist_cnn", "fastconv").to(D).eval()
    mt = build_model("mnist_cnn", "torch").to(D).eval()
    mt.load_state_dict(mf.state_dict())
    if fused:
        mf = fastconv.fuse(mf)
    x, y = torch.randn(4, 1, 28, 28, dtype=D), torch.randint(0, 10, (4,))

    def per_sample(m):
        params = {k: v.detach() for k, v in m.named_parameters()}
        loss = lambda p, xi, yi: F.cross_entropy(functional_call(m, p, (xi[None],)), yi[None])  # noqa: E731
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    close(per_sample(mf), per_sample(mt))


def test_outside_transforms_the_ops_autograd_runs():
    """Without a transform the C++ autograd of the op runs (not the Python Functions)."""
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    y = FC.conv2d(x, torch.randn(3, 2, 3, 3))
    assert "fastconv" not in type(y.grad_fn).__module__
    assert not fastconv.transforms.active()
    assert grad(lambda t: (fastconv.transforms.active() * t).sum())(torch.ones(1)).item() == 1.0


@pytest.mark.parametrize("relu", [False, True])
def test_forward_mode_in_the_bias_alone(relu):
    """A tangent in the bias only: the output's tangent is the bias tangent broadcast over the output
    (masked by ReLU's derivative in the fused op)."""
    x, w, b, fc, th = conv_case(CONVS[0], relu=relu)
    tangent = torch.cos(b)
    close(jvp(lambda b: fc(x, w, b), (b,), (tangent,)), jvp(lambda b: th(x, w, b), (b,), (tangent,)))
    close(jacfwd(lambda b: fc(x[:1], w, b))(b), jacfwd(lambda b: th(x[:1], w, b))(b))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", CONVS, ids=["plain", "strided-grouped", "pointwise"])
def test_forward_mode_ad_with_dual_tensors(case, relu):
    """torch.autograd.forward_ad (dual tensors, no torch.func): the ops take the Python Functions' jvp,
    tangents in every input at once, against torch's forward-mode AD of torch.nn.functional; the pool
    after the conv, and the module path."""
    import torch.autograd.forward_ad as fwAD

    x, w, b, fc, th = conv_case(case, relu=relu)
    tangents = (torch.sin(x), torch.cos(w), torch.sin(b) if b is not None else None)
    results = []
    for f in (fc, th):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) if p is not None else None for p, t in zip((x, w, b), tangents)]
            y = f(*duals)
            pooled = (FC.max_pool2d if f is fc else F.max_pool2d)(y, 2, 1)
            results.append(tuple(t for d in (y, pooled) for t in fwAD.unpack_dual(d)))
        assert not fastconv.transforms.active()
    close(results[0], results[1])
    # the module's forward takes the same route
    conv = fastconv.Conv2d(x.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False).double()
    ref = torch.nn.Conv2d(x.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False).double()
    ref.weight.data.copy_(conv.weight.data)
    outs = []
    for m in (conv, ref):
        with fwAD.dual_level():
            outs.append(fwAD.unpack_dual(m(fwAD.make_dual(x, tangents[0]))).tangent)
    close(outs[0], outs[1])
