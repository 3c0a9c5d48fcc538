"""The portable conv path's AVX2 GEMM (csrc/cpu/gemm_avx2.h): CPUs with AVX2 + FMA but without AVX-512
run float32 conv2d on it. Every remainder of its 6 x 16 micro-tile (output channels, pixels), several
256-row reduction blocks, more than 2048 columns at once, the work splits of batch 1 and few channels,
every pass against torch in float64 with ATen's allocations poisoned. On an AVX-512 CPU these tests run
again in a subprocess under FASTCONV_CPU_GEMM=avx2, which turns the AVX-512 engine off."""
import os
import subprocess
import sys

import pytest
import torch
from test_conv_engine import run_case

import fastconv

NAME = "im2col+gemm-avx2"


def on_avx2_gemm():
    return fastconv.conv2d_algorithm(torch.empty(2, 8, 9, 9), torch.empty(8, 8, 3, 3), padding=1) == NAME


def cpu_has_avx2():
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


# (N, C, H, W, OC, kernel, stride, padding, dilation, groups)
AVX2_CASES = [
    (2, 16, 9, 11, 1, (3, 3), 1, 1, 1, 1),     # one output channel (5 idle rows of the tile)
    (3, 5, 7, 6, 5, (3, 3), 1, 1, 1, 1),       # OC 5, K 45, 42 pixels (16-column tail of 10)
    (1, 7, 5, 5, 6, (3, 3), 1, 0, 1, 1),       # OC 6 exactly, 9 pixels, batch 1
    (2, 29, 8, 9, 7, (3, 3), 1, 1, 1, 1),      # K 261: two reduction blocks of 130/131
    (1, 64, 13, 13, 13, (3, 3), 1, 1, 1, 1),   # K 576: three blocks; batch 1 splits channels
    (4, 3, 17, 17, 12, (5, 5), 2, 2, 1, 1),    # stride 2, 5x5
    (2, 6, 12, 12, 16, (5, 5), 1, 0, 1, 1),    # LeNet's conv2
    (1, 192, 13, 13, 97, (3, 3), 1, 1, 1, 1),  # AlexNet-like, OC 97 = 16 tiles + 1 row, batch 1
    (2, 12, 9, 9, 10, (3, 3), 1, 1, 1, 2),     # groups of 6 channels
    (3, 15, 8, 7, 9, (3, 3), 2, 1, 1, 3),      # groups of 5, stride 2, odd everything
    (2, 8, 10, 12, 11, (3, 3), 1, 2, 2, 1),    # dilation 2
    (1, 16, 48, 48, 7, (1, 1), 1, 0, 1, 1),    # 1x1: 2304 columns at once (past 2048)
    (3, 24, 14, 14, 18, (1, 1), 2, 0, 1, 1),   # strided 1x1 (not pointwise: through im2col)
    (5, 1, 28, 28, 32, (3, 3), 1, 1, 1, 1),    # MNIST's conv1: one input channel
    (1, 3, 30, 30, 24, (7, 7), 2, 3, 1, 1),    # a 7x7/2 stem
    (2, 9, 6, 40, 8, (2, 5), 1, (0, 2), 1, 1),  # asymmetric kernel and padding
]


def case_id(c):
    return "x".join(map(str, c[:5])) + f"-k{c[5][0]}x{c[5][1]}-s{c[6]}-g{c[9]}"


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", AVX2_CASES, ids=case_id)
def test_avx2_gemm_matches_torch(case, threads, poison, monkeypatch):
    if not on_avx2_gemm():
        pytest.skip("the AVX2 GEMM does not run on this CPU (see test_avx2_gemm_in_a_subprocess)")
    monkeypatch.setenv("FASTCONV_AVX2_WINOGRAD", "0")  # the GEMM's forward too (Winograd: below)
    n, c, h, w, oc, k, s, p, d, g = case
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert fastconv.conv2d_algorithm(torch.empty(n, c, h, w), torch.empty(oc, c // g, *k), s, p, d, g) == NAME
        run_case(n, c, h, w, oc, k, s, p, d, g)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("case", [(1, 6, 12, 12, 16, (5, 5), 1, 0, 1, 1), (3, 64, 14, 14, 40, (3, 3), 1, 1, 1, 1),
                                  (8, 3, 20, 20, 24, (7, 7), 2, 3, 1, 1), (2, 12, 9, 9, 10, (3, 3), 1, 1, 1, 2)],
                         ids=case_id)
def test_avx2_gemm_gradients_have_the_same_bits_at_any_thread_count(case):
    # the work splits follow the thread count; no sum may (grad_weight's partials are per block of images)
    if not on_avx2_gemm():
        pytest.skip("the AVX2 GEMM does not run on this CPU")
    n, c, h, w, oc, k, s, p, d, g = case
    x, wt = torch.randn(n, c, h, w), torch.randn(oc, c // g, *k)
    go = torch.randn(torch.nn.functional.conv2d(x, wt, None, s, p, d, g).shape)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            grads = torch.ops.fastconv._conv2d_backward(go, x, wt, [s, s], [p, p], [d, d], g, [True, True, False])
            out = torch.ops.fastconv.conv2d(x, wt, None, [s, s], [p, p], [d, d], g)
            results.append((out, grads[0], grads[1]))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# Winograd F(2x2, 3x3) on AVX2 (cpu/winograd_avx2.h), forced on: output widths of 1-40 pixels (tile rows
# of 1-20 tiles: vectors of 8 tiles, the last partial; odd widths end in a half tile), odd heights, blocks
# of tile rows that span images (9 + 7 rows of 16 tiles, then 2) or cut one (20 rows of 24 tiles: 10 a
# block), padding 0, 1, 2 and unequal, one input or output channel, reductions past 256 channels (the
# GEMM's reduction blocks), batch 1; threads 1-3; fused ReLU. Backward-input runs on it too (the forward
# convolution of grad_output with the flipped weights, padding 2 - p).
WINOGRAD_CASES = [
    (2, 16, 9, 11, 24, 1, 1),
    (1, 3, 3, 3, 5, 1, 1),
    (3, 8, 14, 14, 16, 1, 1),
    (1, 20, 13, 13, 33, 1, 1),
    (2, 5, 19, 34, 7, 0, 0),
    (1, 7, 40, 40, 9, 1, 1),
    (2, 1, 12, 17, 6, 2, 2),
    (1, 300, 6, 7, 20, 1, 1),
    (2, 9, 8, 9, 1, 2, 0),
]


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-p{c[5]}{c[6]}")
def test_avx2_winograd_matches_torch(case, poison, monkeypatch):
    if not on_avx2_gemm():
        pytest.skip("the AVX2 GEMM does not run on this CPU (see test_avx2_gemm_in_a_subprocess)")
    monkeypatch.setenv("FASTCONV_AVX2_WINOGRAD", "1")
    n, c, h, w, oc, ph, pw = case
    padding = (ph, pw)
    x, wt, b = torch.randn(n, c, h, w), torch.randn(oc, c, 3, 3), torch.randn(oc)
    assert fastconv.conv2d_algorithm(x, wt, 1, padding).split("/")[:2] == ["winograd-avx2"] * 2
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            run_case(n, c, h, w, oc, (3, 3), 1, padding, 1, 1, bias=threads != 2)
    finally:
        torch.set_num_threads(old)
    conv = fastconv.Conv2dReLU(c, oc, 3, padding=padding)
    with torch.no_grad():
        conv.weight.copy_(wt)
        conv.bias.copy_(b)
        want = torch.relu(torch.nn.functional.conv2d(x.double(), wt.double(), b.double(), 1, padding))
        err = ((conv(x).double() - want).abs().max() / want.abs().max()).item()
        assert err < 2e-5
        # NaN passes the fused ReLU, as torch.relu lets it
        x[0, c // 2, h // 2, w // 2] = float("nan")
        fused, plain = conv(x), torch.ops.fastconv.conv2d(x, wt, b, [1, 1], list(padding), [1, 1], 1)
        assert torch.isnan(fused).any()
        torch.testing.assert_close(fused, plain.relu(), rtol=0, atol=0, equal_nan=True)


def test_avx2_gemm_in_a_subprocess():
    """On CPUs where the AVX-512 engine runs, the tests above under FASTCONV_CPU_GEMM=avx2."""
    if on_avx2_gemm():
        pytest.skip("the tests above ran on the AVX2 GEMM in this process")
    if not cpu_has_avx2():
        pytest.skip("the CPU lacks AVX2")
    env = dict(os.environ, FASTCONV_CPU_GEMM="avx2")
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                          "-k", "not subprocess"], env=env, cwd=here, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout, res.stdout[-2000:]
