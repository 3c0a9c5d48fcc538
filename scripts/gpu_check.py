"""Driver for compute-sanitizer (scripts/gpu_check.sh): conv2d and max_pool2d forward and backward on
the GPU over shapes that reach every CUDA kernel (im2col, col2im, the two layout kernels, both pool
kernels; one and several images per chunk; groups; 1x1), checked against torch so that a run that
reports no error also computed the right thing."""
import torch
import torch.nn.functional as F

import fastconv  # noqa: F401

ops = torch.ops.fastconv
dev = "cuda"
torch.backends.cuda.matmul.allow_tf32 = False
CASES = [  # input, weight, stride, padding, dilation, groups
    ((8, 32, 14, 14), (64, 32, 3, 3), 1, 1, 1, 1),
    ((3, 4, 10, 13), (6, 4, 3, 2), (2, 1), (1, 0), (1, 2), 1),
    ((2, 6, 9, 9), (8, 3, 3, 3), 1, 1, 1, 2),
    ((3, 16, 7, 7), (12, 16, 1, 1), 1, 0, 1, 1),
    ((1, 3, 8, 8), (4, 3, 5, 5), 1, 2, 1, 1),
    ((2, 512, 128, 128), (4, 512, 3, 3), 1, 1, 1, 1),  # one image per chunk
]
for xs, ws, s, p, d, g in CASES:
    x = torch.randn(xs, device=dev, dtype=torch.float64)
    w = torch.randn(ws, device=dev, dtype=torch.float64)
    b = torch.randn(ws[0], device=dev, dtype=torch.float64)
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    out = ops.conv2d(x, w, b, pair(s), pair(p), pair(d), g)
    go = torch.randn_like(out)
    gi, gw, gb = ops._conv2d_backward(go, x, w, pair(s), pair(p), pair(d), g, [True, True, True])
    xr, wr = x.cpu().requires_grad_(), w.cpu().requires_grad_()
    ref = F.conv2d(xr, wr, b.cpu(), s, p, d, g)
    rgi, rgw = torch.autograd.grad(ref, (xr, wr), go.cpu())
    for a, r in ((out, ref), (gi, rgi), (gw, rgw)):
        torch.testing.assert_close(a.cpu(), r.detach())
for k, s, p, c in [(2, 2, 0, False), (3, 2, 1, False), (3, 2, 1, True), (3, 1, 1, False)]:
    x = torch.randn(4, 8, 31, 30, device=dev)
    vals, idx = ops.max_pool2d(x, [k, k], [s, s], [p, p], [1, 1], c)
    rvals, ridx = F.max_pool2d(x.cpu(), k, s, p, ceil_mode=c, return_indices=True)
    assert torch.equal(vals.cpu(), rvals) and torch.equal(idx.cpu(), ridx)
    gi = ops._max_pool2d_backward(torch.ones_like(vals), x, idx, [k, k], [s, s], [p, p], [1, 1], c)
    xr = x.cpu().requires_grad_()
    F.max_pool2d(xr, k, s, p, ceil_mode=c).sum().backward()
    torch.testing.assert_close(gi.cpu(), xr.grad)
torch.cuda.synchronize()
print("gpu_check driver: all conv2d / max_pool2d forward and backward results match torch")
