"""NumPy baseline: the tutorial's im2col + GEMM convolution, forward and backward, in float32.

This is the algorithm fastconv implements, written the way the well-known tutorial writes it
(Saito, "Deep Learning from Scratch", ch. 7: `im2col`, `col2im`, `Convolution.forward/backward`),
generalised to stride, padding and dilation per axis and to groups. It is the yardstick for "how far
is a compiled im2col+GEMM from a straightforward NumPy one" in benchmarks/bench_ops.py.

Layouts match torch: input (N, C, H, W), weight (C_out, C/groups, kH, kW), output (N, C_out, Ho, Wo).
The GEMMs run in NumPy's BLAS (OpenBLAS in the wheels); the benchmark caps its threads with threadpoolctl.
Everything stays in the dtype of the inputs (the benchmark passes float32); nothing upcasts to
float64 as `np.zeros` would by default.
"""
import numpy as np

__all__ = [
    "im2col", "col2im", "conv2d_forward", "conv2d_backward", "output_size",
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def output_size(h, w, kh, kw, stride, padding, dilation):
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return oh, ow


def im2col(x, kh, kw, stride=1, padding=0, dilation=1):
    """(N, C, H, W) -> (N*Ho*Wo, C*kh*kw); column order (c, i, j) matches weight.reshape(C_out, -1)."""
    n, c, h, w = x.shape
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    oh, ow = output_size(h, w, kh, kw, stride, padding, dilation)
    img = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if (ph or pw) else x
    col = np.empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        y0 = i * dh
        y1 = y0 + sh * (oh - 1) + 1
        for j in range(kw):
            x0 = j * dw
            x1 = x0 + sw * (ow - 1) + 1
            col[:, :, i, j, :, :] = img[:, :, y0:y1:sh, x0:x1:sw]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, c * kh * kw)


def col2im(col, x_shape, kh, kw, stride=1, padding=0, dilation=1):
    """Adjoint of im2col: scatter-add (N*Ho*Wo, C*kh*kw) columns back into an (N, C, H, W) image."""
    n, c, h, w = x_shape
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    oh, ow = output_size(h, w, kh, kw, stride, padding, dilation)
    col = col.reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)
    img = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=col.dtype)
    for i in range(kh):
        y0 = i * dh
        y1 = y0 + sh * (oh - 1) + 1
        for j in range(kw):
            x0 = j * dw
            x1 = x0 + sw * (ow - 1) + 1
            img[:, :, y0:y1:sh, x0:x1:sw] += col[:, :, i, j, :, :]
    return img[:, :, ph:ph + h, pw:pw + w]


def conv2d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, return_col=False):
    """out = conv2d(x, weight, bias) via one im2col and one GEMM per group.

    With return_col=True also returns the column matrix, which the tutorial caches for backward
    (pass it to conv2d_backward as `col`).
    """
    n, c, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    if c != cg * groups or cout % groups:
        raise ValueError(f"conv2d_forward: input has {c} channels, weight {tuple(weight.shape)}, groups={groups}")
    oh, ow = output_size(h, w, kh, kw, stride, padding, dilation)
    col = im2col(x, kh, kw, stride, padding, dilation)
    if groups == 1:
        out = col @ weight.reshape(cout, -1).T
    else:
        k = cg * kh * kw
        og = cout // groups
        out = np.empty((col.shape[0], cout), dtype=x.dtype)
        for g in range(groups):
            out[:, g * og:(g + 1) * og] = col[:, g * k:(g + 1) * k] @ weight[g * og:(g + 1) * og].reshape(og, k).T
    if bias is not None:
        out += bias
    # The tutorial returns the transposed view; make it a real NCHW array like torch's output.
    out = np.ascontiguousarray(out.reshape(n, oh, ow, cout).transpose(0, 3, 1, 2))
    return (out, col) if return_col else out


def conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1, groups=1,
                    output_mask=(True, True, True), col=None):
    """(grad_input, grad_weight, grad_bias); entries whose output_mask is False are None.

    Mirrors torch.ops.fastconv._conv2d_backward: it receives the input, so it recomputes im2col
    for grad_weight unless the forward's `col` is passed in.
    """
    n, c, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    k = cg * kh * kw
    og = cout // groups
    # (N, C_out, Ho, Wo) -> (N*Ho*Wo, C_out), the layout of the forward GEMM's output.
    dout = grad_out.transpose(0, 2, 3, 1).reshape(-1, cout)
    grad_input = grad_weight = grad_bias = None
    if output_mask[2]:
        grad_bias = dout.sum(axis=0)
    if output_mask[1]:
        if col is None:
            col = im2col(x, kh, kw, stride, padding, dilation)
        if groups == 1:
            grad_weight = (dout.T @ col).reshape(weight.shape)
        else:
            grad_weight = np.empty(weight.shape, dtype=weight.dtype)
            for g in range(groups):
                grad_weight[g * og:(g + 1) * og] = (
                    dout[:, g * og:(g + 1) * og].T @ col[:, g * k:(g + 1) * k]).reshape(og, cg, kh, kw)
    if output_mask[0]:
        if groups == 1:
            dcol = dout @ weight.reshape(cout, -1)
        else:
            dcol = np.empty((dout.shape[0], c * kh * kw), dtype=x.dtype)
            for g in range(groups):
                dcol[:, g * k:(g + 1) * k] = dout[:, g * og:(g + 1) * og] @ weight[g * og:(g + 1) * og].reshape(og, k)
        grad_input = np.ascontiguousarray(col2im(dcol, x.shape, kh, kw, stride, padding, dilation))
    return grad_input, grad_weight, grad_bias
