"""conv2d forward and every gradient against torch.nn.functional.conv2d in float64."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastconv
import fastconv.functional as FC

from devices import cpu_emulated_and_cuda

ops = torch.ops.fastconv

# (N, C, H, W, OC, kernel, stride, padding, dilation, groups, bias)
CASES = [
    (2, 3, 10, 9, 4, (3, 3), 1, 1, 1, 1, True),
    (3, 4, 11, 8, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2, True),  # asymmetric everything, groups
    (1, 6, 7, 7, 6, (3, 3), 1, 1, 1, 6, False),  # depthwise, batch 1
    (5, 5, 6, 6, 7, (1, 1), 1, 0, 1, 1, True),  # pointwise: the image is its own column matrix
    (2, 4, 9, 9, 4, (1, 1), 2, 1, 1, 1, True),  # 1x1 strided and padded
    (0, 3, 8, 8, 4, (3, 3), 1, 1, 1, 1, True),  # empty batch
    (3, 2, 13, 12, 3, (5, 4), (3, 2), (2, 1), (2, 1), 1, True),
    (3, 1, 28, 28, 8, (3, 3), 1, 1, 1, 1, True),  # MNIST CNN conv1
    (3, 8, 14, 14, 16, (3, 3), 1, 1, 1, 1, True),  # MNIST CNN conv2 (narrower)
    (2, 3, 31, 29, 5, (11, 11), 4, 2, 1, 1, True),  # AlexNet conv1
    (2, 8, 5, 5, 8, (3, 3), 1, 2, 2, 4, True),  # dilation 2, padding 2, groups 4
    (2, 40, 9, 7, 13, (3, 3), 1, 1, 1, 1, True),  # 360 column rows (> one GEMM k-block), 13 outputs
    (1, 64, 3, 120, 9, (3, 3), 1, 1, 1, 1, True),  # a column band smaller than the image
    (3, 6, 10, 10, 4, (3, 3), 1, 1, 1, 2, False),
    # from tests/test_cuda.py's public-API cases (now run on the emulated CUDA kernels here too)
    (4, 32, 14, 14, 64, (3, 3), 1, 1, 1, 1, True),  # MNIST CNN conv2, full width (batch 100: test_cuda's raw ops)
    (3, 4, 10, 13, 6, (3, 2), (2, 1), (1, 0), (1, 2), 1, True),
    (2, 6, 9, 9, 8, (3, 3), 1, 1, 1, 2, True),
    (2, 8, 10, 10, 8, (3, 3), 1, 1, 1, 8, True),  # depthwise with bias
    (3, 16, 7, 7, 12, (1, 1), 1, 0, 1, 1, True),
]
IDS = [f"n{c[0]}c{c[1]}h{c[2]}w{c[3]}o{c[4]}k{c[5]}s{c[6]}p{c[7]}d{c[8]}g{c[9]}" for c in CASES]
# more gradcheck geometries (from tests/test_cuda.py): 2x4x6x5 inputs, 4 output channels, 3x3
GRADCHECK_CASES = [(2, 4, 6, 5, 4, (3, 3), 1, 1, 1, 1, True), (2, 4, 6, 5, 4, (3, 3), (2, 1), (1, 2), (1, 2), 2, True),
                   (2, 4, 6, 5, 4, (3, 3), 2, 0, 1, 4, True), (2, 4, 6, 5, 4, (3, 3), 1, 0, 1, 1, True)]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=2e-4)}


def make_case(case, dtype, device, layout="contiguous"):
    n, c, h, w, oc, k, stride, padding, dilation, groups, bias = case
    k = k if isinstance(k, tuple) else (k, k)
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    wt = torch.randn(oc, c // groups, *k, dtype=torch.float64)
    b = torch.randn(oc, dtype=torch.float64) if bias else None
    xd = x.to(device, dtype)
    if layout == "channels_last":
        xd = xd.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontiguous":
        xd = torch.randn(n, c, h, 2 * w, dtype=dtype, device=device)[..., ::2]
        xd.copy_(x)
        assert not xd.is_contiguous()
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return xd, wt.to(device, dtype), None if b is None else b.to(device, dtype), args


def reference(x, w, b, args, grad_out):
    """torch.nn.functional.conv2d in float64 on the CPU, from the same (rounded) inputs."""
    x = x.detach().cpu().double().requires_grad_()
    w = w.detach().cpu().double().requires_grad_()
    b = None if b is None else b.detach().cpu().double().requires_grad_()
    out = F.conv2d(x, w, b, **args)
    out.backward(grad_out.cpu().double())
    return out, x.grad, w.grad, None if b is None else b.grad


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.detach().cpu().double(), expected, **TOL[dtype])


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_gradients_match_torch(case, dtype, device, poison):
    x, w, b, args = make_case(case, dtype, device)
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_()
    out = FC.conv2d(x, w, b, **args)
    grad_out = torch.randn(out.shape, dtype=dtype, device=device)
    out.backward(grad_out)
    ref, gx, gw, gb = reference(x, w, b, args, grad_out)
    assert out.shape == ref.shape and out.dtype == dtype and out.device.type == device
    assert_close(out, ref, dtype)
    assert_close(x.grad, gx, dtype)
    assert_close(w.grad, gw, dtype)
    if b is not None:
        assert_close(b.grad, gb, dtype)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("case", CASES[:4] + CASES[9:10], ids=IDS[:4] + IDS[9:10])
def test_layouts(case, layout, device, poison):
    x, w, b, args = make_case(case, torch.float64, device, layout)
    x.requires_grad_()
    w.requires_grad_()
    out = FC.conv2d(x, w, b, **args)
    expected = F.conv2d(x.detach(), w.detach(), b, **args)
    # same memory format as torch picks for this input
    assert out.is_contiguous(memory_format=torch.channels_last) == expected.is_contiguous(
        memory_format=torch.channels_last)
    grad_out = torch.randn(out.shape, dtype=torch.float64, device=device)
    out.backward(grad_out)
    ref, gx, gw, _ = reference(x, w, b, args, grad_out)
    assert_close(out, ref, torch.float64)
    assert_close(x.grad, gx, torch.float64)
    assert_close(w.grad, gw, torch.float64)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
def test_registered_op_and_function_give_same_gradients(device):
    x, w, b, args = make_case(CASES[1], torch.float64, device)
    s, p, d, g = ([*args["stride"]], [*args["padding"]], [*args["dilation"]], args["groups"])
    grads = []
    for fn in (lambda x, w, b: ops.conv2d(x, w, b, s, p, d, g),
               lambda x, w, b: fastconv.Conv2dFunction.apply(x, w, b, s, p, d, g)):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        out = fn(xs, ws, bs)
        out.backward(torch.ones_like(out))
        grads.append((out, xs.grad, ws.grad, bs.grad))
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
def test_only_requested_gradients_are_computed(device):
    x, w, b, args = make_case(CASES[0], torch.float64, device)
    s, p, d, g = [1, 1], [1, 1], [1, 1], 1
    grad_out = torch.randn(2, 4, 10, 9, dtype=torch.float64, device=device)
    gi, gw, gb = ops._conv2d_backward(grad_out, x, w, s, p, d, g, [False, True, False])
    assert gi.numel() == 0 and gb.numel() == 0 and gw.shape == w.shape
    # through autograd: an input that needs no grad gets none
    w.requires_grad_()
    FC.conv2d(x, w, b, 1, 1).sum().backward()
    assert x.grad is None and w.grad is not None


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[10]] + GRADCHECK_CASES,
                         ids=[IDS[1], IDS[2], IDS[4], IDS[10]] + [f"extra{i}" for i in range(len(GRADCHECK_CASES))])
def test_gradcheck_and_gradgradcheck(case, device):
    n, c, h, w_, *rest = case
    x, w, b, args = make_case((min(n, 2), c, min(h, 8), min(w_, 8), *rest), torch.float64, device)
    inputs = tuple(t.requires_grad_() for t in (x, w, b) if t is not None)

    def fn(*ts):
        return FC.conv2d(ts[0], ts[1], ts[2] if len(ts) > 2 else None, **args)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
def test_unbatched_input_and_string_padding(device):
    x = torch.randn(3, 9, 8, dtype=torch.float64, device=device)
    w = torch.randn(5, 3, 4, 3, dtype=torch.float64, device=device)  # even kernel: 'same' pads one side more
    for padding in ("same", "valid", 0, (2, 1)):
        out = FC.conv2d(x, w, None, padding=padding, dilation=(1, 2) if padding == "same" else 1)
        expected = F.conv2d(x, w, None, padding=padding, dilation=(1, 2) if padding == "same" else 1)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types(dtype, device):
    if device == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bfloat16 on this GPU")
    x, w, b, args = make_case(CASES[0], dtype, device)
    out = FC.conv2d(x, w, b, **args)
    assert out.dtype == dtype
    ref = F.conv2d(x.double(), w.double(), b.double(), **args)
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_cpu_autocast_runs_in_bfloat16():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FC.conv2d(x, w, None, 1, 1)
        expected = F.conv2d(x, w, None, 1, 1)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=5e-2)


def test_weight_gradient_is_deterministic():
    x, w, b, args = make_case(CASES[8], torch.float32, "cpu")
    out = FC.conv2d(x, w, b, **args)
    grad_out = torch.randn_like(out)
    s, p, d, g = [1, 1], [1, 1], [1, 1], 1
    first = ops._conv2d_backward(grad_out, x, w, s, p, d, g, [True, True, True])
    second = ops._conv2d_backward(grad_out, x, w, s, p, d, g, [True, True, True])
    for a, e in zip(first, second):
        assert torch.equal(a, e)


def test_aten_gemm_fallback_is_correct():
    """The AVX-512 micro-kernels can be switched off; the ATen-BLAS path they fall back to (other
    CPUs, other dtypes) must give the same answers."""
    code = (
        "import torch, fastconv, torch.nn.functional as F\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(3, 40, 9, 7, requires_grad=True); w = torch.randn(14, 20, 3, 3, requires_grad=True)\n"
        "b = torch.randn(14, requires_grad=True)\n"
        "out = fastconv.functional.conv2d(x, w, b, 1, 1, 1, 2); g = torch.randn_like(out)\n"
        "grads = torch.autograd.grad(out, (x, w, b), g)\n"
        "ref = F.conv2d(x.double(), w.double(), b.double(), 1, 1, 1, 2)\n"
        "rg = torch.autograd.grad(ref, (x, w, b), g.double())\n"
        "torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=2e-4)\n"
        "for a, e in zip(grads, rg): torch.testing.assert_close(a.double(), e.double(), rtol=1e-4, atol=2e-4)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FASTCONV_CPU_GEMM="aten")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.emulated_cuda
def test_emulated_parameter_runs_the_emulated_kernels(request):
    # the "emulated" device of these tests must reach the CUDA sources, not the CPU kernels
    from conftest import emulated_knobs, route_fastconv_cpu_to_emulated
    E = torch.ops.fastconv_emulated
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with emulated_knobs(), route_fastconv_cpu_to_emulated():
        E._reset_counters()
        FC.conv2d(x, w, None, 1, 1)
        launches = E._counters()[0]
    E._reset_counters()
    FC.conv2d(x, w, None, 1, 1)
    assert launches > 0 and E._counters()[0] == 0
