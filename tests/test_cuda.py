"""CUDA kernels of fastconv against torch.nn.functional (a float64 CPU reference).

Every test runs on two backends (the `backend` fixture, tests/conftest.py): `cuda`, the kernels on a
GPU (skipped without one), and `emulated`, the same kernels' sources compiled for the CPU
(torch.ops.fastconv_emulated, marked `emulated_cuda`; csrc/cuda/backend.cuh), which CI runs. The raw
ops are checked directly, so that a failure points at the kernel; the public API (fastconv.Conv2d,
autocast, torch.compile, opcheck, CUDA graphs) too (on the emulated backend torch.ops.fastconv on CPU
tensors is routed to the emulated kernels). The public API's forward/backward against torch,
gradcheck and gradgradcheck live in the device-parametrised tests/test_conv2d.py and
tests/test_max_pool2d.py, which run on the CPU, the emulated kernels and a GPU. A few tests of the CUDA runtime
itself (graphs, a second device) are GPU-only; tests/test_emulated_cuda.py adds what only the
emulator can reach on small shapes (multi-image chunks, the int64 index path, launch limits).

Run the @pytest.mark.large tests (tensors past 2^31 elements, ~20 GB of GPU memory) with
FASTCONV_RUN_LARGE=1.
"""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import fastconv
import fastconv.functional as FF

ops = torch.ops.fastconv

# Max normalised error (max |a - e| / max(1, max |e|)) allowed per dtype, against a float64
# reference computed from the same (already rounded) inputs.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.fixture(autouse=True)
def _no_tf32():
    # fastconv's GEMMs run through ATen on cuBLAS: TF32 (10-bit mantissa) would make float32 results
    # differ from the float64 reference by ~1e-3. (torch's cuDNN convs are never the reference.)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


@pytest.fixture
def poison_cuda(monkeypatch, poison, backend):
    """conftest's `poison` (every at::empty starts as NaN, so an output element a kernel forgot to
    write fails the test) on CUDA: deterministic mode also requires the cuBLAS workspace setting
    that makes cuBLAS deterministic, which torch checks on every GEMM call."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    yield


def _emulated_workspace(backend, nbytes):
    """On the emulated backend, the conv workspace bound in bytes while in the block; nothing on a GPU."""
    if backend.emulated:
        from conftest import emulated_knobs
        return emulated_knobs(workspace=nbytes)
    return contextlib.nullcontext()


def gpu_only(backend, why):
    if backend.emulated:
        pytest.skip(f"tests the CUDA runtime, not the kernels: {why}")


def assert_close_scaled(actual, expected, dtype, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    err = (a - e).abs().max().item() / max(1.0, e.abs().max().item())
    assert err <= TOL[dtype], f"{what}: normalised max error {err:.3g} > {TOL[dtype]:g} ({dtype})"


# (name, input shape, weight shape, stride, padding, dilation, groups, bias)
CONV_CASES = [
    ("mnist", (100, 32, 14, 14), (64, 32, 3, 3), 1, 1, 1, 1, True),
    ("stride2", (4, 3, 11, 9), (8, 3, 3, 3), 2, 1, 1, 1, True),
    ("asymmetric", (3, 4, 10, 13), (6, 4, 3, 2), (2, 1), (1, 0), (1, 2), 1, True),
    ("dilation2", (2, 4, 12, 12), (5, 4, 3, 3), 1, 2, 2, 1, False),
    ("groups2", (2, 6, 9, 9), (8, 3, 3, 3), 1, 1, 1, 2, True),
    ("depthwise", (2, 8, 10, 10), (8, 1, 3, 3), 1, 1, 1, 8, True),
    ("depthwise_mult2_s2", (3, 4, 9, 8), (8, 1, 3, 3), 2, 1, 1, 4, False),
    ("1x1", (3, 16, 7, 7), (12, 16, 1, 1), 1, 0, 1, 1, True),
    ("1x1_groups", (2, 8, 5, 5), (4, 4, 1, 1), 1, 0, 1, 2, True),
    ("1x1_stride2", (2, 8, 7, 7), (4, 8, 1, 1), 2, 0, 1, 1, False),
    ("1x1_pad", (2, 3, 4, 4), (5, 3, 1, 1), 1, 1, 1, 1, True),
    ("batch1_5x5", (1, 3, 8, 8), (4, 3, 5, 5), 1, 2, 1, 1, True),
    ("odd_batch", (5, 2, 6, 7), (3, 2, 3, 3), (1, 2), (0, 1), 1, 1, True),
    ("kernel_gt_input", (2, 2, 4, 4), (3, 2, 5, 5), 1, 2, 1, 1, True),
    ("batch0", (0, 3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1, True),
]
CONV_IDS = [c[0] for c in CONV_CASES]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_conv(case, dtype, device, seed=0):
    _, xs, ws, stride, padding, dilation, groups, has_bias = case
    g = torch.Generator().manual_seed(seed)
    fan_in = ws[1] * ws[2] * ws[3]
    x = torch.randn(xs, generator=g, dtype=torch.float64)
    w = torch.randn(ws, generator=g, dtype=torch.float64) / fan_in ** 0.5
    b = torch.randn(ws[0], generator=g, dtype=torch.float64) if has_bias else None
    # Round to the test dtype first, so the reference sees exactly the kernel's inputs.
    x, w = x.to(dtype).to(device), w.to(dtype).to(device)
    b = b.to(dtype).to(device) if b is not None else None
    return x, w, b, _pair(stride), _pair(padding), _pair(dilation), groups


def reference_conv(x, w, b, stride, padding, dilation, groups, grad_output=None):
    """torch's conv2d in float64 on the CPU, with gradients for grad_output."""
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_()
    b64 = b.detach().double().cpu().requires_grad_() if b is not None else None
    out = F.conv2d(x64, w64, b64, stride, padding, dilation, groups)
    if grad_output is None:
        return out.detach(), None
    gi, gw = torch.autograd.grad(out, (x64, w64), grad_output.detach().double().cpu())
    gb = grad_output.detach().double().cpu().sum((0, 2, 3))
    return out.detach(), (gi, gw, gb)


# ----------------------------------------------------------------------------- conv2d: raw ops


@pytest.mark.usefixtures("poison_cuda")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_forward_matches_torch(backend, case, dtype):
    x, w, b, stride, padding, dilation, groups = make_conv(case, dtype, backend.device)
    out = backend.ops.conv2d(x, w, b, stride, padding, dilation, groups)
    ref, _ = reference_conv(x, w, b, stride, padding, dilation, groups)
    assert out.device == x.device and out.dtype == dtype
    assert_close_scaled(out, ref, dtype, "output")


@pytest.mark.usefixtures("poison_cuda")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_backward_matches_torch(backend, case, dtype):
    x, w, b, stride, padding, dilation, groups = make_conv(case, dtype, backend.device)
    out_shape = backend.ops.conv2d(x, w, b, stride, padding, dilation, groups).shape
    go = torch.randn(out_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).to(backend.device)
    gi, gw, gb = backend.ops._conv2d_backward(go, x, w, stride, padding, dilation, groups, [True, True, True])
    _, (rgi, rgw, rgb) = reference_conv(x, w, b, stride, padding, dilation, groups, go)
    for got in (gi, gw, gb):
        assert got.device == x.device and got.dtype == dtype
    assert_close_scaled(gi, rgi, dtype, "grad_input")
    assert_close_scaled(gw, rgw, dtype, "grad_weight")
    assert_close_scaled(gb, rgb, dtype, "grad_bias")


@pytest.mark.usefixtures("poison_cuda")
@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, True, False), (False, True, True), (False, False, False)])
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[4], CONV_CASES[7]], ids=["mnist", "groups2", "1x1"])
def test_conv2d_backward_output_mask(backend, case, mask):
    dtype = torch.float64
    x, w, b, stride, padding, dilation, groups = make_conv(case, dtype, backend.device)
    out_shape = backend.ops.conv2d(x, w, b, stride, padding, dilation, groups).shape
    go = torch.randn(out_shape, dtype=dtype, device=backend.device)
    grads = backend.ops._conv2d_backward(go, x, w, stride, padding, dilation, groups, list(mask))
    _, refs = reference_conv(x, w, b, stride, padding, dilation, groups, go)
    for want, got, ref, name in zip(mask, grads, refs, ("grad_input", "grad_weight", "grad_bias")):
        if want:
            assert_close_scaled(got, ref, dtype, name)
        else:
            assert got.numel() == 0 and got.shape == (0,), f"{name} not asked for, got shape {tuple(got.shape)}"


@pytest.mark.usefixtures("poison_cuda")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv2d_chunked_batch(backend, dtype):
    # Column buffer of one image > the workspace bound: every image is its own chunk, which runs
    # the chunk loop, the grad_weight accumulation across chunks (in float32 for float16), and
    # col2im into an offset of grad_input. The emulator lowers the bound instead (1 byte) and
    # runs the same code path on small images.
    c = 256 if dtype == torch.float32 else 512
    size = 128
    if backend.emulated:
        c, size = c // 32, 12
    case = ("chunked", (3, c, size, size), (4, c, 3, 3), 1, 1, 1, 1, True)
    x, w, b, stride, padding, dilation, groups = make_conv(case, dtype, backend.device)
    with _emulated_workspace(backend, 1):
        out = backend.ops.conv2d(x, w, b, stride, padding, dilation, groups)
        go = torch.randn(out.shape, dtype=dtype, device=backend.device)
        gi, gw, gb = backend.ops._conv2d_backward(go, x, w, stride, padding, dilation, groups, [True, True, True])
    ref, (rgi, rgw, rgb) = reference_conv(x, w, b, stride, padding, dilation, groups, go)
    assert_close_scaled(out, ref, dtype, "output")
    assert_close_scaled(gi, rgi, dtype, "grad_input")
    assert_close_scaled(gw, rgw, dtype, "grad_weight")
    assert_close_scaled(gb, rgb, dtype, "grad_bias")


@pytest.mark.usefixtures("poison_cuda")
@pytest.mark.parametrize("layout", ["channels_last", "permuted", "sliced"])
def test_conv2d_noncontiguous_inputs(backend, layout):
    dtype = torch.float64
    x, w, b, stride, padding, dilation, groups = make_conv(CONV_CASES[1], dtype, backend.device)
    if layout == "channels_last":
        x2, w2 = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    elif layout == "permuted":
        # permute-contiguous-permute: same values and shape, strides of an NHWC tensor
        x2 = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        w2 = w.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    else:
        x2 = torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]  # last-dim stride 2
        w2 = w
    assert not x2.is_contiguous()
    out = backend.ops.conv2d(x2, w2, b, stride, padding, dilation, groups)
    go = torch.randn(out.shape, dtype=dtype, device=backend.device).to(memory_format=torch.channels_last)
    gi, gw, gb = backend.ops._conv2d_backward(go, x2, w2, stride, padding, dilation, groups, [True, True, True])
    ref, (rgi, rgw, rgb) = reference_conv(x, w, b, stride, padding, dilation, groups, go)
    assert_close_scaled(out, ref, dtype, "output")
    assert_close_scaled(gi, rgi, dtype, "grad_input")
    assert_close_scaled(gw, rgw, dtype, "grad_weight")
    assert_close_scaled(gb, rgb, dtype, "grad_bias")


@pytest.mark.usefixtures("poison_cuda")
def test_conv2d_batch0_backward_shapes(backend):
    x, w, b, stride, padding, dilation, groups = make_conv(CONV_CASES[-1], torch.float32, backend.device)
    out = backend.ops.conv2d(x, w, b, stride, padding, dilation, groups)
    assert out.shape == (0, 4, 8, 8)
    gi, gw, gb = backend.ops._conv2d_backward(out, x, w, stride, padding, dilation, groups, [True, True, True])
    assert gi.shape == x.shape
    assert gw.shape == w.shape and torch.count_nonzero(gw) == 0
    assert gb.shape == (4,) and torch.count_nonzero(gb) == 0


def test_conv2d_backward_is_deterministic(backend):
    # col2im is a gather (no atomics): two runs must agree bit for bit.
    x, w, b, stride, padding, dilation, groups = make_conv(CONV_CASES[0], torch.float32, backend.device)
    go = torch.randn(100, 64, 14, 14, device=backend.device)
    first = backend.ops._conv2d_backward(go, x, w, stride, padding, dilation, groups, [True, True, True])
    for _ in range(2):
        again = backend.ops._conv2d_backward(go, x, w, stride, padding, dilation, groups, [True, True, True])
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[2], CONV_CASES[5], CONV_CASES[8]],
                         ids=["stride2", "asymmetric", "depthwise", "1x1_groups"])
def test_conv2d_cpu_and_cuda_agree(backend, case):
    x, w, b, stride, padding, dilation, groups = make_conv(case, torch.float64, backend.device)
    args = (stride, padding, dilation, groups)
    out_gpu = backend.ops.conv2d(x, w, b, *args)
    out_cpu = ops.conv2d(x.cpu(), w.cpu(), b.cpu() if b is not None else None, *args)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu)
    go = torch.randn(out_gpu.shape, dtype=torch.float64)
    g_gpu = backend.ops._conv2d_backward(go.to(backend.device), x, w, *args, [True, True, True])
    g_cpu = ops._conv2d_backward(go, x.cpu(), w.cpu(), *args, [True, True, True])
    for a, c in zip(g_gpu, g_cpu):
        torch.testing.assert_close(a.cpu(), c)


def test_conv2d_device_mismatch_raises(backend):
    gpu_only(backend, "a second device")
    x = torch.randn(1, 2, 5, 5, device=backend.device)
    w = torch.randn(3, 2, 3, 3)
    with pytest.raises(RuntimeError, match="same device"):
        backend.ops.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="bias is on"):
        backend.ops.conv2d(x, w.to(backend.device), torch.zeros(3), [1, 1], [0, 0], [1, 1], 1)


# ----------------------------------------------------------------------------- conv2d: public API


@pytest.mark.usefixtures("route_public")
def test_conv2d_module_on_cuda_matches_torch(backend):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2).to(backend.device)
    mod = fastconv.Conv2d(6, 8, 3, stride=2, padding=1, groups=2).to(backend.device)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6, 11, 11, device=backend.device)
    # float64 CPU reference: torch's own CUDA conv may use TF32.
    expected = F.conv2d(x.double().cpu(), ref.weight.double().cpu(), ref.bias.double().cpu(), 2, 1, 1, 2)
    assert_close_scaled(mod(x), expected, torch.float32, "output")


@pytest.mark.usefixtures("route_public")
def test_conv2d_autocast_float16(backend):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(32, 64, 3, padding=1).to(backend.device)
    mod = fastconv.Conv2d(32, 64, 3, padding=1).to(backend.device)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(16, 32, 14, 14, device=backend.device)
    with torch.autocast(backend.device.type, dtype=torch.float16):
        out = mod(x)
        expected = ref(x)
    assert out.dtype == expected.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=1e-2)
    # The backward runs in float16 too and gives float32 gradients for the float32 parameters.
    out.float().sum().backward()
    expected.float().sum().backward()
    assert mod.weight.grad.dtype == torch.float32
    torch.testing.assert_close(mod.weight.grad, ref.weight.grad, rtol=2e-2, atol=2e-2 * ref.weight.grad.abs().max().item())
    torch.testing.assert_close(mod.bias.grad, ref.bias.grad, rtol=2e-2, atol=2e-2 * ref.bias.grad.abs().max().item())


@pytest.mark.usefixtures("route_public")
def test_torch_compile_fullgraph(backend):
    # Traces the fake kernels and autograd registration; the CUDA kernels then run compiled.
    torch.manual_seed(0)
    x = torch.randn(4, 3, 9, 9, device=backend.device, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, device=backend.device, requires_grad=True)

    def f(x_, w_):
        y = FF.conv2d(x_, w_, None, 1, 1)
        return FF.max_pool2d(y, 3, 2, 1).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w)
    gx, gw = torch.autograd.grad(loss, (x, w))
    x2, w2 = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    ref = F.max_pool2d(F.conv2d(x2, w2, None, 1, 1), 3, 2, 1).sum()
    rgx, rgw = torch.autograd.grad(ref, (x2, w2))
    assert_close_scaled(loss, ref, torch.float32, "loss")
    assert_close_scaled(gx, rgx, torch.float32, "grad_input")
    assert_close_scaled(gw, rgw, torch.float32, "grad_weight")


@pytest.mark.usefixtures("route_public")
@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
def test_opcheck_cuda(backend):
    x = torch.randn(2, 4, 7, 7, device=backend.device, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, device=backend.device, requires_grad=True)
    b = torch.randn(6, device=backend.device, requires_grad=True)
    torch.library.opcheck(ops.conv2d.default, (x, w, b, [2, 1], [1, 1], [1, 1], 2))
    go = torch.randn(2, 6, 4, 7, device=backend.device)
    torch.library.opcheck(ops._conv2d_backward.default,
                          (go, x.detach(), w.detach(), [2, 1], [1, 1], [1, 1], 2, [True, True, True]))
    torch.library.opcheck(ops.max_pool2d.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], False))


# ----------------------------------------------------------------------------- CUDA graphs, devices


def _small_net():
    return torch.nn.Sequential(
        fastconv.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), fastconv.MaxPool2d(2),
        fastconv.Conv2d(4, 8, 3, padding=1, groups=2), torch.nn.ReLU(), fastconv.MaxPool2d(3, 2, 1),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10),
    )


@pytest.mark.cuda
def test_cuda_graph_training_step():
    # Kernels that launch on the current stream and never synchronise with the host can be captured:
    # forward + backward + optimizer step replayed from a graph must match eager training.
    torch.manual_seed(0)
    graphed = _small_net().cuda()
    eager = _small_net().cuda()
    eager.load_state_dict(graphed.state_dict())
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = [(torch.randn(8, 1, 16, 16, device="cuda"), torch.randint(0, 10, (8,), device="cuda"))
               for _ in range(6)]

    def eager_step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    static_x = batches[0][0].clone()
    static_y = batches[0][1].clone()
    # Warm up on a side stream (as the torch.cuda.graphs docs ask), the same steps on both models.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x, y in batches[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            eager_step(graphed, opt_g, static_x, static_y)
    torch.cuda.current_stream().wait_stream(s)
    for x, y in batches[:3]:
        eager_step(eager, opt_e, x, y)

    graph = torch.cuda.CUDAGraph()
    opt_g.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = loss_fn(graphed(static_x), static_y)
        static_loss.backward()
        opt_g.step()

    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        loss_e = eager_step(eager, opt_e, x, y)
        torch.testing.assert_close(static_loss, loss_e, rtol=1e-5, atol=1e-5)
    torch.cuda.synchronize()
    for (name, p_g), p_e in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p_g, p_e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    # The device guard must run the kernels on the tensors' device, not the current one (cuda:0).
    dev = torch.device("cuda:1")
    x, w, b, stride, padding, dilation, groups = make_conv(CONV_CASES[4], torch.float32, device=dev)
    assert torch.cuda.current_device() == 0
    out = ops.conv2d(x, w, b, stride, padding, dilation, groups)
    assert out.device == dev
    go = torch.randn(out.shape, device=dev)
    gi, gw, gb = ops._conv2d_backward(go, x, w, stride, padding, dilation, groups, [True, True, True])
    assert gi.device == gw.device == gb.device == dev
    ref, (rgi, rgw, rgb) = reference_conv(x, w, b, stride, padding, dilation, groups, go)
    assert_close_scaled(out, ref, torch.float32, "output")
    assert_close_scaled(gi, rgi, torch.float32, "grad_input")
    assert_close_scaled(gw, rgw, torch.float32, "grad_weight")
    xp = torch.randn(2, 3, 9, 9, device=dev)
    vals, idx = ops.max_pool2d(xp, [3, 3], [2, 2], [1, 1], [1, 1], False)
    rvals, ridx = F.max_pool2d(xp.cpu(), 3, 2, 1, return_indices=True)
    assert vals.device == idx.device == dev
    assert torch.equal(vals.cpu(), rvals) and torch.equal(idx.cpu(), ridx)
    gp = ops._max_pool2d_backward(torch.ones_like(vals), xp, idx, [3, 3], [2, 2], [1, 1], [1, 1], False)
    assert gp.device == dev
    with pytest.raises(RuntimeError, match="same device"):
        ops.conv2d(x, w.to("cuda:0"), None, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------- max_pool2d

# (kernel_size, stride, padding, dilation, ceil_mode)
POOL_CASES = [
    ((2, 2), (2, 2), (0, 0), (1, 1), False),
    ((3, 3), (2, 2), (0, 0), (1, 1), False),  # overlapping windows
    ((3, 3), (2, 2), (1, 1), (1, 1), False),  # overlapping + padding (ResNet stem)
    ((3, 3), (2, 2), (0, 0), (1, 1), True),
    ((3, 3), (2, 2), (1, 1), (1, 1), True),
    ((2, 3), (1, 2), (1, 1), (1, 1), True),
    ((3, 3), (1, 1), (1, 1), (2, 2), False),  # dilation
    ((2, 3), (2, 1), (1, 0), (2, 3), True),
    ((4, 4), (3, 3), (2, 2), (1, 1), True),
    ((1, 1), (2, 2), (0, 0), (1, 1), False),
]
POOL_IDS = ["k{}s{}p{}d{}{}".format(k[0], s[0], p[0], d[0], "c" if c else "") for k, s, p, d, c in POOL_CASES]
POOL_SHAPES = [(2, 3, 9, 11), (1, 2, 8, 8), (3, 1, 7, 8)]


def _perm_input(shape, dtype=torch.float64, seed=0):
    # Distinct values: a random permutation, so that no window has a tie.
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    return (torch.randperm(n, generator=g).to(dtype) - n / 2).reshape(shape)


@pytest.mark.usefixtures("poison_cuda")
@pytest.mark.parametrize("shape", POOL_SHAPES)
@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", POOL_CASES, ids=POOL_IDS)
def test_max_pool2d_matches_torch(backend, kernel, stride, padding, dilation, ceil_mode, shape):
    x = _perm_input(shape)
    vals, idx = backend.ops.max_pool2d(x.to(backend.device), list(kernel), list(stride), list(padding), list(dilation), ceil_mode)
    rvals, ridx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    assert idx.dtype == torch.int64
    assert torch.equal(vals.cpu(), rvals)
    assert torch.equal(idx.cpu(), ridx)
    # backward: grad routed to the argmax of every window, summed where windows overlap
    go = torch.randn(rvals.shape, dtype=torch.float64)
    gi = backend.ops._max_pool2d_backward(go.to(backend.device), x.to(backend.device), idx, list(kernel), list(stride), list(padding),
                                  list(dilation), ceil_mode)
    xr = x.clone().requires_grad_()
    F.max_pool2d(xr, kernel, stride, padding, dilation, ceil_mode).backward(go)
    torch.testing.assert_close(gi.cpu(), xr.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", POOL_CASES[1:5], ids=POOL_IDS[1:5])
def test_max_pool2d_dtypes(backend, kernel, stride, padding, dilation, ceil_mode, dtype):
    # randn in half precision has ties; torch's CUDA kernel breaks them the same way (first max).
    x = torch.randn(4, 5, 13, 12, device=backend.device).to(dtype)
    vals, idx = backend.ops.max_pool2d(x, list(kernel), list(stride), list(padding), list(dilation), ceil_mode)
    rvals, ridx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    assert vals.dtype == dtype
    assert torch.equal(vals, rvals)
    assert torch.equal(idx, ridx)
    go = torch.randn(vals.shape, device=backend.device).to(dtype)
    gi = backend.ops._max_pool2d_backward(go, x, idx, list(kernel), list(stride), list(padding), list(dilation), ceil_mode)
    # Reference: the same routing in float64 (x's values, so the same argmax), rounded once to dtype:
    # the kernel sums its few overlapping terms in float32 and rounds once (torch's CPU kernel rounds
    # after every addition in bfloat16, which differs by an ulp where windows overlap).
    xr = x.detach().double().cpu().requires_grad_()
    F.max_pool2d(xr, kernel, stride, padding, dilation, ceil_mode).backward(go.double().cpu())
    torch.testing.assert_close(gi.float().cpu(), xr.grad.to(dtype).float(), rtol=1e-2, atol=1e-3)


def test_max_pool2d_ties_first_max_wins(backend):
    x = torch.randint(0, 3, (2, 3, 10, 10)).double()
    vals, idx = backend.ops.max_pool2d(x.to(backend.device), [3, 3], [2, 2], [1, 1], [1, 1], False)
    rvals, ridx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(vals.cpu(), rvals) and torch.equal(idx.cpu(), ridx)


@pytest.mark.usefixtures("poison_cuda")
def test_max_pool2d_nan_and_inf(backend):
    x = _perm_input((2, 2, 9, 9))
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 4, 5] = float("nan")
    x[0, 1, 4, 6] = float("nan")  # two NaNs in one window: torch reports the last one
    x[1, 0] = float("-inf")  # whole plane -inf: torch reports each window's first in-bounds tap
    x[1, 1, :3, :3] = float("inf")
    for k, s, p in [(3, 2, 1), (2, 2, 0), (3, 1, 0)]:
        vals, idx = backend.ops.max_pool2d(x.to(backend.device), [k, k], [s, s], [p, p], [1, 1], False)
        rvals, ridx = F.max_pool2d(x, k, s, p, return_indices=True)
        torch.testing.assert_close(vals.cpu(), rvals, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(idx.cpu(), ridx)
        assert torch.isnan(vals[0, 0]).any()


@pytest.mark.usefixtures("poison_cuda")
def test_max_pool2d_noncontiguous_and_channels_last(backend):
    x = _perm_input((2, 4, 10, 9)).to(backend.device)
    for x2 in (x.to(memory_format=torch.channels_last), x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
               torch.stack([x, x], dim=-1)[..., 1]):
        assert not x2.is_contiguous()
        vals, idx = backend.ops.max_pool2d(x2, [3, 3], [2, 2], [1, 1], [1, 1], True)
        rvals, ridx = F.max_pool2d(x.cpu(), 3, 2, 1, ceil_mode=True, return_indices=True)
        assert torch.equal(vals.cpu(), rvals) and torch.equal(idx.cpu(), ridx)
        go = torch.randn(vals.shape, dtype=vals.dtype, device=backend.device).to(memory_format=torch.channels_last)
        gi = backend.ops._max_pool2d_backward(go, x2, idx.transpose(2, 3).contiguous().transpose(2, 3),
                                      [3, 3], [2, 2], [1, 1], [1, 1], True)
        xr = x.detach().cpu().clone().requires_grad_()
        F.max_pool2d(xr, 3, 2, 1, ceil_mode=True).backward(go.cpu())
        torch.testing.assert_close(gi.cpu(), xr.grad)


@pytest.mark.usefixtures("poison_cuda")
def test_max_pool2d_batch0(backend):
    x = torch.randn(0, 3, 8, 8, device=backend.device)
    vals, idx = backend.ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert vals.shape == idx.shape == (0, 3, 4, 4)
    gi = backend.ops._max_pool2d_backward(vals, x, idx, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert gi.shape == x.shape


def test_max_pool2d_backward_is_deterministic(backend):
    x = torch.randn(16, 32, 28, 28, device=backend.device)
    vals, idx = backend.ops.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    go = torch.randn_like(vals)
    first = backend.ops._max_pool2d_backward(go, x, idx, [3, 3], [2, 2], [1, 1], [1, 1], False)
    for _ in range(2):
        assert torch.equal(first, backend.ops._max_pool2d_backward(go, x, idx, [3, 3], [2, 2], [1, 1], [1, 1], False))


def test_max_pool2d_cpu_and_cuda_agree(backend):
    x = _perm_input((3, 4, 11, 10))
    for case in POOL_CASES:
        args = [list(a) for a in case[:4]] + [case[4]]
        v_gpu, i_gpu = backend.ops.max_pool2d(x.to(backend.device), *args)
        v_cpu, i_cpu = ops.max_pool2d(x, *args)
        assert torch.equal(v_gpu.cpu(), v_cpu) and torch.equal(i_gpu.cpu(), i_cpu)
        go = torch.randn(v_cpu.shape, dtype=torch.float64)
        torch.testing.assert_close(backend.ops._max_pool2d_backward(go.to(backend.device), x.to(backend.device), i_gpu, *args).cpu(),
                                   ops._max_pool2d_backward(go, x, i_cpu, *args))


# ----------------------------------------------------------------------------- past 2^31 elements


def _large_ok(gib):
    if os.environ.get("FASTCONV_RUN_LARGE") != "1":
        return False
    free, _ = torch.cuda.mem_get_info()
    return free >= gib * 2**30


@pytest.mark.cuda
@pytest.mark.large
@pytest.mark.slow
def test_large_max_pool2d_int64_indexing():
    # 33 * 8192^2 > 2^31 elements: the kernels must take their int64 path (an int index would wrap
    # and read or write the wrong planes). Checked against torch on the last planes.
    if not _large_ok(24):
        pytest.skip("set FASTCONV_RUN_LARGE=1 on a GPU with >= 24 GiB free")
    x = torch.randn(1, 33, 8192, 8192, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    vals, idx = ops.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    tail = x[:, -2:].contiguous()
    rvals, ridx = F.max_pool2d(tail, 3, 2, 1, return_indices=True)
    assert torch.equal(vals[:, -2:], rvals) and torch.equal(idx[:, -2:], ridx)
    go = torch.ones_like(vals)
    gi = ops._max_pool2d_backward(go, x, idx, [3, 3], [2, 2], [1, 1], [1, 1], False)
    del x, vals
    tr = tail.clone().requires_grad_()
    F.max_pool2d(tr, 3, 2, 1).backward(go[:, -2:])
    assert torch.equal(gi[:, -2:], tr.grad)


@pytest.mark.cuda
@pytest.mark.large
@pytest.mark.slow
def test_large_conv2d_int64_indexing():
    # One image whose column matrix has 36 * 8192^2 > 2^31 entries: im2col and col2im take the int64
    # path. A second test input of 33 such planes passes 2^31 elements in the input itself.
    if not _large_ok(32):
        pytest.skip("set FASTCONV_RUN_LARGE=1 on a GPU with >= 32 GiB free")
    x = torch.randn(1, 4, 8192, 8192, device="cuda", dtype=torch.float16)
    w = (torch.randn(2, 4, 3, 3, device="cuda") / 6).to(torch.float16)
    out = ops.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    go = torch.randn_like(out)
    gi, gw, _ = ops._conv2d_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, False])
    xr = x.float().requires_grad_()
    wr = w.float().requires_grad_()
    ref = F.conv2d(xr, wr, None, 1, 1)
    rgi, rgw = torch.autograd.grad(ref, (xr, wr), go.float())
    assert (out.float() - ref).abs().max().item() < 1e-2 * max(1.0, ref.abs().max().item())
    assert (gi.float() - rgi).abs().max().item() < 1e-2 * max(1.0, rgi.abs().max().item())
    assert (gw.float() - rgw).abs().max().item() < 2e-2 * max(1.0, rgw.abs().max().item())
    del x, xr, out, go, gi, ref, rgi

    # Input past 2^31 elements, chunked one image at a time: host-side offsets must be int64.
    x = torch.randn(33, 1, 8192, 8192, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    w = (torch.randn(1, 1, 3, 3, device="cuda") / 3).to(torch.float16)
    out = ops.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    ref = F.conv2d(x[-2:].float(), w.float(), None, 1, 1)
    assert (out[-2:].float() - ref).abs().max().item() < 1e-2 * max(1.0, ref.abs().max().item())
