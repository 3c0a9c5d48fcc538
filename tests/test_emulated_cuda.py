"""The CUDA kernels' own sources, run on the CPU (torch.ops.fastconv_emulated; csrc/cuda/backend.cuh).

tests/test_cuda.py runs every CUDA test case on this backend too. This file adds what only the
emulator reaches on small shapes: chunks of several images (batch > images per chunk > 1), the int64
index path, blocks run in other orders, CUDA's launch limits; and the regression tests of issue 10's
defects on every backend they touch (the CPU kernels and the CUDA kernels, emulated).
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import EMULATED_MISSING, emulated_knobs
from test_cuda import (
    CONV_CASES,
    CONV_IDS,
    POOL_CASES,
    POOL_IDS,
    POOL_SHAPES,
    _perm_input,
    assert_close_scaled,
    make_conv,
    reference_conv,
)

pytestmark = pytest.mark.emulated_cuda

E = torch.ops.fastconv_emulated if EMULATED_MISSING is None else None
ops = torch.ops.fastconv

# The CPU kernels and the emulated CUDA kernels, for the defect regressions.
CPU_AND_EMULATED = [pytest.param("cpu", id="cpu"), pytest.param("emulated", id="emulated")]


def _ops(which):
    return torch.ops.fastconv if which == "cpu" else torch.ops.fastconv_emulated


def _bytes_per_image(x, w, stride, padding, dilation):
    # (C*KH*KW + OC) * OH * OW elements: what conv2d.cu's images_per_chunk divides the bound by.
    n, c, h, wd = x.shape
    oc, _, kh, kw = w.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (c * kh * kw + oc) * oh * ow * x.element_size()


def test_schemas_match_fastconv():
    for name in ("conv2d", "_conv2d_backward", "max_pool2d", "_max_pool2d_backward", "conv2d_relu"):
        ours = str(getattr(E, name).default._schema)
        theirs = str(getattr(ops, name).default._schema)
        assert ours == theirs.replace("fastconv::", "fastconv_emulated::"), name


# ----------------------------------------------------------------------------- chunks and int64 indexing

MODES = ["chunk2", "index64", "chunk2-index64", "chunk1"]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_chunks_and_index64(case, dtype, mode):
    """Forward and backward with the workspace bound set to two images (chunks of 2 and a remainder)
    or one, and/or the int64 index path forced, against the float64 reference."""
    x, w, b, stride, padding, dilation, groups = make_conv(case, dtype, "cpu")
    per_image = _bytes_per_image(x, w, stride, padding, dilation)
    images = 2 if "chunk2" in mode else 1 if "chunk1" in mode else 0
    with emulated_knobs(workspace=images * per_image, index64="index64" in mode):
        E._reset_counters()
        out = E.conv2d(x, w, b, stride, padding, dilation, groups)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        gi, gw, gb = E._conv2d_backward(go, x, w, stride, padding, dilation, groups, [True, True, True])
        launches, gemms, _, peak = E._counters()
    ref, (rgi, rgw, rgb) = reference_conv(x, w, b, stride, padding, dilation, groups, go)
    assert_close_scaled(out, ref, dtype, "output")
    assert_close_scaled(gi, rgi, dtype, "grad_input")
    assert_close_scaled(gw, rgw, dtype, "grad_weight")
    assert_close_scaled(gb, rgb, dtype, "grad_bias")
    pointwise = w.shape[2:] == (1, 1) and stride == (1, 1) and padding == (0, 0) and groups == 1
    if images and x.shape[0] > 1 and not pointwise:
        # the bound took effect: the largest workspace holds exactly `images` images
        # (+ the GEMM-layout buffer only when a chunk has more than one image)
        n, c, _, _ = x.shape
        rows = c * w.shape[2] * w.shape[3]
        expect = per_image * images if images > 1 else per_image * rows // (rows + w.shape[0])
        assert peak == expect
        assert launches >= 2 and gemms >= 2


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("shape", POOL_SHAPES)
@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", POOL_CASES, ids=POOL_IDS)
def test_max_pool2d_index64(kernel, stride, padding, dilation, ceil_mode, shape):
    x = _perm_input(shape)
    args = [list(kernel), list(stride), list(padding), list(dilation), ceil_mode]
    with emulated_knobs(index64=True):
        vals, idx = E.max_pool2d(x, *args)
        go = torch.randn(vals.shape, dtype=torch.float64)
        gi = E._max_pool2d_backward(go, x, idx, *args)
    rvals, ridx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    assert torch.equal(vals, rvals) and torch.equal(idx, ridx)
    xr = x.clone().requires_grad_()
    F.max_pool2d(xr, kernel, stride, padding, dilation, ceil_mode).backward(go)
    torch.testing.assert_close(gi, xr.grad)


# ----------------------------------------------------------------------------- the emulated launcher


def test_block_order_does_not_change_results():
    """Blocks run in a shuffled order, a new one per launch and seed: results must be bitwise equal."""
    x, w, b, stride, padding, dilation, groups = make_conv(CONV_CASES[2], torch.float32, "cpu")
    go = torch.randn(E.conv2d(x, w, b, stride, padding, dilation, groups).shape)
    xp = torch.randn(2, 3, 17, 16)
    runs = []
    for seed in (1, 2, 3):
        E._set_seed(seed)
        with emulated_knobs(workspace=_bytes_per_image(x, w, stride, padding, dilation) * 2):
            out = E.conv2d(x, w, b, stride, padding, dilation, groups)
            grads = E._conv2d_backward(go, x, w, stride, padding, dilation, groups, [True, True, True])
        vals, idx = E.max_pool2d(xp, [3, 3], [2, 2], [1, 1], [1, 1], False)
        gp = E._max_pool2d_backward(torch.ones_like(vals), xp, idx, [3, 3], [2, 2], [1, 1], [1, 1], False)
        runs.append((out, *grads, vals, idx, gp))
    for other in runs[1:]:
        for a, b_ in zip(runs[0], other):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("grid,block", [((3, 1, 1), (256, 1, 1)), ((2, 3, 2), (4, 2, 3)),
                                        ((1, 65535, 1), (1, 1, 1)), ((1, 1, 1), (1024, 1, 1))])
def test_launcher_runs_every_thread_once(grid, block):
    hits = E._launch_test(list(grid), list(block))
    assert hits.numel() == grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2]
    assert torch.all(hits == 1)


@pytest.mark.parametrize("grid,block,match", [
    ((0, 1, 1), (256, 1, 1), "empty grid"),
    ((1, 65536, 1), (1, 1, 1), "exceeds CUDA's limits"),
    ((1, 1, 65536), (1, 1, 1), "exceeds CUDA's limits"),
    ((1, 1, 1), (1025, 1, 1), "at most 1024 threads"),
    ((1, 1, 1), (64, 32, 1), "at most 1024 threads"),
    ((1, 1, 1), (1, 1, 65), "z at most 64"),
])
def test_launcher_enforces_cuda_limits(grid, block, match):
    with pytest.raises(RuntimeError, match=match):
        E._launch_test(list(grid), list(block))


def test_counters_count_launches():
    x, w, b, stride, padding, dilation, groups = make_conv(CONV_CASES[0], torch.float32, "cpu")
    E._reset_counters()
    E.conv2d(x, w, b, stride, padding, dilation, groups)
    launches, gemms, ws, peak = E._counters()
    # MNIST conv2 at batch 100: one chunk, so one im2col, one GEMM, one layout kernel (+ bias)
    assert (launches, gemms) == (2, 1)
    assert ws == peak == (32 * 9 + 64) * 100 * 14 * 14 * 4


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv2d_relu_fuses_relu_into_the_layout_kernel(case, dtype):
    """conv2d_relu (fastconv.fuse()) on the CUDA kernels: relu(conv2d) exactly, NaN kept, and on the
    chunked path no launch beyond conv2d's (ReLU in the bias/layout kernel)."""
    x, w, b, stride, padding, dilation, groups = make_conv(case, dtype, "cpu")
    x = x.clone()
    if x.numel():
        x.view(-1)[0] = float("nan")
    E._reset_counters()
    plain = E.conv2d(x, w, b, stride, padding, dilation, groups)
    plain_launches = E._counters()[0]
    E._reset_counters()
    fused = E.conv2d_relu(x, w, b, stride, padding, dilation, groups)
    fused_launches = E._counters()[0]
    torch.testing.assert_close(fused, plain.relu(), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(fused).any() == torch.isnan(plain).any()
    pointwise = w.shape[2:] == (1, 1) and stride == (1, 1) and padding == (0, 0) and groups == 1
    if x.shape[0] > 1 and not pointwise:
        assert fused_launches == plain_launches


# ----------------------------------------------------------------------------- issue 10's defects


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("which", CPU_AND_EMULATED)
@pytest.mark.parametrize("shape,stride,padding,dilation", [
    ((1, 1, 1, 1), (2**32, 1), (0, 0), (1, 1)),          # stride cut to int is 0: division by zero
    ((1, 1, 1, 1), (2**33, 2**33), (2**32, 2**32), (1, 1)),  # padding cut to int is 0: x*w instead of 0
    ((1, 2, 3, 1), (10**9, 1), (3 * 10**9 // 2, 0), (1, 1)),  # 2 * padding overflows int
    ((2, 2, 5, 6), (2**31, 2**31), (1, 2**31 - 1), (1, 1)),
    ((1, 1, 4, 4), (1, 1), (1, 1), (2**31 + 1, 1)),       # dilation past int with a 1-tap kernel height
])
def test_window_parameters_past_int32(which, shape, stride, padding, dilation):
    # Issue 10 (4a): kernels that checked only element counts for their int path cut stride,
    # padding and dilation to int. torch accepts these values and so must we.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    kh = 1 if dilation[0] > 2**31 else 2 if shape[2] > 1 else 1
    w = torch.randn(3, shape[1], kh, 1, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    o = _ops(which)
    out = o.conv2d(x, w, b, list(stride), list(padding), list(dilation), 1)
    ref, (rgi, rgw, rgb) = reference_conv(x, w, b, stride, padding, dilation, 1, torch.ones(out.shape, dtype=torch.float64))
    assert_close_scaled(out, ref, torch.float64, "output")
    gi, gw, gb = o._conv2d_backward(torch.ones_like(out), x, w, list(stride), list(padding), list(dilation), 1,
                                    [True, True, True])
    assert_close_scaled(gi, rgi, torch.float64, "grad_input")
    assert_close_scaled(gw, rgw, torch.float64, "grad_weight")
    assert_close_scaled(gb, rgb, torch.float64, "grad_bias")


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("which", CPU_AND_EMULATED)
def test_max_pool2d_stride_past_int32(which):
    # torch refuses a stride past int32 for pooling; one output per row is the same as any stride
    # >= the input height, which torch does accept.
    x = _perm_input((2, 3, 5, 7))
    o = _ops(which)
    vals, idx = o.max_pool2d(x, [2, 3], [2**32, 2], [1, 1], [1, 1], False)
    rvals, ridx = F.max_pool2d(x, (2, 3), (8, 2), 1, return_indices=True)
    assert torch.equal(vals, rvals) and torch.equal(idx, ridx)
    go = torch.randn(vals.shape, dtype=torch.float64)
    gi = o._max_pool2d_backward(go, x, idx, [2, 3], [2**32, 2], [1, 1], [1, 1], False)
    xr = x.clone().requires_grad_()
    F.max_pool2d(xr, (2, 3), (8, 2), 1).backward(go)
    torch.testing.assert_close(gi, xr.grad)


@pytest.mark.parametrize("which", CPU_AND_EMULATED)
def test_window_parameters_past_2_48_are_named(which):
    o = _ops(which)
    x = torch.randn(1, 1, 3, 3)
    with pytest.raises(RuntimeError, match=r"padding must be at most 2\^48"):
        o.conv2d(x, torch.randn(1, 1, 1, 1), None, [1, 1], [2**50, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"stride must be at most 2\^48"):
        o.max_pool2d(x, [2, 2], [2**60, 1], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match=r"dilation \(.*\) times kernel size - 1"):
        o.conv2d(x, torch.randn(1, 1, 4, 1), None, [1, 1], [0, 0], [2**47, 1], 1)


@pytest.mark.parametrize("which", CPU_AND_EMULATED)
def test_zero_height_or_width_input_raises(which):
    # Issue 10 (4b): an empty plane whose padding makes the output non-empty; torch raises
    # "Only zero batch or zero channel inputs are supported".
    o = _ops(which)
    w = torch.randn(4, 3, 3, 3)
    for shape in [(2, 3, 0, 5), (2, 3, 5, 0)]:
        with pytest.raises(RuntimeError, match="Only zero batch or zero channel inputs are supported"):
            F.conv2d(torch.randn(shape), w, None, 1, 2)
        with pytest.raises(RuntimeError, match="only zero batch or zero channel inputs are supported"):
            o.conv2d(torch.randn(shape), w, None, [1, 1], [2, 2], [1, 1], 1)
    # zero batch stays fine, as in torch
    out = o.conv2d(torch.randn(0, 3, 0, 5), w, None, [1, 1], [2, 2], [1, 1], 1)
    assert out.shape == F.conv2d(torch.randn(0, 3, 0, 5), w, None, 1, 2).shape


@pytest.mark.parametrize("which", CPU_AND_EMULATED)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("batch", [2, 0])
def test_float8_is_rejected_by_name(which, dtype, batch):
    # Issue 10 (4c): float8 passed the dtype check and failed with a generic "not implemented"
    # (or returned a float8 tensor at batch 0).
    o = _ops(which)
    x = torch.randn(batch, 2, 6, 6).to(dtype)
    w = torch.randn(3, 2, 3, 3).to(dtype)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(RuntimeError, match=rf"float32, float64, float16 or bfloat16\), got Float8_{name[7:]}"):
        o.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"float32, float64, float16 or bfloat16\) or an integer tensor .*got Float8"):
        o.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match=r"float32, float64, float16 or bfloat16\), got Float8"):
        o._conv2d_backward(torch.zeros(batch, 3, 6, 6).to(dtype), x, w, [1, 1], [1, 1], [1, 1], 1,
                           [True, True, True])


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("which", CPU_AND_EMULATED)
def test_max_pool2d_backward_ignores_indices_outside_their_window(which):
    # Issue 10 (4d): one behaviour on every backend (csrc/conv_params.h, check_max_pool2d_backward):
    # grad_output[o] reaches indices[o] only when that position lies in window o; any other index
    # (elsewhere in the plane, negative, past the plane) contributes nothing.
    x = _perm_input((2, 3, 9, 8))
    args = [[3, 3], [2, 2], [1, 1], [1, 1], False]
    o = _ops(which)
    vals, idx = o.max_pool2d(x, *args)
    bad = idx.clone()
    bad[0, 0, 0, 0] = 70          # in the plane, far from window (0, 0)
    bad[0, 1, 2, 1] = -1
    bad[1, 2, 3, 3] = 72          # one past the plane
    bad[1, 0, 1, 1] = 9 * 8 - 1   # last element of the plane, not in window (1, 1)
    bad[1, 1, 4, 3] = idx[1, 1, 4, 3] - 3 * 8  # three rows up: outside the 3-row window, inside the plane
    dropped = bad != idx
    assert int(dropped.sum()) == 5
    go = torch.randn(vals.shape, dtype=torch.float64)
    gi = o._max_pool2d_backward(go, x, bad, *args)
    xr = x.clone().requires_grad_()
    F.max_pool2d(xr, 3, 2, 1).backward(go.masked_fill(dropped, 0))
    torch.testing.assert_close(gi, xr.grad, rtol=0, atol=0)
