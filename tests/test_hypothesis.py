"""Property-based: random conv2d/max_pool2d configurations agree with torch: in float64 (the
portable path), and in float32 with channel counts that reach the AVX-512 kernels (the engine's
GEMM paths, Winograd, the narrow and dot-form kernels, depthwise) against a float64 reference."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastconv.functional as FC
from fastconv._ops import conv_out_size, pool_out_size


@st.composite
def conv_configs(draw):
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 14))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 14))
    n = draw(st.integers(0, 3))
    bias = draw(st.booleans())
    return n, cin, h, w, cout, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups, bias


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs(), st.integers(0, 2**31 - 1))
def test_conv2d_random_configs(cfg, seed):
    n, cin, h, w, cout, k, s, p, d, g, bias = cfg
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, dtype=torch.float64, generator=gen, requires_grad=True)
    wt = torch.randn(cout, cin // g, *k, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, generator=gen, requires_grad=True) if bias else None
    out = FC.conv2d(x, wt, b, s, p, d, g)
    ref = F.conv2d(x, wt, b, s, p, d, g)
    assert out.shape[2:] == (conv_out_size(h, k[0], s[0], p[0], d[0]), conv_out_size(w, k[1], s[1], p[1], d[1]))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    go = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    inputs = [t for t in (x, wt, b) if t is not None]
    for a, e in zip(torch.autograd.grad(out, inputs, go), torch.autograd.grad(ref, inputs, go)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@st.composite
def pool_configs(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph = draw(st.integers(0, kh // 2))
    pw = draw(st.integers(0, kw // 2))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 13))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 13))
    return draw(st.integers(0, 3)), draw(st.integers(1, 3)), h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw), draw(
        st.booleans())


def _has_empty_window(out, size, k, s, p, d):
    return any(all(not 0 <= o * s - p + i * d < size for i in range(k)) for o in range(out))


@settings(max_examples=80, deadline=None)
@given(pool_configs(), st.integers(0, 2**31 - 1))
def test_max_pool2d_random_configs(cfg, seed):
    n, c, h, w, k, s, p, d, ceil = cfg
    oh, ow = pool_out_size(h, k[0], s[0], p[0], d[0], ceil), pool_out_size(w, k[1], s[1], p[1], d[1], ceil)
    if min(oh, ow) < 1:
        with pytest.raises(RuntimeError, match="too small"):
            FC.max_pool2d(torch.randn(n, c, h, w), k, s, p, d, ceil)
        return
    if _has_empty_window(oh, h, k[0], s[0], p[0], d[0]) or _has_empty_window(ow, w, k[1], s[1], p[1], d[1]):
        # torch returns -inf and an index outside the plane here; fastconv refuses
        with pytest.raises(RuntimeError, match="lies entirely in the padding"):
            FC.max_pool2d(torch.randn(n, c, h, w), k, s, p, d, ceil)
        return
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randperm(max(1, n * c * h * w), generator=gen)[: n * c * h * w].double().view(n, c, h, w)
         .requires_grad_())
    out, idx = FC.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
    go = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(out, x, go)[0], torch.autograd.grad(ref, x, go)[0])


@st.composite
def conv_configs_float32(draw):
    groups = draw(st.sampled_from([1, 1, 1, 2, 4]))
    cin = groups * draw(st.integers(1, 24 if groups == 1 else 6))
    cout = groups * draw(st.integers(1, 72 if groups == 1 else 6))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 1, 2]))
    ph, pw = draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 20))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 20))
    n = draw(st.integers(1, 4))
    algorithm = draw(st.sampled_from(["auto", "auto", "gemm", "winograd", "benchmark"]))
    return n, cin, h, w, cout, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups, draw(st.booleans()), algorithm


@settings(max_examples=int(os.environ.get("FASTCONV_HYPOTHESIS_FLOAT32_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs_float32(), st.integers(0, 2**31 - 1))
def test_conv2d_random_configs_float32(cfg, seed):
    import fastconv
    n, cin, h, w, cout, k, s, p, d, g, bias, algorithm = cfg
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen)
    wt = torch.randn(cout, cin // g, *k, generator=gen)
    b = torch.randn(cout, generator=gen) if bias else None
    xf, wf = x.clone().requires_grad_(), wt.clone().requires_grad_()
    bf = b.clone().requires_grad_() if bias else None
    with fastconv.conv_algorithm(algorithm):
        out = FC.conv2d(xf, wf, bf, s, p, d, g)
        go = torch.randn(out.shape, generator=gen)
        grads = torch.autograd.grad(out, [t for t in (xf, wf, bf) if t is not None], go)
    # the reference: float64 from the same (float32) inputs
    xd, wd = x.double().requires_grad_(), wt.double().requires_grad_()
    bd = b.double().requires_grad_() if bias else None
    ref = F.conv2d(xd, wd, bd, s, p, d, g)
    refs = torch.autograd.grad(ref, [t for t in (xd, wd, bd) if t is not None], go.double())
    # grad_bias is a plain sum of grad_output, whose largest element can come out near zero by
    # cancellation (one output channel: a single sum): its error is measured against the sum of the
    # summands' magnitudes instead
    bias_scale = go.double().abs().sum((0, 2, 3)).max()
    for name, got, want in zip(("output", "grad_input", "grad_weight", "grad_bias"), (out, *grads), (ref, *refs)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        scale = bias_scale if name == "grad_bias" else want.abs().max()
        err = ((got.double() - want).abs().max() / scale.clamp_min(1e-30)).item()
        assert err < 2e-5, f"{name}: max error {err:.2e} relative to the largest element"
