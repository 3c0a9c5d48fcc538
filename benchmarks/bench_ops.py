#!/usr/bin/env python
"""Op-level benchmark of fastconv's conv2d and max_pool2d against torch (and a NumPy im2col).

    python benchmarks/bench_ops.py --quick              # the issue #2 gate, short timing (< 1 min on 2 cores)
    python benchmarks/bench_ops.py --suite core         # the same rows, full timing
    python benchmarks/bench_ops.py                      # every layer of the seed models (see --help)

Every row is checked first (fastconv vs torch: outputs and all gradients, and the NumPy baseline vs
torch), then timed with torch.utils.benchmark (Timer.blocked_autorange; Compare prints the table).
Results go to stdout, a JSON file and a PNG chart of fastconv/peer time ratios. benchmarks/README.md
explains the columns.
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.append(ROOT)  # an in-place build (setup.py build_ext --inplace / pip install -e .) of fastconv
import numpy_im2col  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Max |a - b| / max |b| allowed per tensor, fastconv vs torch in the same dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
TOLERANCE_TF32 = 5e-3


# --------------------------------------------------------------------------------------------------
# Implementations under test. All peers expose the same calls so every timed statement is identical
# in shape for every peer: the public F-style function (forward, forward+backward through autograd)
# and the backward op called directly on a precomputed grad_output (backward-only rows).
# --------------------------------------------------------------------------------------------------

def _aten_conv2d_backward(grad_out, x, w, stride, padding, dilation, groups, mask):
    return torch.ops.aten.convolution_backward(
        grad_out, x, w, [w.shape[0]], list(stride), list(padding), list(dilation), False, [0, 0], groups, list(mask))


def _aten_max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode):
    return torch.ops.aten.max_pool2d_with_indices(
        x, list(kernel), list(stride), list(padding), list(dilation), ceil_mode)


def _aten_max_pool2d_backward(grad_out, x, indices, kernel, stride, padding, dilation, ceil_mode):
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad_out, x, list(kernel), list(stride), list(padding), list(dilation), ceil_mode, indices)


@dataclass
class Impl:
    name: str
    conv2d: Callable            # (x, w, b, stride, padding, dilation, groups) -> out, autograd-aware
    conv2d_backward: Callable   # (grad_out, x, w, stride, padding, dilation, groups, mask) -> (gi, gw, gb)
    max_pool2d: Callable        # (x, kernel, stride, padding, dilation, ceil_mode) -> out, autograd-aware
    max_pool2d_with_indices: Callable  # same args -> (out, indices)
    max_pool2d_backward: Callable  # (grad_out, x, indices, kernel, stride, padding, dilation, ceil_mode)
    context: Callable = contextlib.nullcontext  # entered around checks and timing (e.g. cuDNN off)
    note: str = ""
    pools: bool = True          # whether this peer is timed on max_pool2d rows


def torch_impl(name="torch", context=contextlib.nullcontext, note="", pools=True):
    return Impl(
        name=name,
        conv2d=lambda x, w, b, s, p, d, g: F.conv2d(x, w, b, s, p, d, g),
        conv2d_backward=_aten_conv2d_backward,
        max_pool2d=lambda x, k, s, p, d, c: F.max_pool2d(x, k, s, p, d, ceil_mode=c),
        max_pool2d_with_indices=_aten_max_pool2d_with_indices,
        max_pool2d_backward=_aten_max_pool2d_backward,
        context=context, note=note, pools=pools)


def load_fastconv(standin=False):
    """The fastconv peer: its public functional API plus the registered backward ops.

    With standin=True and fastconv not importable, torch's functions stand in behind the same
    interface (for developing these scripts before the extension exists); the output says so.
    """
    try:
        import fastconv
        import fastconv.functional as fcf
        ops = torch.ops.fastconv
        conv_bwd, pool_fwd, pool_bwd = ops._conv2d_backward, ops.max_pool2d, ops._max_pool2d_backward
    except Exception as exc:  # ImportError, or an extension that failed to load / register
        if not standin:
            raise SystemExit(
                f"bench_ops: cannot use fastconv ({type(exc).__name__}: {exc}).\n"
                "Build it first: pip install --no-build-isolation -e .  (or pass --standin to run the "
                "scripts with torch standing in for fastconv, for development only)")
        impl = torch_impl("fastconv", note="STAND-IN: torch functions, fastconv not importable")
        return impl, {"available": False, "standin": True, "error": f"{type(exc).__name__}: {exc}"}

    impl = Impl(
        name="fastconv",
        conv2d=lambda x, w, b, s, p, d, g: fcf.conv2d(x, w, b, s, p, d, g),
        conv2d_backward=lambda go, x, w, s, p, d, g, m: conv_bwd(go, x, w, list(s), list(p), list(d), g, list(m)),
        max_pool2d=lambda x, k, s, p, d, c: fcf.max_pool2d(x, k, s, p, d, ceil_mode=c),
        max_pool2d_with_indices=lambda x, k, s, p, d, c: pool_fwd(x, list(k), list(s), list(p), list(d), c),
        max_pool2d_backward=lambda go, x, i, k, s, p, d, c: pool_bwd(go, x, i, list(k), list(s), list(p), list(d), c),
    )
    info = {"available": True, "standin": False, "file": getattr(fastconv, "__file__", None),
            "version": getattr(fastconv, "__version__", None)}
    try:
        info["has_cuda_kernels"] = bool(fastconv.has_cuda_kernels())
    except Exception:  # older builds without the helper
        pass
    return impl, info


def cudnn_disabled(tf32):
    # ATen's own CUDA path (im2col + cuBLAS GEMM, "slow_conv2d") is what torch runs with cuDNN off.
    return torch.backends.cudnn.flags(enabled=False, benchmark=False, deterministic=False, allow_tf32=tf32)


@contextlib.contextmanager
def onednn_disabled():
    # ATen's own CPU path (im2col + MKL/BLAS GEMM, "slow_conv2d") is what torch runs with oneDNN off.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "TF32 on top of oneDNN is for Intel GPUs"
        with torch.backends.mkldnn.flags(enabled=False):
            yield


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvCase:
    layer: str
    n: int
    c: int
    h: int
    w: int
    cout: int
    kh: int
    kw: int
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    bias: bool = True
    op = "conv2d"

    @property
    def out_hw(self):
        return numpy_im2col.output_size(self.h, self.w, self.kh, self.kw, self.stride, self.padding, self.dilation)

    def geometry(self):
        return (self.n, self.c, self.h, self.w, self.cout, self.kh, self.kw, self.stride, self.padding,
                self.dilation, self.groups, self.bias)

    def shape_str(self):
        s = f"({self.n},{self.c},{self.h},{self.w})x({self.cout},{self.c // self.groups},{self.kh},{self.kw})"
        if self.stride != (1, 1):
            s += f" s{_hw(self.stride)}"
        if self.padding != (0, 0):
            s += f" p{_hw(self.padding)}"
        if self.dilation != (1, 1):
            s += f" d{_hw(self.dilation)}"
        if self.groups != 1:
            s += f" g{self.groups}"
        return s

    def macs(self):
        oh, ow = self.out_hw
        return self.n * self.cout * oh * ow * (self.c // self.groups) * self.kh * self.kw

    def sizes(self):
        oh, ow = self.out_hw
        return {"input": self.n * self.c * self.h * self.w,
                "weight": self.cout * (self.c // self.groups) * self.kh * self.kw,
                "bias": self.cout if self.bias else 0, "output": self.n * self.cout * oh * ow}


@dataclass(frozen=True)
class PoolCase:
    layer: str
    n: int
    c: int
    h: int
    w: int
    kernel: tuple
    stride: tuple
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    ceil_mode: bool = False
    op = "max_pool2d"

    @property
    def out_hw(self):
        def one(size, k, s, p, d):
            eff = d * (k - 1) + 1
            if self.ceil_mode:
                o = -(-(size + 2 * p - eff) // s) + 1
                if (o - 1) * s >= size + p:
                    o -= 1
                return o
            return (size + 2 * p - eff) // s + 1
        return (one(self.h, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0]),
                one(self.w, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1]))

    def geometry(self):
        return (self.n, self.c, self.h, self.w, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)

    def shape_str(self):
        s = f"({self.n},{self.c},{self.h},{self.w}) k{_hw(self.kernel)} s{_hw(self.stride)}"
        if self.padding != (0, 0):
            s += f" p{_hw(self.padding)}"
        if self.dilation != (1, 1):
            s += f" d{_hw(self.dilation)}"
        if self.ceil_mode:
            s += " ceil"
        return s

    def window_ops(self):
        oh, ow = self.out_hw
        return self.n * self.c * oh * ow * self.kernel[0] * self.kernel[1]

    def sizes(self):
        oh, ow = self.out_hw
        return {"input": self.n * self.c * self.h * self.w, "output": self.n * self.c * oh * ow}


def _hw(t):
    return str(t[0]) if t[0] == t[1] else f"{t[0]}x{t[1]}"


def _conv(layer, n, c, hw, cout, k, stride=1, padding=0):
    return ConvCase(layer, n, c, hw, hw, cout, k, k, (stride, stride), (padding, padding))


def _pool(layer, n, c, hw, k, stride):
    return PoolCase(layer, n, c, hw, hw, (k, k), (stride, stride))


def small_model_cases(n):
    """The seed models on 28x28 MNIST images: conv and pool layers in order."""
    return [
        _conv("mnist_cnn.conv1", n, 1, 28, 32, 3, padding=1),
        _pool("mnist_cnn.pool1", n, 32, 28, 2, 2),
        _conv("mnist_cnn.conv2", n, 32, 14, 64, 3, padding=1),
        _pool("mnist_cnn.pool2", n, 64, 14, 2, 2),
        _conv("lenet.conv1", n, 1, 28, 6, 5),
        _pool("lenet.pool1", n, 6, 24, 2, 2),
        _conv("lenet.conv2", n, 6, 12, 16, 5),
        _pool("lenet.pool2", n, 16, 8, 2, 2),
        _conv("simple_convnet.conv1", n, 1, 28, 30, 5),
        _pool("simple_convnet.pool1", n, 30, 24, 2, 2),
        # configurable_cnn's default: 3x3 "same" convs 1->32->64 at 28x28 with 2x2 pools; the same
        # geometry as mnist_cnn, so these rows merge into mnist_cnn's (listed as aliases).
        _conv("configurable_cnn.conv1", n, 1, 28, 32, 3, padding=1),
        _pool("configurable_cnn.pool1", n, 32, 28, 2, 2),
        _conv("configurable_cnn.conv2", n, 32, 14, 64, 3, padding=1),
        _pool("configurable_cnn.pool2", n, 64, 14, 2, 2),
    ]


def alexnet_cases(n, size=224):
    s1 = (size + 2 * 2 - 11) // 4 + 1   # 55
    p1 = (s1 - 3) // 2 + 1              # 27
    p2 = (p1 - 3) // 2 + 1              # 13
    return [
        _conv("alexnet.conv1", n, 3, size, 64, 11, stride=4, padding=2),
        _pool("alexnet.pool1", n, 64, s1, 3, 2),
        _conv("alexnet.conv2", n, 64, p1, 192, 5, padding=2),
        _pool("alexnet.pool2", n, 192, p1, 3, 2),
        _conv("alexnet.conv3", n, 192, p2, 384, 3, padding=1),
        _conv("alexnet.conv4", n, 384, p2, 256, 3, padding=1),
        _conv("alexnet.conv5", n, 256, p2, 256, 3, padding=1),
        _pool("alexnet.pool3", n, 256, p2, 3, 2),
    ]


def resnet_cases(n, scale=1):
    return [
        _conv("resnet.layer1", n, 64, 56 // scale, 64, 3, padding=1),
        _conv("resnet.layer2", n, 128, 28 // scale, 128, 3, padding=1),
        _conv("resnet.layer3", n, 256, 14 // scale, 256, 3, padding=1),
    ]


def core_cases(tiny=False):
    """The issue #2 gate: exactly these rows, forward+backward, float32."""
    n, n_alex, n_pool, size = (100, 4, 8, 224) if not tiny else (2, 1, 2, 67)
    small = {c.layer: c for c in small_model_cases(n)}
    alex_conv1 = alexnet_cases(n_alex, size)[0]
    alex_pool1 = alexnet_cases(n_pool, size)[1]
    return [small["mnist_cnn.conv1"], small["mnist_cnn.conv2"], small["lenet.conv2"], small["simple_convnet.conv1"],
            alex_conv1, small["mnist_cnn.pool1"], alex_pool1]


CONV_PASSES = ("fwd", "bwd-input", "bwd-weight", "fwd+bwd")
POOL_PASSES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Row:
    case: object
    pass_: str
    aliases: list = field(default_factory=list)
    core: bool = False

    @property
    def op(self):
        return self.case.op

    @property
    def id(self):
        return f"{self.op}/{self.pass_}/{self.case.layer}/n{self.case.n}"

    @property
    def label(self):
        return f"{self.op} {self.pass_}"

    @property
    def sub_label(self):
        return f"{self.case.layer} {self.case.shape_str()}"


def build_rows(suite, tiny=False):
    """Rows of a suite, in order; cases with the same geometry are merged (the first name wins)."""
    core = core_cases(tiny)
    if suite == "core":
        cases = list(core)
        passes = {"conv2d": ("fwd+bwd",), "max_pool2d": ("fwd+bwd",)}
    elif suite == "full":
        batches = (1, 100, 512) if not tiny else (1, 2)
        alex_batches, size = ((1, 32), 224) if not tiny else ((1, 2), 67)
        cases = []
        for n in batches:
            cases += small_model_cases(n)
        for n in alex_batches:
            cases += alexnet_cases(n, size)
        cases += resnet_cases(8) if not tiny else resnet_cases(2, scale=7)
        cases += core
        passes = {"conv2d": CONV_PASSES, "max_pool2d": POOL_PASSES}
    else:
        raise ValueError(f"unknown suite {suite!r}; expected 'core' or 'full'")
    core_geoms = {(c.op, c.geometry()) for c in core}
    merged = {}
    for c in cases:
        key = (c.op, c.geometry())
        if key in merged:
            if c.layer != merged[key][0].layer and c.layer not in merged[key][1]:
                merged[key][1].append(c.layer)
        else:
            merged[key] = (c, [])
    rows = []
    for key, (c, aliases) in merged.items():
        for p in passes[c.op]:
            rows.append(Row(c, p, aliases, core=(key in core_geoms and p == "fwd+bwd")))
    return rows


# --------------------------------------------------------------------------------------------------
# Inputs, checks and the timed statements
# --------------------------------------------------------------------------------------------------

def make_inputs(case, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    oh, ow = case.out_hw
    if case.op == "conv2d":
        fan_in = (case.c // case.groups) * case.kh * case.kw
        x = torch.randn(case.n, case.c, case.h, case.w, generator=g)
        w = torch.randn(case.cout, case.c // case.groups, case.kh, case.kw, generator=g) / math.sqrt(fan_in)
        b = torch.randn(case.cout, generator=g) if case.bias else None
        go = torch.randn(case.n, case.cout, oh, ow, generator=g)
        t = {"x": x, "w": w, "b": b, "go": go}
    else:
        t = {"x": torch.randn(case.n, case.c, case.h, case.w, generator=g),
             "go": torch.randn(case.n, case.c, oh, ow, generator=g)}
    return {k: (v.to(device=device, dtype=dtype) if v is not None else None) for k, v in t.items()}


def rel_err(a, b):
    if a is None or b is None:
        return 0.0 if (a is None) == (b is None) else float("inf")
    a = torch.as_tensor(a).detach().double().cpu()
    b = torch.as_tensor(b).detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def _conv_args(case):
    return case.stride, case.padding, case.dilation, case.groups


def _pool_args(case):
    return case.kernel, case.stride, case.padding, case.dilation, case.ceil_mode


def _none_if_empty(t):
    return None if t is None or t.numel() == 0 else t


def results_of(impl, case, inp):
    """Everything a row's timed statements produce, computed through the same calls, for the check."""
    out = {}
    with impl.context():
        if case.op == "conv2d":
            args = _conv_args(case)
            x = inp["x"].detach().requires_grad_()
            w = inp["w"].detach().requires_grad_()
            b = inp["b"].detach().requires_grad_() if inp["b"] is not None else None
            y = impl.conv2d(x, w, b, *args)
            leaves = [x, w] + ([b] if b is not None else [])
            grads = torch.autograd.grad(y, leaves, inp["go"])
            out["output"] = y.detach()
            out["autograd.grad_input"], out["autograd.grad_weight"] = grads[0], grads[1]
            if b is not None:
                out["autograd.grad_bias"] = grads[2]
            gi, gw, gb = impl.conv2d_backward(inp["go"], inp["x"], inp["w"], *args, (True, True, b is not None))
            out["op.grad_input"], out["op.grad_weight"] = gi, gw
            if b is not None:
                out["op.grad_bias"] = gb
        else:
            args = _pool_args(case)
            x = inp["x"].detach().requires_grad_()
            y = impl.max_pool2d(x, *args)
            out["output"] = y.detach()
            out["autograd.grad_input"] = torch.autograd.grad(y, x, inp["go"])[0]
            y2, idx = impl.max_pool2d_with_indices(inp["x"], *args)
            out["op.output"] = y2
            out["op.indices"] = idx
            out["op.grad_input"] = impl.max_pool2d_backward(inp["go"], inp["x"], idx, *args)
    return out


def numpy_results(case, npin):
    args = _conv_args(case)
    y, col = numpy_im2col.conv2d_forward(npin["x"], npin["w"], npin["b"], *args, return_col=True)
    mask = (True, True, npin["b"] is not None)
    gi, gw, gb = numpy_im2col.conv2d_backward(npin["go"], npin["x"], npin["w"], *args, mask)
    out = {"output": y, "op.grad_input": gi, "op.grad_weight": gw}
    if npin["b"] is not None:
        out["op.grad_bias"] = gb
    return out


def compare(actual, expected, tol):
    """Per-tensor relative errors; indices are compared exactly (random inputs have no ties)."""
    errs, ok = {}, True
    for k, ref in expected.items():
        if k not in actual:
            continue
        if k.endswith("indices"):
            same = actual[k].shape == ref.shape and bool((actual[k].long().cpu() == ref.long().cpu()).all())
            errs[k] = 0.0 if same else 1.0
            ok &= same
        else:
            e = rel_err(actual[k], ref)
            errs[k] = e
            ok &= e <= tol
    return ok, errs


def timed_statements(impl, case, inp):
    """{pass: zero-argument callable}; identical structure for every torch-tensor peer."""
    if case.op == "conv2d":
        args = _conv_args(case)
        x, w, b, go = inp["x"], inp["w"], inp["b"], inp["go"]
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        br = b.detach().requires_grad_() if b is not None else None
        leaves = [xr, wr] + ([br] if br is not None else [])
        has_b = b is not None

        def fwd_bwd():
            return torch.autograd.grad(impl.conv2d(xr, wr, br, *args), leaves, go)

        return {
            # Inputs that do not require grad: inference, no autograd graph recorded.
            "fwd": lambda: impl.conv2d(x, w, b, *args),
            "bwd-input": lambda: impl.conv2d_backward(go, x, w, *args, (True, False, False)),
            "bwd-weight": lambda: impl.conv2d_backward(go, x, w, *args, (False, True, has_b)),
            "fwd+bwd": fwd_bwd,
        }
    args = _pool_args(case)
    x, go = inp["x"], inp["go"]
    xr = x.detach().requires_grad_()
    with impl.context():
        _, idx = impl.max_pool2d_with_indices(x, *args)

    def fwd_bwd():
        return torch.autograd.grad(impl.max_pool2d(xr, *args), xr, go)

    return {
        "fwd": lambda: impl.max_pool2d(x, *args),
        "bwd": lambda: impl.max_pool2d_backward(go, x, idx, *args),
        "fwd+bwd": fwd_bwd,
    }


def numpy_statements(case, npin):
    args = _conv_args(case)
    x, w, b, go = npin["x"], npin["w"], npin["b"], npin["go"]
    has_b = b is not None

    def fwd_bwd():
        # The tutorial caches the column matrix from forward for backward.
        y, col = numpy_im2col.conv2d_forward(x, w, b, *args, return_col=True)
        return numpy_im2col.conv2d_backward(go, x, w, *args, (True, True, has_b), col=col)

    return {
        "fwd": lambda: numpy_im2col.conv2d_forward(x, w, b, *args),
        "bwd-input": lambda: numpy_im2col.conv2d_backward(go, x, w, *args, (True, False, False)),
        "bwd-weight": lambda: numpy_im2col.conv2d_backward(go, x, w, *args, (False, True, has_b)),
        "fwd+bwd": fwd_bwd,
    }


# --------------------------------------------------------------------------------------------------
# FLOPs, bytes and GPU peaks
# --------------------------------------------------------------------------------------------------

# Dense (no sparsity) peaks from NVIDIA's datasheets, keyed by substrings of the CUDA device name.
# fp32 = CUDA-core FP32 (no tensor cores); tf32/fp16 = tensor-core dense; bw = HBM bandwidth.
GPU_PEAKS = [
    ("H200 NVL", {"name": "H200 NVL", "fp64": 30e12, "fp32": 60e12, "tf32": 417e12, "fp16": 835e12, "bw": 4.8e12}),
    ("H200", {"name": "H200 SXM", "fp64": 34e12, "fp32": 67e12, "tf32": 494.7e12, "fp16": 989.4e12, "bw": 4.8e12}),
    ("H100 NVL", {"name": "H100 NVL", "fp64": 30e12, "fp32": 60e12, "tf32": 417e12, "fp16": 835e12, "bw": 3.9e12}),
    ("H100 PCIe", {"name": "H100 PCIe", "fp64": 25.6e12, "fp32": 51.2e12, "tf32": 378e12, "fp16": 756e12,
                   "bw": 2.0e12}),
    ("H100 80GB HBM3", {"name": "H100 SXM", "fp64": 34e12, "fp32": 67e12, "tf32": 494.7e12, "fp16": 989.4e12,
                        "bw": 3.35e12}),
    ("H100 SXM", {"name": "H100 SXM", "fp64": 34e12, "fp32": 67e12, "tf32": 494.7e12, "fp16": 989.4e12, "bw": 3.35e12}),
]


def gpu_peaks(device_name):
    for key, peaks in GPU_PEAKS:
        if key.lower() in device_name.lower():
            return peaks
    return None


def peak_flops(peaks, dtype, tf32):
    if peaks is None:
        return None
    if dtype == torch.float64:
        return peaks["fp64"]
    if dtype == torch.float32:
        return peaks["tf32"] if tf32 else peaks["fp32"]
    return peaks["fp16"]


def work(row, dtype):
    """(flops, bytes) of one call: flops = 2*MACs per GEMM pass (window compares for pooling);
    bytes = compulsory traffic (read each operand, write each result once)."""
    c, p = row.case, row.pass_
    es = torch.tensor([], dtype=dtype).element_size()
    s = c.sizes()
    if c.op == "conv2d":
        f = 2 * c.macs()
        fwd_b = s["input"] + s["weight"] + s["bias"] + s["output"]
        bi_b = s["output"] + s["weight"] + s["input"]
        bw_b = s["output"] + s["input"] + s["weight"] + s["bias"]
        flops = {"fwd": f, "bwd-input": f, "bwd-weight": f, "fwd+bwd": 3 * f}[p]
        elems = {"fwd": fwd_b, "bwd-input": bi_b, "bwd-weight": bw_b, "fwd+bwd": fwd_b + bi_b + bw_b}[p]
        return flops, elems * es
    f = c.window_ops()
    idx_bytes = 8 * s["output"]  # int64 indices
    fwd_bytes = (s["input"] + s["output"]) * es + idx_bytes
    bwd_bytes = (s["output"] + s["input"]) * es + idx_bytes  # read grad_out + indices, write grad_input
    return ({"fwd": f, "bwd": 0, "fwd+bwd": f}[p],
            {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[p])


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------

def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_busy(interval=1.0):
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat), measured while this process
    sleeps: how much other processes are using the machine. None where /proc/stat does not exist."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (i1 - i0) / max(1, t1 - t0), 3)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def slug(s):
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def git_commit():
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "csrc", "fastconv", "setup.py"], cwd=ROOT,
                               stderr=subprocess.DEVNULL).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def env_info(device, threads):
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "onednn": torch.backends.mkldnn.is_available(),
        "numpy": np.__version__,
        "numpy_blas": numpy_im2col.blas_info(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "threads": threads,
        "numpy_blas_threads": numpy_im2col.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cpu_busy_start": cpu_busy(),  # other processes' share of the CPUs just before starting
    }
    m = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show() + torch.__config__.parallel_info())
    if m:
        info["onednn"] = m.group(1)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_sms"] = props.multi_processor_count
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def pick_clock(kind, gpu, threads):
    """The Timer's clock. thread-cpu counts only this thread's CPU time, so it is exact for one-thread
    CPU work (torch, fastconv, OpenBLAS and CPU autograd all run on the calling thread then) and
    blind to other processes taking the core; with more threads it would miss the workers' time."""
    if kind == "wall":
        return benchmark.utils.timer.timer  # Timer's default: synchronises the accelerator, then wall clock
    if gpu or threads != 1:
        raise SystemExit("--timer thread-cpu needs --device cpu and --threads 1")
    return time.thread_time


def set_tf32(enabled):
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def default_output(prefix, suite_tag, device):
    date = datetime.date.today().strftime("%Y%m%d")
    dev = "cpu" if device.type == "cpu" else "cuda"
    name = f"{prefix}{suite_tag}-{dev}-{slug(device_name(device))}-{date}.json"
    return os.path.join(HERE, "results", name)


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------

def fmt_time(s):
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def time_stats(m, ms):
    """Median, IQR, mean, min and 10th percentile of a merged Measurement's per-call block times."""
    ts = sorted(m.times)
    return {"median": m.median, "iqr": m.iqr, "mean": m.mean, "min": ts[0],
            "p10": ts[min(len(ts) - 1, int(0.1 * len(ts)))], "blocks": len(ts),
            "calls": sum(x.number_per_run * len(x.raw_times) for x in ms)}


def summary_table(records, peers, gpu, stat="median"):
    cols = ["row", "fastconv"]
    for p in peers:
        cols += [p, f"fc/{p}"]
    if gpu:
        cols += ["fc GFLOP/s", "fc GB/s", "fc %peak"]
    else:
        cols += ["fc GFLOP/s"]
    lines = []
    for r in records:
        t = r["times"]
        cells = [r["name"], fmt_time(t.get("fastconv", {}).get(stat))]
        for p in peers:
            cells.append(fmt_time(t.get(p, {}).get(stat)) if p in t else "-")
            ratio = r["ratios"].get(p)
            cells.append(f"{ratio:.2f}" if ratio is not None else "-")
        fc = r.get("fastconv_rate", {})
        g = fc.get("gflops") if r["op"] == "conv2d" else None
        cells.append(f"{g:.1f}" if g else "-")
        if gpu:
            gb = fc.get("gbps")
            cells.append(f"{gb:.1f}" if gb else "-")
            pk = fc.get("peak_fraction")
            cells.append(f"{100 * pk:.1f}%" if pk is not None else "-")
        lines.append(cells)
    widths = [max(len(c[i]) for c in [cols] + lines) for i in range(len(cols))]
    out = ["  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(cols))]
    out.append("  ".join("-" * w for w in widths))
    for c in lines:
        out.append("  ".join(v.ljust(widths[0]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(c)))
    return "\n".join(out)


def plot(records, peers, path, title, stat="median"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["ratios"]]
    if not rows:
        return None
    height = max(3.0, 0.22 * len(rows) * max(1, len(peers)) + 1.5)
    fig, ax = plt.subplots(figsize=(11, min(height, 200)))
    bar_h = 0.8 / max(1, len(peers))
    for j, p in enumerate(peers):
        ys = [i + (j - (len(peers) - 1) / 2) * bar_h for i in range(len(rows))]
        vals = [r["ratios"].get(p) or float("nan") for r in rows]
        # Bars grow from parity (1) so faster and slower read left and right of the line.
        ax.barh(ys, [v - 1 for v in vals], left=1, height=bar_h, label=f"fastconv / {p}")
        for yv, v in zip(ys, vals):
            if math.isfinite(v):
                ax.text(v, yv, f" {v:.2f} ", va="center", ha="left" if v >= 1 else "right", fontsize=6)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    finite = [r["ratios"][p] for r in rows for p in peers if r["ratios"].get(p)]
    if finite:
        ax.set_xlim(min(min(finite), 1) / 2, max(max(finite), 1) * 2)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["name"] for r in rows], fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top, no margins
    ax.set_xlabel(f"time ratio fastconv / peer ({stat} of blocks; < 1: fastconv faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("core", "full"), default=None,
                   help="core: the issue #2 gate rows (fwd+bwd); full: every layer and pass "
                        "(default; core with --quick)")
    p.add_argument("--quick", action="store_true", help="short timing (0.2 s per row and peer); implies --suite core")
    p.add_argument("--tiny", action="store_true", help="shrink batches and images (for tests; same row names)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch, fastconv and NumPy's BLAS (default: torch's)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in cuBLAS/cuDNN (off by default on both sides)")
    p.add_argument("--peers", default=None,
                   help="comma-separated peers: torch, numpy (CPU, float32/64), torch-no-cudnn (GPU), "
                        "torch-no-onednn (CPU). "
                        "Default: torch,numpy on CPU; torch,torch-no-cudnn on GPU")
    p.add_argument("--filter", default=None, help="regex; only rows whose name matches")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds of timing per row and peer (default 0.6; 0.2 with --quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timing rounds per row, alternating the peers; min-run-time is split across them "
                        "(default 3; 2 with --quick)")
    p.add_argument("--json", default=None,
                   help="output JSON path (default benchmarks/results/bench_ops[-suite]-<device>-<date>.json)")
    p.add_argument("--png", default=None, help="output chart path (default: the JSON path with .png)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--timer", choices=("wall", "thread-cpu"), default="wall",
                   help="wall: wall-clock time (default; synchronises the GPU). thread-cpu: CPU time of the calling "
                        "thread (time.thread_time), only with --device cpu --threads 1: immune to other processes "
                        "preempting the benchmark on a shared machine")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="statistic of the block times used for the summary table, ratios, rates and geometric means "
                        "(default median; min estimates the unloaded time on a shared machine). All are in the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--standin", action="store_true",
                   help="if fastconv is not importable, let torch stand in for it (developing the scripts only)")
    args = p.parse_args(argv)
    if args.suite is None:
        args.suite = "core" if args.quick else "full"
    if args.min_run_time is None:
        args.min_run_time = 0.2 if args.quick else 0.6
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    args.rounds = max(1, args.rounds)
    return args


def pick_device(args, script):
    """--device (default: cuda when available) as a torch.device; sets args.device."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{script}: --device cuda but torch.cuda.is_available() is False")
    return torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args, "bench_ops")
    dtype = DTYPES[args.dtype]
    gpu = device.type == "cuda"

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    numpy_im2col.set_num_threads(threads)
    clock = pick_clock(args.timer, gpu, threads)
    tf32 = set_tf32(args.tf32)
    if gpu:
        torch.backends.cudnn.benchmark = True  # torch's best cuDNN algorithm per shape, chosen in warmup
    tol = TOLERANCE[dtype] if not (args.tf32 and gpu and dtype == torch.float32) else TOLERANCE_TF32

    fc, fc_info = load_fastconv(args.standin)
    peer_names = args.peers.split(",") if args.peers else (["torch", "torch-no-cudnn"] if gpu else ["torch", "numpy"])
    impls = {"fastconv": fc}
    use_numpy = False
    for name in peer_names:
        if name == "torch":
            impls[name] = torch_impl(note="cuDNN, benchmark=True" if gpu else "oneDNN/native")
        elif name == "torch-no-cudnn":
            if not gpu:
                raise SystemExit("bench_ops: peer torch-no-cudnn needs --device cuda")
            impls[name] = torch_impl(name, context=lambda: cudnn_disabled(args.tf32), pools=False,
                                     note="torch.backends.cudnn.flags(enabled=False): ATen im2col + cuBLAS")
        elif name == "torch-no-onednn":
            if gpu:
                raise SystemExit("bench_ops: peer torch-no-onednn needs --device cpu")
            impls[name] = torch_impl(name, context=onednn_disabled, pools=False,
                                     note="torch.backends.mkldnn.flags(enabled=False): ATen im2col + BLAS")
        elif name == "numpy":
            if gpu:
                raise SystemExit("bench_ops: the numpy peer runs on the CPU only")
            if dtype not in (torch.float32, torch.float64):
                print(f"note: numpy peer skipped for dtype {args.dtype}")
                continue
            use_numpy = True
        else:
            raise SystemExit(f"bench_ops: unknown peer {name!r}")
    peers = [p for p in peer_names if p in impls or (p == "numpy" and use_numpy)]

    rows = build_rows(args.suite, args.tiny)
    if args.filter:
        rx = re.compile(args.filter)
        rows = [r for r in rows if rx.search(f"{r.id} {r.label} {r.sub_label}")]

    env = env_info(device, threads)
    peaks = gpu_peaks(env["device_name"]) if gpu else None
    pflops = peak_flops(peaks, dtype, args.tf32)
    settings = {"suite": args.suite, "quick": args.quick, "tiny": args.tiny, "dtype": args.dtype,
                "tf32": args.tf32, "tf32_flags": tf32, "min_run_time_s": args.min_run_time, "seed": args.seed,
                "cudnn_benchmark": torch.backends.cudnn.benchmark if gpu else None,
                "tolerance_max_rel_err": tol, "peers": peers, "rounds": args.rounds, "timer": args.timer,
                "stat": args.stat,
                "peer_notes": {k: v.note for k, v in impls.items()},
                "numpy_note": f"NumPy im2col+GEMM (tutorial algorithm) in {args.dtype}, BLAS: {env['numpy_blas']}",
                "forward_rows": "inputs do not require grad (inference)",
                "backward_rows": "backward op called directly on a precomputed grad_output "
                                 "(fastconv._conv2d_backward / aten.convolution_backward; "
                                 "fastconv._max_pool2d_backward / aten.max_pool2d_with_indices_backward)",
                "fwd+bwd_rows": "F-style call + torch.autograd.grad w.r.t. input, weight and bias",
                "gpu_peaks": peaks, "gpu_peak_flops": pflops}

    print(f"bench_ops: suite={args.suite}{' (quick)' if args.quick else ''}{' (tiny)' if args.tiny else ''}, "
          f"{len(rows)} rows, peers: fastconv vs {', '.join(peers)}")
    print(f"device: {env['device_name']} ({device}); torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
          f"oneDNN {env['onednn']}; threads {threads}; git {env['git_commit']}")
    flags = ", ".join(f"{k}={v}" for k, v in tf32.items())
    print(f"dtype {args.dtype}; TF32 {'ON' if args.tf32 else 'off'} ({flags}); "
          f"{args.min_run_time}s timing per row and peer in {args.rounds} alternating rounds, {args.timer} clock, "
          f"{args.stat} of blocks; check: max|a-b|/max|b| <= {tol:g}")
    if use_numpy:
        print(f"numpy peer: {settings['numpy_note']}, {env['numpy_blas_threads']} BLAS threads")
    for k, v in impls.items():
        if v.note:
            print(f"{k}: {v.note}")
    if not gpu and env["cpu_busy_start"] is not None and env["cpu_busy_start"] > 0.1:
        print(f"WARNING: other processes kept {100 * env['cpu_busy_start']:.0f}% of the CPUs busy just before "
              "starting, so CPU timings will be noisy (cpu_busy_start and loadavg in the JSON)")
    if fc_info.get("standin"):
        print("WARNING: fastconv is NOT importable; torch stands in for it. These are not fastconv numbers.")
    sys.stdout.flush()

    measurements, records, failures = [], [], []
    checked = {}
    t_start = time.time()
    for i, row in enumerate(rows):
        case = row.case
        name = f"{row.label} {row.sub_label}"
        rec = {"id": row.id, "name": name, "op": case.op, "pass": row.pass_, "layer": case.layer,
               "aliases": row.aliases, "shape": case.shape_str(), "geometry": dataclasses.asdict(case),
               "core": row.core, "times": {}, "ratios": {}, "check": {}, "errors": {}}
        flops, nbytes = work(row, dtype)
        rec["flops"], rec["bytes"] = flops, nbytes
        inp = make_inputs(case, device, dtype, args.seed)
        npin = None
        if use_numpy and case.op == "conv2d":
            npin = {k: (v.cpu().numpy() if v is not None else None) for k, v in inp.items()}

        # Correctness first (once per case, covering all of its passes).
        key = (case.op, case.geometry())
        if key not in checked:
            status = {"ok": True, "errors": {}, "peer_errors": {}}
            try:
                ref = results_of(impls["torch"] if "torch" in impls else torch_impl(), case, inp)
                got = results_of(fc, case, inp)
                ok, errs = compare(got, ref, tol)
                status["errors"]["fastconv"] = errs
                status["ok"] = ok
                for pname, impl in impls.items():
                    if pname in ("fastconv", "torch") or (case.op == "max_pool2d" and not impl.pools):
                        continue
                    try:
                        pok, perrs = compare(results_of(impl, case, inp), ref, tol)
                        status["errors"][pname] = perrs
                        if not pok:
                            status["peer_errors"][pname] = "mismatch vs torch"
                    except Exception as exc:
                        status["peer_errors"][pname] = f"{type(exc).__name__}: {exc}"
                if npin is not None:
                    try:
                        keys = ("output", "op.grad_input", "op.grad_weight", "op.grad_bias")
                        nref = {k: v for k, v in ref.items() if k in keys}
                        nres = {k: torch.from_numpy(np.asarray(v)) for k, v in numpy_results(case, npin).items()}
                        pok, perrs = compare(nres, nref, tol)
                        status["errors"]["numpy"] = perrs
                        if not pok:
                            status["peer_errors"]["numpy"] = "mismatch vs torch"
                    except Exception as exc:
                        status["peer_errors"]["numpy"] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                status["ok"] = False
                status["exception"] = f"{type(exc).__name__}: {exc}"
            checked[key] = status
            if not status["ok"]:
                worst = {k: v for k, v in status["errors"].get("fastconv", {}).items() if v > tol}
                msg = status.get("exception") or f"mismatch vs torch: {worst}"
                print(f"CHECK FAILED {case.layer} {case.shape_str()}: {msg}")
            for pname, msg in status["peer_errors"].items():
                print(f"note: peer {pname} skipped on {case.layer} {case.shape_str()}: {msg}")
        status = checked[key]
        rec["check"] = {"ok": status["ok"], "max_rel_err": status["errors"], "tolerance": tol}
        if not status["ok"]:
            failures.append(row.id)
            rec["errors"]["fastconv"] = status.get("exception", "check failed")
            records.append(rec)
            continue

        # Timing: same statement shape and the same Timer settings for every peer.
        stmts = {"fastconv": (fc, timed_statements(fc, case, inp))}
        for pname, impl in impls.items():
            if pname == "fastconv" or pname in status["peer_errors"] or (case.op == "max_pool2d" and not impl.pools):
                continue
            stmts[pname] = (impl, timed_statements(impl, case, inp))
        if npin is not None and "numpy" not in status["peer_errors"]:
            stmts["numpy"] = (None, numpy_statements(case, npin))
        # Rounds alternate the peers (order reversed every other round) and the rounds' blocks are
        # merged, so a slow drift of machine load hits every peer alike.
        timers = {pname: (impl, benchmark.Timer(stmt="fn()", globals={"fn": st[row.pass_]}, label=row.label,
                                                sub_label=row.sub_label, description=pname, num_threads=threads,
                                                timer=clock))
                  for pname, (impl, st) in stmts.items()}
        per_round = {pname: [] for pname in timers}
        for rnd in range(args.rounds):
            order = list(timers) if rnd % 2 == 0 else list(reversed(timers))
            for pname in order:
                if pname in rec["errors"]:
                    continue
                impl, timer = timers[pname]
                try:
                    with impl.context() if impl is not None else contextlib.nullcontext():
                        per_round[pname].append(timer.blocked_autorange(min_run_time=args.min_run_time / args.rounds))
                except Exception as exc:
                    rec["errors"][pname] = f"{type(exc).__name__}: {exc}"
                    print(f"note: {pname} failed timing {name}: {rec['errors'][pname]}")
        for pname, ms in per_round.items():
            if pname in rec["errors"] or not ms:
                continue
            m = benchmark.Measurement.merge(ms)[0]
            measurements.append(m)
            rec["times"][pname] = dict(time_stats(m, ms), calls_per_block=[x.number_per_run for x in ms])
            t_stat = rec["times"][pname][args.stat]
            if flops:
                rec.setdefault("gflops", {})[pname] = flops / t_stat / 1e9
            rec.setdefault("gbps", {})[pname] = nbytes / t_stat / 1e9
        fct = rec["times"].get("fastconv", {}).get(args.stat)
        for pname in peers:
            pt = rec["times"].get(pname, {}).get(args.stat)
            if fct and pt:
                rec["ratios"][pname] = fct / pt
        if fct:
            fr = {"gflops": rec.get("gflops", {}).get("fastconv"), "gbps": rec["gbps"]["fastconv"]}
            if gpu and peaks:
                if case.op == "conv2d" and pflops:
                    fr["peak_fraction"], fr["peak_kind"] = flops / fct / pflops, "flops"
                else:
                    fr["peak_fraction"], fr["peak_kind"] = nbytes / fct / peaks["bw"], "bandwidth"
            rec["fastconv_rate"] = fr
        records.append(rec)
        ratio_s = "  ".join(f"fc/{p} {rec['ratios'][p]:.2f}" for p in peers if p in rec["ratios"])
        print(f"[{i + 1}/{len(rows)}] {name}: fastconv {fmt_time(fct)}  {ratio_s}", flush=True)

    elapsed = time.time() - t_start
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    env["cpu_busy_end"] = cpu_busy() if not gpu else None
    print()
    if measurements:
        cmp = benchmark.Compare(measurements)
        cmp.trim_significant_figures()
        cmp.print()
    print(summary_table(records, peers, gpu, args.stat))
    print()
    geo = {p: geomean([r["ratios"].get(p) for r in records]) for p in peers}
    geo_core = {p: geomean([r["ratios"].get(p) for r in records if r["core"]]) for p in peers}
    for p in peers:
        if geo[p] is not None:
            n = sum(1 for r in records if p in r["ratios"])
            print(f"GEOMEAN fastconv/{p} time ratio over {n} rows: {geo[p]:.3f}"
                  + ("  (< 1: fastconv faster)" if p == "torch" else ""))
    if args.suite != "core":
        for p in peers:
            if geo_core[p] is not None:
                print(f"GEOMEAN fastconv/{p} over the core (issue #2) rows: {geo_core[p]:.3f}")
    if failures:
        print(f"CORRECTNESS FAILED on {len(failures)} rows (not timed): {', '.join(failures)}")
    print(f"elapsed {elapsed:.1f} s")

    tag = "" if args.suite == "full" else f"-{args.suite}"
    tag += ("-quick" if args.quick else "") + ("-tiny" if args.tiny else "")
    tag += f"-{threads}thread" if args.threads and not gpu else ""
    tag += "-cputime" if args.timer == "thread-cpu" else ""
    tag += "-min" if args.stat == "min" else ""
    tag += f"-{args.dtype}" if args.dtype != "float32" else ""
    tag += "-tf32" if args.tf32 else ""
    out_json = args.json or default_output("bench_ops", tag, device)
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    result = {"benchmark": "bench_ops", "argv": list(argv if argv is not None else sys.argv[1:]),
              "env": env, "fastconv": fc_info, "settings": settings, "elapsed_s": elapsed,
              "geomean": geo, "geomean_core": geo_core, "failures": failures, "rows": records}
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {out_json}")
    if not args.no_png:
        png = args.png or os.path.splitext(out_json)[0] + ".png"
        title = (f"fastconv {args.suite} suite, {args.dtype}, TF32 {'on' if args.tf32 else 'off'} - "
                 f"{env['device_name']}, "
                 f"{threads} thread{'s' if threads > 1 else ''} - {env['date'][:10]} - {env['git_commit'][:12]}")
        if plot(records, peers, png, title, args.stat):
            print(f"wrote {png}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
