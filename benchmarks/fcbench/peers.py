"""The implementations bench_ops.py compares, the correctness check, and the timed statements.

Every torch-tensor peer exposes the same calls, so every timed statement has the same shape for every
peer: the public F-style function (forward; forward+backward through autograd) and the backward op
called directly on a precomputed grad_output (the backward-only passes).
"""
import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import numpy_im2col

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Max |a - b| / max |b| allowed per tensor, fastconv vs torch in the same dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
TOLERANCE_TF32 = 5e-3

DEFAULT_CONV_ALGORITHM = "im2col+gemm"
POOL_ALGORITHM = "direct"


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


def load_fastconv():
    """The fastconv peer (its public functional API plus the registered backward ops) and a record of
    the build."""
    try:
        import fastconv
        import fastconv.functional as fcf
        ops = torch.ops.fastconv
        conv_bwd, pool_fwd, pool_bwd = ops._conv2d_backward, ops.max_pool2d, ops._max_pool2d_backward
    except Exception as exc:  # ImportError, or an extension that failed to load / register
        raise SystemExit(f"cannot use fastconv ({type(exc).__name__}: {exc}).\n"
                         "Build it first: pip install --no-build-isolation -e .  "
                         "(or python setup.py build_ext --inplace)")
    impl = Impl(
        name="fastconv",
        conv2d=lambda x, w, b, s, p, d, g: fcf.conv2d(x, w, b, s, p, d, g),
        conv2d_backward=lambda go, x, w, s, p, d, g, m: conv_bwd(go, x, w, list(s), list(p), list(d), g, list(m)),
        max_pool2d=lambda x, k, s, p, d, c: fcf.max_pool2d(x, k, s, p, d, ceil_mode=c),
        max_pool2d_with_indices=lambda x, k, s, p, d, c: pool_fwd(x, list(k), list(s), list(p), list(d), c),
        max_pool2d_backward=lambda go, x, i, k, s, p, d, c: pool_bwd(go, x, i, list(k), list(s), list(p), list(d), c),
    )
    info = {"available": True, "file": getattr(fastconv, "__file__", None),
            "version": getattr(fastconv, "__version__", None),
            "has_cuda_kernels": bool(fastconv.has_cuda_kernels()),
            "conv2d_algorithm_api": hasattr(fastconv, "conv2d_algorithm")}
    return impl, info


def algorithm(case, inp):
    """Which fastconv algorithm runs a row: fastconv.conv2d_algorithm(input, weight, stride, padding,
    dilation, groups) where the build has it, else the default for the op."""
    if case.op != "conv2d":
        return POOL_ALGORITHM
    import fastconv

    fn = getattr(fastconv, "conv2d_algorithm", None)
    if fn is None:
        return DEFAULT_CONV_ALGORITHM
    try:
        return str(fn(inp["x"], inp["w"], case.stride, case.padding, case.dilation, case.groups))
    except Exception as exc:  # report, do not fail the benchmark
        return f"? ({type(exc).__name__})"


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


def make_peers(names, gpu, dtype, tf32):
    """{name: Impl} for the torch-tensor peers in `names`, and whether the NumPy peer runs."""
    impls, use_numpy = {}, False
    for name in names:
        if name == "torch":
            impls[name] = torch_impl(note="cuDNN, benchmark=True" if gpu else "oneDNN/native")
        elif name == "torch-no-cudnn":
            if not gpu:
                raise SystemExit("bench_ops: peer torch-no-cudnn needs --device cuda")
            impls[name] = torch_impl(name, context=lambda: cudnn_disabled(tf32), pools=False,
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
                print(f"note: numpy peer skipped for dtype {dtype}")
                continue
            use_numpy = True
        else:
            raise SystemExit(f"bench_ops: unknown peer {name!r}")
    return impls, use_numpy


# --------------------------------------------------------------------------------------------------
# Inputs and the correctness check
# --------------------------------------------------------------------------------------------------

def make_inputs(case, device, dtype, seed, channels_last=False):
    """The row's tensors (the same values for every peer); channels_last: 4-D ones in that memory format
    (x, weight and grad_output, as model.to(memory_format=torch.channels_last) and its activations)."""
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
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k: (v.to(device=device, dtype=dtype, memory_format=fmt if v.dim() == 4 else torch.preserve_format)
                if v is not None else None) for k, v in t.items()}


def numpy_inputs(inp):
    return {k: (v.cpu().numpy() if v is not None else None) for k, v in inp.items()}


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
    y = numpy_im2col.conv2d_forward(npin["x"], npin["w"], npin["b"], *args)
    mask = (True, True, npin["b"] is not None)
    gi, gw, gb = numpy_im2col.conv2d_backward(npin["go"], npin["x"], npin["w"], *args, mask)
    out = {"output": y, "op.grad_input": gi, "op.grad_weight": gw}
    if npin["b"] is not None:
        out["op.grad_bias"] = gb
    return {k: torch.from_numpy(np.asarray(v)) for k, v in out.items()}


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


def check_case(case, inp, fc, impls, npin, tol):
    """fastconv against torch on every output a pass produces; the other peers too (a mismatching or
    failing peer is skipped on this case, not fatal). Returns {"ok", "errors", "peer_errors"[, "exception"]}."""
    status = {"ok": True, "errors": {}, "peer_errors": {}}
    try:
        ref = results_of(impls.get("torch") or torch_impl(), case, inp)
        ok, errs = compare(results_of(fc, case, inp), ref, tol)
        status["errors"]["fastconv"], status["ok"] = errs, ok
        for pname, impl in impls.items():
            if pname == "torch" or (case.op == "max_pool2d" and not impl.pools):
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
                pok, perrs = compare(numpy_results(case, npin), {k: v for k, v in ref.items() if k in keys}, tol)
                status["errors"]["numpy"] = perrs
                if not pok:
                    status["peer_errors"]["numpy"] = "mismatch vs torch"
            except Exception as exc:
                status["peer_errors"]["numpy"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        status["ok"] = False
        status["exception"] = f"{type(exc).__name__}: {exc}"
    return status


# --------------------------------------------------------------------------------------------------
# Timed statements
# --------------------------------------------------------------------------------------------------

def timed_statements(impl, case, inp):
    """{pass: zero-argument callable}; identical structure for every torch-tensor peer.

    fwd: inputs that do not require grad (inference, no autograd graph). bwd-input / bwd-weight: the
    backward op on a precomputed grad_output with only grad_input / only grad_weight requested.
    fwd+bwd: the F-style call on leaves that require grad, then autograd.grad w.r.t. all of them."""
    if case.op == "conv2d":
        args = _conv_args(case)
        x, w, b, go = inp["x"], inp["w"], inp["b"], inp["go"]
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        br = b.detach().requires_grad_() if b is not None else None
        leaves = [xr, wr] + ([br] if br is not None else [])

        def fwd_bwd():
            return torch.autograd.grad(impl.conv2d(xr, wr, br, *args), leaves, go)

        return {
            "fwd": lambda: impl.conv2d(x, w, b, *args),
            "bwd-input": lambda: impl.conv2d_backward(go, x, w, *args, (True, False, False)),
            "bwd-weight": lambda: impl.conv2d_backward(go, x, w, *args, (False, True, False)),
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
        "bwd-weight": lambda: numpy_im2col.conv2d_backward(go, x, w, *args, (False, True, False)),
        "fwd+bwd": fwd_bwd,
    }
