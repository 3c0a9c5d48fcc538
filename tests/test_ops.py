"""The registered ops: opcheck, CPU-only build messages, torch.compile with no graph break."""
import os

import pytest
import torch
from torch import nn

import fastconv

from devices import cpu_and_cuda

ops = torch.ops.fastconv


def _samples(device):
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    conv_args = ([2, 1], [1, 0], [1, 2], 2)
    out = ops.conv2d(x, w, b, *conv_args)
    go = torch.randn_like(out)
    xp = torch.randperm(2 * 3 * 9 * 9, dtype=torch.float64).view(2, 3, 9, 9).to(device).requires_grad_()
    pool_args = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    pout, pidx = ops.max_pool2d(xp, *pool_args)
    return [
        (ops.conv2d.default, (x, w, b, *conv_args)),
        (ops.conv2d.default, (x, w, None, *conv_args)),
        (ops._conv2d_backward.default, (go, x.detach(), w.detach(), *conv_args, [True, True, True])),
        (ops._conv2d_backward.default, (go, x.detach(), w.detach(), *conv_args, [False, True, False])),
        (ops.max_pool2d.default, (xp, *pool_args)),
        (ops._max_pool2d_backward.default, (torch.randn_like(pout), xp.detach(), pidx, *pool_args)),
    ]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    for op, args in _samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.skipif(os.environ.get("FASTCONV_FORCE_CUDA") != "1", reason="only when the build must have CUDA kernels")
def test_cuda_kernels_registered_for_every_op():
    # CI builds with FASTCONV_FORCE_CUDA=1 on a GPU-less machine: the kernels must be there anyway
    assert fastconv.cuda_version() is not None
    for name in ("conv2d", "_conv2d_backward", "max_pool2d", "_max_pool2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", "CPU"), name


def test_build_reports_cuda_consistently():
    built = fastconv.cuda_version()
    assert fastconv.has_cuda_kernels() == (built is not None)
    if built is not None:
        assert str(built[0]) == torch.version.cuda.split(".")[0]


@pytest.mark.skipif(fastconv.has_cuda_kernels(), reason="this build has CUDA kernels")
def test_cpu_only_build_explains_cuda_tensors():
    # the dispatcher routes CUDA tensors to fastconv's stand-in kernel, whatever their contents
    with pytest.raises(RuntimeError, match="no CUDA kernels.*pip install --no-build-isolation"):
        _call_cuda_stand_in()


def _call_cuda_stand_in():
    # no GPU here: call the CUDA kernel of the op directly through the dispatcher
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    x = torch.randn(1, 1, 3, 3)
    w = torch.randn(1, 1, 1, 1)
    ops.conv2d.default.redispatch(ks, x, w, None, [1, 1], [0, 0], [1, 1], 1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = fastconv.Conv2d(1, 4, 3, padding=1)
        self.pool = fastconv.MaxPool2d(2)
        self.conv2 = fastconv.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(x.flatten(1))


def test_torch_compile_fullgraph_training_step():
    torch.manual_seed(0)
    eager = Tiny()
    compiled_model = Tiny()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)  # raises on any graph break
    x = torch.randn(6, 1, 12, 12)
    y = torch.randint(0, 5, (6,))
    losses = []
    for model, fwd in ((eager, eager), (compiled_model, compiled)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()
        losses.append(loss.item())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_backward_ops_are_differentiable(device):
    # the backward ops' own autograd (csrc/autograd.cpp), called directly: gradcheck of every output
    # and mask, gradgradcheck (the convolution's third order)
    conv_args = ([2, 1], [1, 0], [1, 2], 2)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    go = torch.randn_like(ops.conv2d(x, w, None, *conv_args)).requires_grad_()
    for mask in ([True, True, True], [True, False, False], [False, True, False], [False, True, True]):
        def conv_backward(go, x, w, mask=mask):
            return tuple(g for g, m in zip(ops._conv2d_backward(go, x, w, *conv_args, mask), mask) if m)
        assert torch.autograd.gradcheck(conv_backward, (go, x, w))
    assert torch.autograd.gradgradcheck(
        lambda go, x, w: ops._conv2d_backward(go, x, w, *conv_args, [True, True, False])[:2], (go, x, w),
        fast_mode=True)
    xp = torch.randperm(2 * 3 * 9 * 9, dtype=torch.float64).view(2, 3, 9, 9).to(device)
    pool_args = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    _, idx = ops.max_pool2d(xp, *pool_args)
    pgo = torch.randn(idx.shape, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: ops._max_pool2d_backward(g, xp, idx, *pool_args), (pgo,))
    assert torch.autograd.gradgradcheck(lambda g: ops._max_pool2d_backward(g, xp, idx, *pool_args), (pgo,))


def test_graph_only_where_a_gradient_is_needed():
    # calls that need no gradient skip the autograd Function (no graph); the others build one
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = ops.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    assert y.grad_fn is not None
    go = torch.randn_like(y)
    with torch.no_grad():
        assert ops.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1).grad_fn is None
        assert ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)[0].grad_fn is None
    assert ops.conv2d(x.detach(), w.detach(), None, [1, 1], [1, 1], [1, 1], 1).grad_fn is None
    gi, gw, _ = ops._conv2d_backward(go, x.detach(), w.detach(), [1, 1], [1, 1], [1, 1], 1, [True, True, False])
    assert gi.grad_fn is None and gw.grad_fn is None
    torch.testing.assert_close((gi, gw), torch.autograd.grad(y, (x, w), go))
    gi2, _, _ = ops._conv2d_backward(go.requires_grad_(), x, w, [1, 1], [1, 1], [1, 1], 1, [True, False, False])
    assert gi2.grad_fn is not None
    torch.testing.assert_close(gi2, gi)


def test_forward_mode_ad_is_refused():
    # no jvp formulas: a dual input is an error, never a result whose tangent was silently dropped
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp"):
            ops.conv2d(xd, w, None, [1, 1], [0, 0], [1, 1], 1)
        with pytest.raises(RuntimeError, match="jvp"):
            ops.max_pool2d(xd, [2, 2], [2, 2], [0, 0], [1, 1], False)
        with pytest.raises(RuntimeError, match="jvp"):
            ops._conv2d_backward(torch.randn(1, 3, 4, 4, dtype=torch.float64), xd, w, [1, 1], [0, 0], [1, 1], 1,
                                 [True, True, False])
