"""max_pool2d values, int64 indices and gradients against torch.nn.functional.max_pool2d."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastconv
import fastconv.functional as FC

from devices import cpu_emulated_and_cuda

# (N, C, H, W, kernel, stride, padding, dilation, ceil_mode)
CASES = [
    (2, 3, 8, 8, 2, None, 0, 1, False),  # MNIST CNN 2x2
    (2, 4, 13, 13, 3, 2, 0, 1, False),  # AlexNet: overlapping 3x3 stride 2
    (3, 2, 11, 10, 3, 2, 1, 1, True),  # padding and ceil_mode
    (2, 3, 9, 12, (2, 3), (1, 2), (1, 0), (2, 1), False),  # asymmetric, dilation
    (1, 2, 7, 6, 3, 3, 1, 1, True),  # ceil_mode where the last window would start in the padding
    (0, 3, 8, 8, 2, 2, 0, 1, False),  # empty batch
    (2, 2, 5, 5, 1, 1, 0, 1, False),  # kernel 1
    (2, 3, 10, 10, 4, 3, 2, 1, True),
    (2, 5, 1, 9, (1, 3), (1, 2), 0, 1, False),
]
IDS = [f"n{c[0]}c{c[1]}h{c[2]}w{c[3]}k{c[4]}s{c[5]}p{c[6]}d{c[7]}ceil{int(c[8])}" for c in CASES]


def distinct_input(n, c, h, w, dtype, device):
    # distinct values: no ties, so the argmax (and so the gradient) is unique
    return (torch.randperm(n * c * h * w, dtype=torch.float64) / 7.0 - 3.0).view(n, c, h, w).to(device, dtype)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_values_indices_and_gradient_match_torch(case, dtype, device, poison):
    n, c, h, w, k, s, p, d, ceil = case
    x = distinct_input(n, c, h, w, dtype, device).requires_grad_()
    out, idx = FC.max_pool2d(x, k, s, p, d, ceil_mode=ceil, return_indices=True)
    xr = x.detach().cpu().double().requires_grad_()
    ref, ref_idx = F.max_pool2d(xr, k, s, p, d, ceil_mode=ceil, return_indices=True)
    assert out.shape == ref.shape and idx.dtype == torch.int64
    assert torch.equal(out.detach().cpu().double(), ref.detach())
    assert torch.equal(idx.cpu(), ref_idx)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad_out.to(device, dtype))
    ref.backward(grad_out)
    torch.testing.assert_close(x.grad.cpu().double(), xr.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
def test_overlapping_windows_sum_gradients(device):
    # a single large value sits in four overlapping 3x3/stride-2 windows: its gradient is their sum
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64, device=device) - torch.arange(25, device=device).view(1, 1, 5, 5)
    x[0, 0, 2, 2] = 100.0
    x.requires_grad_()
    out = FC.max_pool2d(x, 3, 2)
    out.backward(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64, device=device))
    assert x.grad[0, 0, 2, 2].item() == 10.0
    assert x.grad.sum().item() == 10.0


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
def test_nan_and_inf_like_torch(device):
    x = torch.randn(2, 3, 6, 6, device=device)
    x[0, 1, 2, 3] = math.nan
    x[1, 2, 0, 0] = -math.inf
    x[1, 0] = -math.inf
    out, idx = FC.max_pool2d(x, 2, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", [2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 10, 75), (1, 2, 7, 34), (3, 1, 4, 32), (2, 2, 3, 3), (1, 2, 9, 35)])
def test_stride2_ties_nan_and_row_tails(shape, kernel, dtype, device, poison):
    # small integers: many ties (real images have flat backgrounds); rows of 1 to 38 outputs cover
    # the vectorised stride-2 paths' full and partial 16-output steps, odd sizes, ceil mode, and
    # padding (ResNet's 3x3/2 p1; asymmetric too), where windows at the borders and a run of -inf
    # (the window's first element inside the input wins) reach outside the input
    x = torch.randint(-2, 3, shape).to(device, dtype)
    x.view(-1)[::29] = math.nan
    x.view(-1)[5::31] = -math.inf
    x[..., 0, :3] = -math.inf
    for ceil in (False, True):
        for pad in (0, 1, (1, 0), (0, 1)):
            out, idx = FC.max_pool2d(x, kernel, 2, pad, ceil_mode=ceil, return_indices=True)
            ref, ref_idx = F.max_pool2d(x.cpu(), kernel, 2, pad, ceil_mode=ceil, return_indices=True)
            torch.testing.assert_close(out.cpu(), ref, equal_nan=True, rtol=0, atol=0)
            assert torch.equal(idx.cpu(), ref_idx), (pad, ceil)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
def test_unbatched_channels_last_noncontiguous(device):
    x = distinct_input(2, 3, 9, 9, torch.float64, device)
    for inp in (x[0], x.contiguous(memory_format=torch.channels_last), x[..., ::2]):
        out, idx = FC.max_pool2d(inp, 3, 2, 1, return_indices=True)
        ref, ref_idx = F.max_pool2d(inp, 3, 2, 1, return_indices=True)
        assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
        assert out.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(
            memory_format=torch.channels_last)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types(dtype, device):
    x = torch.randn(2, 3, 8, 8, device=device).to(dtype)
    out, idx = FC.max_pool2d(x, 3, 2, 1, return_indices=True)
    ref, ref_idx = F.max_pool2d(x.float(), 3, 2, 1, return_indices=True)
    assert out.dtype == dtype
    assert torch.equal(out.float(), ref)  # max picks an element: exact
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_integer_types_like_torch(case, dtype, device, channels_last):
    # torch's max_pool2d takes integer tensors too (masks, label maps): values, indices and layout as its,
    # ties included (few distinct values) and windows of only the type's lowest value (its padding
    # never wins: the first in-bounds tap is reported)
    n, c, h, w, k, s, p, d, ceil = case
    info = torch.iinfo(dtype)
    x = torch.randint(max(info.min, -6), min(info.max, 6) + 1, (n, c, h, w), dtype=dtype)
    x[:, :, : h // 2, : w // 2] = info.min
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # torch's own channels_last integer kernel refuses planes of more elements than int8/int16 can
    # count; values and indices do not depend on the layout, so its NCHW result is the reference, and
    # the layout is the one torch gives a float tensor of these strides
    ref, ref_idx = F.max_pool2d(x.contiguous(), k, s, p, d, ceil_mode=ceil, return_indices=True)
    layout = F.max_pool2d(x.float(), k, s, p, d, ceil_mode=ceil)
    out, idx = FC.max_pool2d(x.to(device), k, s, p, d, ceil_mode=ceil, return_indices=True)
    assert out.dtype == dtype and torch.equal(out.cpu(), ref) and torch.equal(idx.cpu(), ref_idx)
    assert out.is_contiguous(memory_format=torch.channels_last) == layout.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(fastconv.MaxPool2d(k, s, p, d, ceil_mode=ceil)(x.to(device)).cpu(), ref)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
def test_gradcheck_and_gradgradcheck(device):
    x = distinct_input(2, 2, 7, 6, torch.float64, device).requires_grad_()
    for args in ((3, 2, 1, 1, True), ((2, 3), (1, 2), (1, 0), (2, 1), False), (3, 2, 1, 1, False), (3, 2, 1, 1, True),
                 ((2, 3), (2, 1), (1, 0), (2, 2), True)):
        fn = lambda t: FC.max_pool2d(t, *args[:4], ceil_mode=args[4])  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
def test_registered_op_and_function_agree(device):
    x = distinct_input(2, 3, 9, 9, torch.float64, device)
    args = ([3, 3], [2, 2], [1, 1], [1, 1], False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    oa, ia = torch.ops.fastconv.max_pool2d(xa, *args)
    ob, ib = fastconv.MaxPool2dFunction.apply(xb, *args)
    assert torch.equal(oa, ob) and torch.equal(ia, ib) and not ia.requires_grad
    g = torch.randn_like(oa)
    oa.backward(g)
    ob.backward(g)
    assert torch.equal(xa.grad, xb.grad)


# float32 backward kernels on AVX-512: windows that tile rows of 12+ (dense row writes, with row and
# column tails and ceil_mode; rows of 14 and 13 inside one vector), 8-wide rows and overlapping windows
# (index scatter). Indices that are
# not in their own window (another window's position, negative, past the plane, or a valid position
# plus 2**33, which narrowing to int32 would alias) contribute nothing, as on every backend.
@pytest.mark.parametrize("shape,kernel,stride,ceil,pad", [((2, 3, 9, 37), (2, 2), (2, 2), True, (0, 0)),
                                                          ((1, 2, 12, 40), (3, 5), (3, 5), False, (0, 0)),
                                                          ((2, 3, 14, 14), (2, 2), (2, 2), False, (0, 0)),
                                                          ((2, 2, 9, 13), (2, 2), (2, 2), True, (0, 0)),
                                                          ((3, 2, 8, 8), (2, 2), (2, 2), False, (0, 0)),
                                                          ((2, 2, 13, 21), (3, 3), (2, 2), False, (0, 0)),
                                                          ((2, 3, 15, 17), (3, 3), (2, 2), True, (1, 1)),
                                                          ((2, 2, 10, 19), (3, 4), (1, 2), False, (1, 2))])
def test_float32_backward_drops_indices_outside_their_window(shape, kernel, stride, ceil, pad, poison):
    x = distinct_input(*shape, torch.float32, "cpu")
    args = [list(kernel), list(stride), list(pad), [1, 1], ceil]
    vals, idx = torch.ops.fastconv.max_pool2d(x, *args)
    plane = shape[2] * shape[3]
    bad = idx.clone()
    flat = bad.view(-1)
    flat[0::5] = (flat[0::5] + kernel[1]) % plane   # another window's position (or the neighbour's)
    flat[1::7] = -3
    flat[2::11] = plane + 1
    flat[3::13] = flat[3::13] + (1 << 33)
    dropped = bad != idx
    go = torch.randn(vals.shape)
    gi = torch.ops.fastconv._max_pool2d_backward(go, x, bad, *args)
    # reference: torch's backward with the dropped outputs' gradients zeroed, plus the moved indices
    # that still land inside their own window (overlapping windows) scattered by hand
    keep = ~dropped
    h0 = (torch.arange(vals.shape[2]) * stride[0] - pad[0]).view(1, 1, -1, 1)
    w0 = (torch.arange(vals.shape[3]) * stride[1] - pad[1]).view(1, 1, 1, -1)
    r, c = bad // shape[3], bad % shape[3]
    inside = (bad >= 0) & (bad < plane) & (r >= h0) & (r < h0 + kernel[0]) & (c >= w0) & (c < w0 + kernel[1])
    want = torch.zeros(shape[0], shape[1], plane, dtype=torch.float64)
    src = go.double().masked_fill(~(keep | inside), 0).flatten(2)
    want.scatter_add_(2, bad.clamp(0, plane - 1).masked_fill(~(keep | inside), 0).flatten(2), src)
    torch.testing.assert_close(gi.double(), want.view(shape), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", cpu_emulated_and_cuda(), indirect=True)
def test_functional_return_indices_and_gradient_match_torch(device):
    x = distinct_input(2, 3, 9, 9, torch.float64, device).requires_grad_()
    vals, idx = FC.max_pool2d(x, 3, 2, 1, return_indices=True)
    xr = x.detach().cpu().requires_grad_()
    rvals, ridx = F.max_pool2d(xr, 3, 2, 1, return_indices=True)
    assert torch.equal(vals.detach().cpu(), rvals) and torch.equal(idx.cpu(), ridx)
    vals.sum().backward()
    rvals.sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xr.grad)


# Windows that tile the plane (stride == kernel, no padding): grad_input written densely (the portable
# kernels: every dtype but float32 on AVX-512; float32's 2-wide windows four at a time on AVX2), bit for
# bit torch's: -0 gradients come out +0 as from torch's scatter into zeros, rows and columns no window
# covers are 0, ceil_mode's cut windows, row widths around the four-window steps, indices outside their
# window (another pixel of the plane, negative) matched by no pixel.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kernel,shape,ceil", [((2, 2), (2, 3, 9, 17), False), ((2, 2), (1, 2, 8, 8), True),
                                               ((2, 2), (2, 2, 7, 31), True), ((2, 2), (1, 3, 6, 2), False),
                                               ((3, 3), (2, 2, 11, 13), True), ((2, 3), (1, 2, 9, 20), False),
                                               ((1, 1), (1, 2, 5, 7), False), ((3, 2), (2, 1, 10, 9), True)])
def test_tiling_windows_backward_bitwise_like_torch(kernel, shape, ceil, dtype, poison):
    x = distinct_input(*shape, dtype, "cpu")
    args = [list(kernel), list(kernel), [0, 0], [1, 1], ceil]
    vals, idx = torch.ops.fastconv.max_pool2d(x, *args)
    ref_vals, ref_idx = torch.ops.aten.max_pool2d_with_indices(x, *args)
    assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx)
    go = torch.randn(vals.shape).to(dtype)
    go.view(-1)[::3] = -0.0
    for bad in (idx, idx.flip(-1), torch.where(torch.rand(idx.shape) < 0.3, -1, idx)):
        want = torch.ops.aten.max_pool2d_with_indices_backward(go, x, *args, bad.clamp_min(0))
        if bad.min() < 0:  # torch cannot take the negative indices: their gradients zeroed instead
            want = torch.ops.aten.max_pool2d_with_indices_backward(go.masked_fill(bad < 0, 0), x, *args, bad.clamp_min(0))
        got = torch.ops.fastconv._max_pool2d_backward(go, x, bad, *args)
        if bad is idx:
            assert torch.equal(got, want) and not torch.signbit(got).logical_and(got == 0).any()
        elif bad.min() < 0:
            assert torch.equal(got, want)
        else:  # flipped indices lie outside their windows but the middle ones: compare the pixels they pick
            inside = got != 0
            assert torch.equal(got[inside], want[inside])


# float32 backward against torch's own, bit for bit: random geometries (overlapping windows, padding,
# ceil mode, kernels past the stride and not), inputs with ties, so elements that several windows
# pick sum their gradients in torch's order.
def test_float32_backward_bitwise_like_torch_on_random_geometries():
    gen = torch.Generator().manual_seed(7)
    checked = 0
    for _ in range(150):
        kh, kw, sh, sw, ph, pw = (int(v) for v in torch.randint(1, 6, (6,), generator=gen))
        sh, sw = min(sh, kh + 1), min(sw, kw + 1)
        ph, pw = ph % (kh // 2 + 1), pw % (kw // 2 + 1)
        h, w = kh + int(torch.randint(0, 30, (1,), generator=gen)), kw + int(torch.randint(0, 30, (1,), generator=gen))
        ceil = bool(torch.randint(0, 2, (1,), generator=gen))
        x = torch.randn(2, 3, h, w, generator=gen).mul(2).round()  # many ties
        args = [[kh, kw], [sh, sw], [ph, pw], [1, 1], ceil]
        ref_vals, ref_idx = torch.ops.aten.max_pool2d_with_indices(x, *args)
        vals, idx = torch.ops.fastconv.max_pool2d(x, *args)
        assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx), args
        go = torch.randn(vals.shape, generator=gen)
        want = torch.ops.aten.max_pool2d_with_indices_backward(go, x, *args, ref_idx)
        got = torch.ops.fastconv._max_pool2d_backward(go, x, idx, *args)
        assert torch.equal(got, want), args
        checked += 1
    assert checked == 150


# channels_last inputs on the CPU: values, indices and grad_input channels_last (as torch's) and bit for
# bit torch's, on random geometries (overlapping and padded windows, dilation, ceil mode, stride 1 with
# many windows over one pixel), channel counts around the 16-lane vectors (the backward: per pixel
# from 16 channels, below that a per-channel scatter, or up to 8 channels rows of several pixels a
# vector), inputs with ties and a NaN, at 1-3 threads; the fake
# kernels give the same strides.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_channels_last_cpu_bitwise_like_torch(dtype, threads, poison):
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(11 + threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for trial in range(40):
            kh, kw, sh, sw = (int(v) for v in torch.randint(1, 5, (4,), generator=gen))
            dh, dw = (int(v) for v in torch.randint(1, 3, (2,), generator=gen))
            ph = int(torch.randint(0, kh // 2 + 1, (1,), generator=gen))
            pw = int(torch.randint(0, kw // 2 + 1, (1,), generator=gen))
            h = (kh - 1) * dh + 1 + int(torch.randint(0, 14, (1,), generator=gen))
            w = (kw - 1) * dw + 1 + int(torch.randint(0, 14, (1,), generator=gen))
            n, c = int(torch.randint(1, 3, (1,), generator=gen)), (3, 16, 6, 17, 8, 40, 1, 9)[trial % 8]
            ceil = bool(trial % 3 == 0)
            x = torch.randn(n, c, h, w, generator=gen).mul(2).round().to(dtype)  # many ties
            x.view(-1)[int(torch.randint(0, x.numel(), (1,), generator=gen))] = float("nan")
            x = x.contiguous(memory_format=torch.channels_last)
            args = [[kh, kw], [sh, sw], [ph, pw], [dh, dw], ceil]
            ref, ref_idx = torch.ops.aten.max_pool2d_with_indices(x, *args)
            out, idx = torch.ops.fastconv.max_pool2d(x, *args)
            assert torch.equal(out, ref) or torch.allclose(out, ref, equal_nan=True, rtol=0, atol=0), args
            assert torch.equal(idx, ref_idx), args
            assert out.stride() == ref.stride() and idx.stride() == ref_idx.stride(), args
            go = torch.randn(ref.shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
            want = torch.ops.aten.max_pool2d_with_indices_backward(go, x, *args, ref_idx)
            got = torch.ops.fastconv._max_pool2d_backward(go, x, idx, *args)
            assert torch.equal(got, want), args
            assert got.stride() == want.stride(), args
            got_nchw_go = torch.ops.fastconv._max_pool2d_backward(go.contiguous(), x, idx.contiguous(), *args)
            assert torch.equal(got_nchw_go, want), args
            with FakeTensorMode() as mode:
                fx = mode.from_tensor(x)
                fo, fi = torch.ops.fastconv.max_pool2d(fx, *args)
                fg = torch.ops.fastconv._max_pool2d_backward(mode.from_tensor(go), fx, fi, *args)
            assert fo.stride() == out.stride() and fi.stride() == idx.stride() and fg.stride() == got.stride()
    finally:
        torch.set_num_threads(old)


# The autograd node passes the gradient on as it comes (expanded, channels_last or not): the kernels lay
# it out, as torch's gives it back.
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_backward_takes_expanded_and_channels_last_gradients(layout):
    x = torch.randn(2, 20, 9, 9).contiguous(memory_format=layout)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = FC.max_pool2d(a, 2), F.max_pool2d(b, 2)
    for g in (torch.randn(2, 20, 1, 4).expand(ya.shape), torch.randn(ya.shape).contiguous(memory_format=layout)):
        (ga,), (gb,) = torch.autograd.grad(ya, a, g, retain_graph=True), torch.autograd.grad(yb, b, g, retain_graph=True)
        assert torch.equal(ga, gb) and ga.stride() == gb.stride()


# The channels_last backward (overlapping windows: the scatter; others: dense rows) drops indices outside
# their window, as the NCHW one, and gives +0 where a -0 gradient lands (torch adds into zeros).
@pytest.mark.parametrize("channels", [20, 11, 5])
@pytest.mark.parametrize("args", [[[3, 3], [2, 2], [1, 1], [1, 1], True], [[2, 2], [2, 2], [0, 0], [1, 1], False],
                                  [[2, 3], [3, 3], [1, 1], [1, 1], True]], ids=["overlapping", "2x2", "gaps"])
def test_channels_last_backward_drops_indices_outside_their_window(channels, args, poison):
    x = distinct_input(2, channels, 15, 17, torch.float32, "cpu").contiguous(memory_format=torch.channels_last)
    vals, idx = torch.ops.fastconv.max_pool2d(x, *args)
    bad = idx.clone()
    flat = bad.permute(0, 2, 3, 1).view(-1)  # memory order: channels innermost
    flat[0::5] = (flat[0::5] + 3) % (15 * 17)
    flat[1::7] = -3
    flat[2::11] = 15 * 17 + 1
    flat[3::13] = flat[3::13] + (1 << 33)
    go = torch.randn(vals.shape)
    go.view(-1)[::3] = -0.0
    go = go.contiguous(memory_format=torch.channels_last)
    got = torch.ops.fastconv._max_pool2d_backward(go, x, bad, *args)
    want = torch.ops.fastconv._max_pool2d_backward(go.contiguous(), x.contiguous(), bad.contiguous(), *args)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.contiguous().view(torch.int32), want.view(torch.int32))  # bits: +0, not -0
    ref = torch.ops.aten.max_pool2d_with_indices_backward(go, x, *args, idx)
    assert torch.equal(torch.ops.fastconv._max_pool2d_backward(go, x, idx, *args).contiguous().view(torch.int32),
                       ref.contiguous().view(torch.int32))
