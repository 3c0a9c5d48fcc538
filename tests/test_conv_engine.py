"""The CPU conv engine's own edges: every remainder of its tiles (8 output channels x 48 pixels,
k-blocks of 512, 16-tile Winograd windows), every algorithm it can pick, thread counts, batch 1,
wide layers, and bitwise-repeatable gradients. Reference: torch in float64."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastconv
import fastconv.functional as FC

ALGORITHMS = ("auto", "gemm", "winograd", "benchmark")
# The names of the portable path (no AVX-512 engine): at::mm, or the AVX2 GEMM of cpu/gemm_avx2.h
PORTABLE = ("im2col+gemm-aten", "im2col+gemm-avx2")


def portable(name):
    """Whether conv2d_algorithm's report names the portable path (no AVX-512 engine): its GEMMs, or the AVX2
    path's Winograd for some passes."""
    return all(part in PORTABLE or part == "winograd-avx2" for part in name.split("/"))


def run_case(n, c, h, w, oc, k, stride=1, padding=1, dilation=1, groups=1, dtype=torch.float32, bias=True):
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    wt = torch.randn(oc, c // groups, *k, dtype=torch.float64)
    b = torch.randn(oc, dtype=torch.float64) if bias else None
    args = (stride, padding, dilation, groups)
    xr, wr = x.clone().requires_grad_(), wt.clone().requires_grad_()
    br = b.clone().requires_grad_() if bias else None
    ref = F.conv2d(xr, wr, br, *args)
    go = torch.randn_like(ref)
    ref.backward(go)
    xf, wf = x.to(dtype).requires_grad_(), wt.to(dtype).requires_grad_()
    bf = b.to(dtype).requires_grad_() if bias else None
    out = FC.conv2d(xf, wf, bf, *args)
    out.backward(go.to(dtype))
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    pairs = [(out, ref), (xf.grad, xr.grad), (wf.grad, wr.grad)] + ([(bf.grad, br.grad)] if bias else [])
    # grad_bias is a plain sum of grad_output, whose largest element can come out near zero by
    # cancellation: its error is measured against the sum of the summands' magnitudes instead
    bias_scale = go.abs().sum((0, 2, 3)).max()
    for name, (got, want) in zip(("output", "grad_input", "grad_weight", "grad_bias"), pairs):
        assert torch.isfinite(got).all(), f"{name} has unwritten (NaN) elements"
        scale = bias_scale if name == "grad_bias" else want.abs().max()
        err = ((got.double() - want).abs().max() / scale.clamp_min(1e-30)).item()
        assert err < tol, f"{name}: max error {err:.2e} relative to the largest element (tolerance {tol})"


# (N, C, H, W, OC, kernel, stride, padding, dilation, groups): output channels 1, 7, 8, 9, 17, 50
# (8-row tile remainders), planes from 1 pixel to 33 wide (48-pixel panels, vectors straddling
# images, planes under 16 pixels), K past 512 (several k-blocks), odd outputs (Winograd edges).
ENGINE_CASES = [
    (2, 16, 9, 11, 1, (3, 3), 1, 1, 1, 1),
    (3, 16, 14, 14, 7, (3, 3), 1, 1, 1, 1),
    (1, 24, 13, 13, 8, (3, 3), 1, 1, 1, 1),
    (5, 16, 3, 3, 9, (3, 3), 1, 1, 1, 1),
    (7, 17, 1, 1, 17, (3, 3), 1, 1, 1, 1),
    (2, 18, 15, 33, 50, (3, 3), 1, 1, 1, 1),
    (1, 70, 7, 6, 20, (3, 3), 1, (0, 2), 1, 1),
    (2, 130, 5, 5, 33, (3, 3), 1, 1, 1, 1),
    (2, 600, 4, 5, 9, (1, 1), 1, 0, 1, 1),
    (1, 40, 5, 7, 24, (1, 1), 1, 0, 1, 1),    # 1x1 planes read in place as one row: 35-pixel tail, batch 1
    # more output channels than pixels: one pixel item, the channels split (9 blocks, the last of 6 rows)
    (1, 32, 6, 5, 70, (3, 3), 1, 1, 1, 1),
    (1, 20, 11, 9, 70, (3, 3), 2, 1, 1, 1),
    (3, 32, 4, 8, 20, (1, 1), 1, 0, 1, 1),    # ... whole vectors
    (2, 26, 5, 7, 40, (1, 1), 1, 0, 1, 2),    # 1x1 backward-input's W^T blocks: 13 channels per group (8 + 5)
    (2, 13, 6, 7, 40, (1, 1), 1, 0, 1, 1),    # 1x1 backward-weight as the swapped problem (C < OC), by pixels
    (1, 400, 3, 5, 700, (1, 1), 1, 0, 1, 1),  # ... by rows (a 1.1 MB partial)
    (3, 40, 12, 13, 24, (1, 1), 1, 0, 1, 1),  # 1x1 backward-weight reading the input in place: items across images
    (2, 64, 12, 12, 32, (1, 1), 1, 0, 1, 2),  # ... groups
    (3, 5, 13, 13, 50, (3, 3), 2, 1, 1, 1),
    (2, 6, 40, 45, 10, (3, 3), 2, 1, 1, 1),   # stride-2 col2im: output rows past 16 columns
    (3, 1, 17, 19, 7, (3, 3), 1, 1, 1, 1),    # backward-weight's dot form (C*KH*KW <= 25): 3 + 3 + 1
    (2, 1, 12, 40, 11, (5, 5), 1, 0, 1, 1),   # output channels, 9 + 9 + 7 rows, rows past 16 pixels
    (2, 4, 9, 9, 6, (2, 3), 1, 1, 1, 2),      # ... groups
    (2, 16, 36, 37, 12, (1, 1), 2, 0, 1, 1),  # ... 1x1 downsampling, odd input width
    (2, 3, 31, 29, 13, (11, 11), (4, 3), 2, 1, 1),
    # the narrow direct kernel (strided, <= 64 output channels, reduction >= 64): 1-4 vectors of
    # channels, row tails of its 6-16 pixel tiles, dilation, unequal strides
    (2, 3, 37, 41, 64, (7, 7), 2, 3, 1, 1),
    (1, 8, 20, 23, 20, (3, 3), 2, 1, 2, 1),
    (2, 16, 15, 17, 40, (3, 3), (2, 3), (1, 0), 1, 1),
    (3, 9, 12, 13, 5, (3, 3), 2, 1, 1, 1),
    (1, 3, 30, 109, 64, (3, 3), 2, 1, 1, 1),  # ... tiles of 5 (55-pixel rows), 4 (28) and 7 (14) pixels
    (2, 4, 20, 56, 50, (3, 3), 2, 1, 1, 1),
    (1, 4, 9, 27, 40, (3, 3), 2, 1, 1, 1),
    (2, 8, 7, 9, 17, (3, 2), 2, (1, 0), (2, 1), 1),
    (2, 3, 35, 37, 50, (11, 11), 4, 2, 1, 1),  # ... weights past 64 KiB: k-blocks summed in a row buffer
    (1, 3, 35, 90, 40, (11, 11), 4, 2, 1, 1),  # ... stored 16 pixels at a time: a 21-pixel row, 3 vectors
    (1, 16, 20, 20, 8, (3, 3), 1, 3, 1, 1),
    (2, 12, 9, 9, 24, (3, 3), 1, 1, 1, 2),
    (1, 12, 9, 9, 24, (3, 3), 1, 1, 1, 2),    # batch 1, stride 1: backward-input through col2im
    (1, 8, 11, 10, 16, (3, 3), 1, 2, 2, 4),
    (2, 8, 10, 10, 8, (3, 3), 1, 1, 1, 8),
    (1, 4, 3, 300, 4, (3, 3), 1, 1, 1, 4),    # depthwise backward-weight: rows past 256 columns
    # depthwise stride 1 on the row kernels: planes past the phase planes' cache budget (forward and
    # backward-input: 144-155 KiB padded planes; backward-weight: 293-301 KiB with grad_output's)
    (1, 2, 190, 190, 2, (3, 3), 1, 1, 1, 2),
    (1, 2, 190, 200, 2, (3, 3), 1, 1, 1, 2),
    # depthwise on phase planes (strides past 1, rows under 32 pixels): odd and even sizes and paddings,
    # channel multipliers, strides 2-4 (2: vector split and gather, over 32 columns too; 3, 4: scalar),
    # dilation, kernels past 3x3
    (2, 6, 13, 17, 6, (3, 3), 2, 1, 1, 6),
    (2, 5, 12, 15, 10, (3, 3), 2, 1, 1, 5),
    (1, 3, 9, 70, 3, (3, 3), 2, 1, 1, 3),
    (1, 4, 20, 70, 4, (5, 3), (3, 2), (2, 1), 2, 4),
    (3, 16, 7, 7, 16, (5, 5), 1, 2, 1, 16),
    (2, 4, 10, 37, 8, (3, 7), (1, 4), (1, 3), 1, 4),
    (1, 7, 1, 1, 21, (3, 3), 2, 1, 1, 7),
    (2, 4, 9, 20, 4, (3, 3), (2, 1), 1, 1, 4),
    (1, 3, 12, 40, 6, (3, 5), 1, (1, 2), 2, 3),
    (2, 8, 10, 10, 16, (3, 3), 2, 1, 1, 8),
    (2, 8, 11, 10, 16, (3, 3), 1, 1, 2, 4),
    (4, 6, 12, 12, 16, (5, 5), 1, 0, 1, 1),
    # groups of 2-4 channels on the engine (the direct kernels run depthwise only): backward-input
    # through the forward engine at any channel count, backward-weight's dot form for up to 8 output
    # channels per group past 25 column rows (36-288), batch 1, stride 2, 5x5; one group of 8 channels
    (2, 128, 9, 10, 128, (3, 3), 1, 1, 1, 32),
    (3, 12, 11, 9, 24, (3, 3), 2, 1, 1, 4),
    (1, 16, 8, 9, 32, (3, 3), 1, 1, 1, 8),
    (2, 64, 10, 10, 64, (3, 3), 1, 1, 1, 8),
    (2, 16, 7, 7, 24, (5, 5), 1, 2, 1, 4),
    (2, 32, 9, 9, 8, (3, 3), 1, 1, 1, 1),
    # ... without im2col at stride 1 (up to 8 output channels per group, past 25 column rows): the
    # cases above, dilation, uneven kernel and padding, batch 1
    (2, 24, 11, 13, 24, (3, 3), 1, 2, 2, 4),
    (3, 16, 6, 17, 16, (3, 5), 1, (0, 2), 1, 2),
    (1, 40, 7, 7, 40, (3, 3), 1, 1, 1, 8),
    # kernels past 3x3 on Winograd (sums of 3x3 sub-kernels on a shifted tile grid): odd and even
    # sizes, non-square, padding from 0 to kernel - 1, grids whose extra row/column straddles images
    (2, 16, 13, 12, 24, (5, 5), 1, 2, 1, 1),
    (1, 20, 9, 11, 17, (7, 7), 1, 3, 1, 1),
    (3, 16, 10, 9, 9, (4, 5), 1, (1, 3), 1, 1),
    (2, 24, 8, 8, 16, (5, 3), 1, (4, 0), 1, 1),
    (5, 12, 6, 7, 10, (6, 6), 1, 5, 1, 1),
    # F(2x2, 5x5) (kernels of 4x4 and up): two channel blocks (130) and 50 output channels, odd and
    # even outputs, padding 0 to 4, 7x5 and 5x7 (two sub-kernels one way, one the other)
    (2, 130, 11, 12, 50, (5, 5), 1, 2, 1, 1),
    (1, 9, 9, 8, 17, (5, 5), 1, 4, 1, 1),
    (2, 16, 12, 15, 20, (7, 5), 1, (3, 1), 1, 1),
    (2, 12, 14, 13, 8, (5, 7), 1, (0, 3), 1, 1),
    # strided backward-input (col2im over groups of images where W^T is large and planes whole; one
    # phase at a time under FASTCONV_STRIDE_PHASES=1, test_stride_phases_match_torch): phases with 1
    # and 2 taps, 5x5 (3-tap phases, shifted grad_output), unequal strides, a stride past the kernel
    # (a phase no tap reaches: zero gradient), stride 4
    (8, 16, 13, 11, 20, (3, 3), 2, 1, 1, 1),
    (8, 16, 9, 13, 10, (5, 5), 2, 2, 1, 1),
    (8, 16, 12, 9, 12, (3, 3), (2, 1), (1, 0), 1, 1),
    (30, 17, 10, 10, 9, (2, 2), 3, 0, 1, 1),
    (16, 20, 15, 15, 16, (4, 4), 4, 1, 1, 1),
    (8, 16, 11, 11, 12, (3, 3), 2, (3, 2), 1, 1),  # padding past the kernel's half: grad_output cropped
    # col2im with W^T packed (rows per group past 512, 128+ pixels): batch 1, and groups whose 630
    # rows end in a partial 8-row block
    (1, 64, 13, 13, 20, (3, 3), 1, 1, 1, 1),
    (4, 140, 12, 12, 24, (3, 3), 2, 1, 1, 2),
    # batch-1 backward-input through the forward engine in one pixel item, the flipped weights packed
    # block by block: 130 rows (16 blocks + 2), k-blocks of 293 and 288 rows ending inside an output
    # channel's taps (65 x 9, 23 x 25), an odd output channel count, groups
    (1, 130, 6, 7, 65, (3, 3), 1, 1, 1, 1),
    (1, 140, 5, 5, 23, (5, 5), 1, 2, 1, 1),
    (1, 144, 5, 6, 66, (3, 3), 1, 1, 1, 2),
    (1, 72, 5, 5, 100, (3, 3), 1, 1, 1, 1),  # ... fewer input than output channels (not col2im then)
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", ENGINE_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_engine_tiles_match_torch(case, algorithm, poison):
    n, c, h, w, oc, k, s, p, d, g = case
    with fastconv.conv_algorithm(algorithm):
        run_case(n, c, h, w, oc, k, s, p, d, g)


def test_stride_phases_match_torch(monkeypatch, poison):
    # the stride-phase backward-input ("benchmark" candidate) on every strided engine case, and col2im
    # over groups of images: ResNet layer4-like downsampling (W^T 2.9 MB, past 2 MiB; 7x7 output planes)
    # at batch 8 and 3 (one group; channels split over 1, 2 and 3 threads) and batch 1
    monkeypatch.setenv("FASTCONV_STRIDE_PHASES", "1")
    strided = [c for c in ENGINE_CASES if c[6] != 1 and c[8] == 1 and c[9] == 1]
    assert len(strided) >= 6
    for n, c, h, w, oc, k, s, p, d, g in strided:
        run_case(n, c, h, w, oc, k, s, p, d, g)
        name = fastconv.conv2d_algorithm(torch.empty(n, c, h, w), torch.empty(oc, c, *k), stride=s, padding=p)
        assert name in PORTABLE or name.split("/")[1] == "stride-phases"
    monkeypatch.delenv("FASTCONV_STRIDE_PHASES")
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for n in (8, 3, 1):
                run_case(n, 256, 14, 14, 320, (3, 3), stride=2)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("whole", ["0", "1"])
@pytest.mark.parametrize("tile", ["2", "4"])
def test_winograd_tiles_and_work_splits_match_torch(tile, whole, monkeypatch, poison):
    # every stride-1 Winograd case on F(2x2, 3x3) and F(4x4, 3x3) (3x3; auto takes 4x4 tiles from 128 of
    # them, so the small shapes here are forced), 5x5 on F(2x2, 5x5), each in blocks of tiles and over
    # whole tiles (auto: whole tiles where blocks would be few): 4-pixel tile remainders, 1x1 and 3x3
    # planes, tile rows of 64+ pixels (several 16-tile windows per row), one and several images
    monkeypatch.setenv("FASTCONV_WINOGRAD_TILE", tile)
    monkeypatch.setenv("FASTCONV_WINOGRAD_WHOLE_TILES", whole)
    extra = [(1, 16, 70, 75, 8, (3, 3), 1, 1, 1, 1), (2, 16, 17, 66, 24, (3, 3), 1, 1, 1, 1)]
    with fastconv.conv_algorithm("winograd"):
        for n, c, h, w, oc, k, s, p, d, g in ENGINE_CASES + extra:
            if k[0] >= 3 and k[1] >= 3 and s == 1 and d == 1 and g == 1:
                run_case(n, c, h, w, oc, k, s, p, d, g)


@pytest.mark.parametrize(
    "shape", [(3, 192, 13, 11, 200, 3, 1), (2, 24, 13, 12, 20, 5, 2), (8, 64, 27, 27, 64, 5, 2), (2, 16, 9, 9, 24, 4, 1)]
)
@pytest.mark.parametrize("tile", ["2", "4"])
def test_winograd_backward_weight_over_whole_tiles_is_thread_count_independent(shape, tile, monkeypatch):
    # all tiles in one or two chunks (3x3 with 192+ channels), in any number of chunks for F(2x2, 5x5)
    # (8x64x27x27: two chunks; 4x4 zero-padded): each task owns its rows of grad_U and reduces over
    # every tile in a fixed order, so 1, 2 and 3 threads give the same bits (and torch's values); 3x3 on
    # 2x2 and on 4x4 output tiles (F(4x4, 3x3): always over whole tiles)
    monkeypatch.setenv("FASTCONV_WINOGRAD_TILE", tile)
    n, c, h, w_, oc, k, pad = shape
    x = torch.randn(n, c, h, w_)
    w = torch.randn(oc, c, k, k)
    go = torch.randn(n, oc, h + 2 * pad - k + 1, w_ + 2 * pad - k + 1)
    ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, go.double(), padding=pad)
    old = torch.get_num_threads()
    grads = []
    try:
        with fastconv.conv_algorithm("winograd"):
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                gw = torch.ops.fastconv._conv2d_backward(go, x, w, [1, 1], [pad, pad], [1, 1], 1, [False, True, False])[1]
                grads.append(gw)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    # F(2x2, 5x5) backward-weight carries more float32 error than 3x3's (its transforms hold 4s, 5s and
    # 1/24s): 1.3e-5-2.0e-5 relative to the largest element on the 5x5 shapes here (the GEMM: 3e-7),
    # inside the 1e-4 asked of Winograd; 3x3 and the zero-padded 4x4: under 1e-6
    tol = 1e-4 if k == 5 else 2e-5
    assert ((grads[0].double() - ref).abs().max() / ref.abs().max()).item() < tol


def test_winograd_backward_weight_ignores_stale_scratch(poison):
    # kernels past 3x3: the last image's shifted reads of V pass the end of the batch, where grad_M is
    # zero; scratch left full of NaN by an earlier, larger call must not turn those products into NaN
    with fastconv.conv_algorithm("winograd"):
        x = torch.full((4, 16, 27, 27), float("nan"), requires_grad=True)
        w = torch.randn(24, 16, 5, 5, requires_grad=True)
        FC.conv2d(x, w, None, 1, 2).sum().backward()
        for _ in range(3):
            run_case(2, 16, 13, 12, 24, (5, 5), 1, 2, 1, 1)
            run_case(1, 16, 9, 10, 8, (7, 7), 1, 3, 1, 1)


@pytest.mark.parametrize("b_source", ["packed", "direct"])
def test_both_b_sources_match_torch(b_source, monkeypatch, poison):
    monkeypatch.setenv("FASTCONV_CPU_GEMM_B", b_source)
    with fastconv.conv_algorithm("gemm"):
        for case in ENGINE_CASES:
            n, c, h, w, oc, k, s, p, d, g = case
            run_case(n, c, h, w, oc, k, s, p, d, g)


# Stride-1 layers read from a zero-padded copy skip, per panel of three row vectors, the kernel rows
# that read only padding: backward-input of unpadded 5x5/7x7 layers (grad_output padded by 4 or 6),
# forward with padding past the kernel (whole panels of padding: bias only), two-row vectors (rows of
# at most 8 pixels), panels straddling images (rows per image not a multiple of 3), dilation, k-blocks
# that cut a channel's taps (K = 120 x 25 past 512).
@pytest.mark.parametrize("case", [
    (3, 6, 12, 12, 16, (5, 5), 1, 0, 1, 1),
    (2, 8, 13, 11, 9, (5, 5), 1, 0, 1, 1),
    (2, 8, 8, 8, 10, (5, 5), 1, 0, 1, 1),
    (3, 6, 11, 7, 9, (7, 7), 1, 0, 1, 1),
    (2, 8, 17, 14, 9, (3, 5), 1, 0, 2, 1),
    (2, 9, 6, 20, 10, (3, 3), 1, (5, 1), 1, 1),
    (2, 9, 5, 6, 10, (3, 3), 1, (4, 2), 1, 1),
    (2, 120, 9, 10, 12, (5, 5), 1, 1, 1, 1),
    (2, 16, 10, 12, 12, (5, 5), 1, 0, 1, 2),
], ids=lambda c: "x".join(map(str, c[:5])) + f"-k{c[5][0]}{c[5][1]}-p{c[7]}-d{c[8]}-g{c[9]}")
def test_padded_direct_skips_padding_rows(case, monkeypatch, poison):
    monkeypatch.setenv("FASTCONV_CPU_GEMM_B", "direct")
    with fastconv.conv_algorithm("gemm"):
        run_case(*case)


# Grouped layers with 16+ output channels per group run on the channel-lane direct kernel
# (grouped_conv2d.h), forward and stride-1 backward-input (its output channels: the input channels per
# group), here forced on wherever it applies: 1-3 vectors of channels and blocks of 32 past 48 (100 =
# 3 x 32 + 4, 144 = 4 x 32 + 16), k-blocks, partial last vectors (17, 20, 24), row segments shifted back
# onto the row (15, 29, 40 pixels), pairs of rows with an odd last row, one-row outputs, stride 2 along
# rows and 3 down, dilation, uneven kernels and padding, kernels wider than the plane, no padding (input
# read in place), batch 1 with rows split over items (one shared padded copy), 1x1.
GROUPED_DIRECT_CASES = [
    (2, 64, 7, 7, 64, (3, 3), 1, 1, 1, 2),
    (3, 32, 14, 15, 64, (3, 3), 1, 1, 1, 2),
    (1, 96, 9, 11, 96, (3, 3), 2, 1, 1, 3),
    (2, 48, 13, 5, 144, (5, 3), 1, (2, 1), 2, 3),
    (1, 40, 8, 8, 200, (3, 3), 1, 1, 1, 2),
    (2, 36, 6, 29, 72, (3, 3), (1, 2), 1, 1, 3),
    (2, 32, 1, 9, 32, (1, 3), 1, (0, 1), 1, 2),
    (2, 32, 10, 10, 48, (3, 3), (3, 1), 0, 1, 2),
    (1, 512, 4, 4, 512, (3, 3), 1, 1, 1, 32),
    (2, 34, 5, 40, 34, (3, 3), 1, 1, 1, 2),
    (3, 64, 6, 6, 128, (1, 1), 1, 0, 1, 2),
    (2, 32, 3, 3, 32, (5, 5), 1, 2, 1, 2),
    (1, 32, 30, 31, 32, (3, 3), 1, 1, 1, 2),
    (2, 128, 7, 9, 128, (3, 3), 1, 1, 1, 2),  # 576 taps in k-blocks of 192, partial sums kept per tile
    (1, 64, 2, 1, 64, (3, 3), 1, 1, 1, 2),    # a shared padded copy of 12-float planes
]


def run_grouped_case(case, monkeypatch, pass_index, algorithm, both_biases=False):
    """run_case with the grouped direct kernels forced on, after checking that the pass (0 forward,
    1 backward-input, 2 backward-weight) runs `algorithm` (skipped without the AVX-512 engine)."""
    monkeypatch.setenv("FASTCONV_GROUPED_DIRECT", "1")
    monkeypatch.setenv("FASTCONV_CPU_WEIGHT_GRAD", "gemm")  # groups of 32+: not the channels-last kernel
    n, c, h, w, oc, k, s, p, d, g = case
    x, wt = torch.randn(n, c, h, w), torch.randn(oc, c // g, *k)
    names = fastconv.conv2d_algorithm(x, wt, s, p, d, g).split("/")
    if names[min(pass_index, len(names) - 1)] != algorithm:
        pytest.skip("no AVX-512 engine on this CPU")
    run_case(*case)
    if both_biases:
        run_case(*case, bias=False)


@pytest.mark.parametrize("case", GROUPED_DIRECT_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-g{c[9]}")
def test_grouped_direct_matches_torch(case, monkeypatch, poison):
    run_grouped_case(case, monkeypatch, 0, "grouped-direct", both_biases=True)



# Groups of 8 or 4 output channels sharing the direct kernel's vectors (2 or 4 groups a vector, the
# input interleaved), forced on: forward, stride-1 backward-input (groups of 8 or 4 input channels) and
# the strided backward-input's phases: stride 1 and 2, (2, 1), a last set with fewer groups (3 groups of
# 4, 5 of 8, 3 of 8), no padding (the interleaved copy still made), padding 2 with a 5x5 kernel,
# dilation 2, k-blocks (48 input channels a group: 432 taps), batch 1 with rows split over items (one
# shared interleaved copy), output planes of 1 row and of 1 pixel.
INTERLEAVED_CASES = [
    (2, 64, 9, 10, 64, (3, 3), 1, 1, 1, 8),
    (2, 64, 11, 12, 64, (3, 3), 2, 1, 1, 8),
    (2, 16, 10, 9, 16, (3, 3), 1, 0, 1, 4),
    (2, 12, 13, 11, 12, (3, 3), 2, 1, 1, 3),
    (2, 40, 6, 7, 40, (3, 3), 2, 1, 1, 5),
    (2, 24, 9, 9, 24, (3, 3), (2, 1), 1, 1, 3),
    (2, 24, 9, 10, 12, (5, 5), 1, 2, 1, 3),
    (2, 32, 11, 11, 32, (3, 3), 1, 2, 2, 4),
    (1, 96, 6, 6, 16, (3, 3), 1, 1, 1, 2),
    (1, 64, 15, 13, 64, (3, 3), 1, 1, 1, 8),
    (2, 32, 1, 9, 32, (1, 3), 1, (0, 1), 1, 4),
    (2, 16, 3, 3, 16, (3, 3), 2, 0, 1, 2),
]


@pytest.mark.parametrize("case", INTERLEAVED_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-s{c[6]}-g{c[9]}")
def test_grouped_direct_groups_share_vectors(case, monkeypatch, poison):
    run_grouped_case(case, monkeypatch, 0, "grouped-direct", both_biases=True)


# channels_last grouped layers run the grouped kernel's NHWC form (each item's planes transposed from
# the input's pixels, interleaved where groups share the vectors, each tile's pixels stored as NHWC
# vectors), forward and stride-1 backward-input, on the cases above where a set's input channels fit one
# vector (not 2 groups of 48 input channels): channels_last results within tolerance of torch in float64, and the same bits as
# the NCHW grouped kernel between transposes (FASTCONV_CPU_CHANNELS_LAST_GROUPED=0 and
# FASTCONV_CPU_CHANNELS_LAST=0: the same sums in the same order), at 1, 2 and 3 threads.
def at_1_2_3_threads(fn):
    """fn() at 1, 2 and 3 threads, the thread count restored after."""
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(old)


def _nhwc_groups_fit(case):
    n, c, h, w, oc, k, s, p, d, g = case
    gi = 16 // (oc // g) if g > 1 and oc // g in (4, 8) else 1
    return gi == 1 or gi * (c // g) <= 16


# ... and outputs past 1 MiB, whose pixels the NHWC tiles store non-temporally (groups of 4 sharing the
# vectors; one group of 16 a vector)
CHANNELS_LAST_GROUPED_CASES = [c for c in GROUPED_DIRECT_CASES + INTERLEAVED_CASES if _nhwc_groups_fit(c)] + [
    (2, 128, 40, 40, 128, (3, 3), 1, 1, 1, 32),
    (2, 256, 32, 32, 256, (3, 3), 1, 1, 1, 16),
]


@pytest.mark.parametrize("case", CHANNELS_LAST_GROUPED_CASES,
                         ids=lambda c: "x".join(map(str, c[:5])) + f"-s{c[6]}-g{c[9]}")
def test_channels_last_grouped_matches_torch_and_nchw_kernel(case, monkeypatch, poison):
    monkeypatch.setenv("FASTCONV_GROUPED_DIRECT", "1")
    n, c, h, w, oc, k, s, p, d, g = case
    x = torch.randn(n, c, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(oc, c // g, *k, dtype=torch.float64), torch.randn(oc, dtype=torch.float64)
    names = fastconv.conv2d_algorithm(x.float(), wt.float(), s, p, d, g).split("/") * 3
    if names[0] != "channels-last-grouped":
        pytest.skip("no AVX-512 engine on this CPU")
    go = torch.randn(F.conv2d(x, wt, None, s, p, d, g).shape, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    ref = F.conv2d(x, wt, b, s, p, d, g)
    want = torch.ops.aten.convolution_backward(go, x, wt, [oc], *pairs(s, p, d), False, [0, 0], g, [True, True, True])
    args = op_args(s, p, d, g)
    xf, wf, bf, gof = x.float(), wt.float(), b.float(), go.float()

    def passes():
        outs = [torch.ops.fastconv.conv2d(xf, wf, bf, *args), torch.ops.fastconv.conv2d(xf, wf, None, *args),
                torch.ops.fastconv.conv2d_relu(xf, wf, bf, *args)]
        return outs + [torch.ops.fastconv._conv2d_backward(gof, xf, wf, *args, [True, False, False])[0]]

    results = at_1_2_3_threads(passes)
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST_GROUPED", "0")
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST", "0")  # nor the NHWC direct kernel
    assert fastconv.conv2d_algorithm(xf, wf, s, p, d, g).split("/")[0] == "grouped-direct"
    nchw = passes()
    expected = [ref, ref - b.view(1, -1, 1, 1), ref.relu(), want[0]]
    for i, (got, exp) in enumerate(zip(results[0], expected)):
        if i == 3 and names[1] != "channels-last-grouped":
            continue  # a strided backward-input: not this kernel
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_written_and_close(got, exp, f"pass {i}")
        for other in results[1:] + [nchw]:
            assert torch.equal(got, other[i]), f"pass {i}: not the same bits"

# Strided grouped backward-input on the same kernel, one stride-1 correlation per phase of grad_input
# (8+ input channels per group): stride 2 (whole rows interleaved from two phases; odd and even widths),
# 2 down only, 2 across only, 3 (element by element), a stride past the kernel (phases no tap reaches:
# zeros), 1x1 downsampling, 5x5 (phases of 3 and 2 taps), padding 0 to past the kernel's half, batch 1,
# blocks of 32 past 48 channels (80 = 32 + 32 + 16) and partial vectors (17, 24, 40).
GROUPED_PHASE_CASES = [
    (2, 64, 14, 14, 64, (3, 3), 2, 1, 1, 2),
    (3, 34, 13, 11, 40, (3, 3), 2, 1, 1, 2),
    (2, 48, 12, 9, 24, (3, 3), (2, 1), (1, 0), 1, 2),
    (2, 32, 9, 12, 48, (3, 3), (1, 2), 1, 1, 2),
    (2, 48, 16, 17, 36, (3, 3), 3, 1, 1, 3),
    (2, 64, 11, 10, 32, (2, 2), 3, 0, 1, 2),
    (2, 96, 10, 13, 64, (1, 1), 2, 0, 1, 2),
    (1, 160, 15, 16, 80, (5, 5), 2, 2, 1, 2),
    (2, 64, 9, 9, 32, (3, 3), 2, (3, 2), 1, 2),
    (1, 160, 7, 8, 96, (3, 3), 2, 1, 1, 2),
    (2, 32, 11, 12, 32, (3, 3), 2, 1, 1, 4),  # 8 input channels per group: 2 groups a vector
    (1, 32, 9, 37, 32, (3, 3), 2, 1, 1, 4),   # rows of 37 and 21: 32 columns a step of the phase rows' write
    (2, 16, 6, 21, 16, (3, 3), 2, 1, 1, 2),
    (2, 256, 48, 48, 256, (3, 3), 2, 1, 1, 32),  # 4.7 MB of grad_input: NHWC pixels stored non-temporally
]


@pytest.mark.parametrize("case", GROUPED_PHASE_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-s{c[6]}-g{c[9]}")
def test_grouped_strided_backward_input_by_phases(case, monkeypatch, poison):
    run_grouped_case(case, monkeypatch, 1, "grouped-direct-phases")



def _nhwc_phase_groups_fit(case):
    """Whether the phases' convolutions (grad_output's channels per group in, the input's out) have an
    NHWC form: one group a vector, or the groups sharing it fit their input channels in one."""
    n, c, h, w, oc, k, s, p, d, g = case
    gi = 16 // (c // g) if g > 1 and c // g in (4, 8) else 1
    return g > 1 and (gi == 1 or gi * (oc // g) <= 16)


# ... and on channels_last tensors its NHWC form (grad_output's pixels padded pixel-major or into planes,
# each phase's tiles stored as NHWC pixels, copied into grad_input's): within tolerance of torch in
# float64 and the same bits as the NCHW phases between transposes, at 1, 2 and 3 threads (rows split).
@pytest.mark.parametrize("case", [c for c in GROUPED_PHASE_CASES if _nhwc_phase_groups_fit(c)],
                         ids=lambda c: "x".join(map(str, c[:5])) + f"-s{c[6]}-g{c[9]}")
def test_channels_last_grouped_strided_backward_input(case, monkeypatch, poison):
    run_channels_last_grouped_gradient(case, monkeypatch, 0, "grouped-direct-phases")


def run_channels_last_grouped_gradient(case, monkeypatch, i, nchw_name):
    """Gradient i (0: input, 1: weight) of a channels_last grouped layer on the grouped kernel's NHWC form
    (skipped without the AVX-512 engine): within tolerance of torch in float64, the same bits at 1, 2 and
    3 threads and as the NCHW kernel `nchw_name` between transposes."""
    monkeypatch.setenv("FASTCONV_GROUPED_DIRECT", "1")
    monkeypatch.setenv("FASTCONV_CPU_WEIGHT_GRAD", "gemm")  # groups of 32+: not the channels-last kernel
    n, c, h, w, oc, k, s, p, d, g = case
    x = torch.randn(n, c, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(oc, c // g, *k, dtype=torch.float64)

    def name():
        return (fastconv.conv2d_algorithm(x.float(), wt.float(), s, p, d, g).split("/") * 3)[i + 1]
    if name() != "channels-last-grouped":
        pytest.skip("no AVX-512 engine on this CPU")
    go = torch.randn(F.conv2d(x, wt, None, s, p, d, g).shape, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    mask = [i == 0, i == 1, False]
    want = torch.ops.aten.convolution_backward(go, x, wt, [oc], *pairs(s, p, d), False, [0, 0], g, mask)[i]
    args = op_args(s, p, d, g)

    def gradient():
        return torch.ops.fastconv._conv2d_backward(go.float(), x.float(), wt.float(), *args, mask)[i]

    got = at_1_2_3_threads(gradient)
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST_GROUPED", "0")
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST_WEIGHT_GRAD", "0")
    assert name() == nchw_name
    nchw = gradient()
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert_written_and_close(got[0], want, f"gradient {i}")
    for other in got[1:] + [nchw]:
        assert torch.equal(got[0], other)


# Grouped 3x3 backward-weight on the channel-lane kernels: output channels in the lanes (1-3 vectors a
# block: 16, 32, 48; 64 = 2 + 2, 80 = 3 + 2 vectors; 1-3 input channels a block at one vector, 17 and 40
# with partial last vectors), or, at most 16 input and 16 output channels per group, input channels in
# the lanes (blocks of 3 output channels: 16 = 5 x 3 + 1, 14 = 4 x 3 + 2; 5 and 16 input channels);
# stride 2, 3 down, (1, 2), padding 0 and 2, batch 1, planes of 1 row. With at most 8 input channels a
# group, several groups share the vector: 2 groups of 8, 4 of 4, 8 of 2 input channels, partial vectors
# (3 channels: 4 groups in 12 lanes; 6: 2 groups in 12), a last set with fewer groups than the vector
# holds (3 groups of 4, 5 of 8, 9 of 2), blocks of 3 output channels and their remainders (1, 2, 4, 5,
# 8, 16 a group), stride 2, (3, 1) and (1, 2), padding 0 and 2, and images in chunks of at least 1024
# output pixels (a partial grad_weight per chunk, added in order): 1 image a chunk at 32x33, chunks of
# 3 with a last one of 1 at 20x20, one chunk of all images at 7x7.
GROUPED_WEIGHT_GRAD_CASES = [
    (2, 32, 7, 7, 64, (3, 3), 1, 1, 1, 2),
    (3, 34, 9, 8, 32, (3, 3), 1, 1, 1, 2),
    (2, 40, 6, 11, 96, (3, 3), 2, 1, 1, 2),
    (1, 64, 8, 9, 128, (3, 3), 1, 1, 1, 2),
    (2, 48, 10, 7, 160, (3, 3), (3, 1), 0, 1, 2),
    (2, 80, 9, 9, 34, (3, 3), (1, 2), 2, 1, 2),
    (2, 32, 7, 7, 32, (3, 3), 1, 1, 1, 2),
    (3, 10, 9, 12, 28, (3, 3), 2, 1, 1, 2),
    (2, 64, 1, 12, 64, (3, 3), 1, 1, 1, 4),
    (1, 48, 5, 5, 48, (3, 3), 1, 0, 1, 3),
    (2, 64, 1, 1, 64, (3, 3), 1, 1, 1, 2),  # 9-float padded planes: vectors of a plane's copy run two planes on
    # several groups to a vector (lane c*gi + i: channel c of group i of the set)
    (2, 64, 9, 10, 64, (3, 3), 1, 1, 1, 8),
    (2, 64, 11, 12, 64, (3, 3), 2, 1, 1, 8),
    (3, 32, 7, 7, 32, (3, 3), 1, 1, 1, 8),
    (2, 16, 10, 9, 8, (3, 3), (3, 1), 0, 1, 8),
    (2, 16, 9, 13, 40, (3, 3), (1, 2), 2, 1, 8),
    (2, 12, 8, 8, 12, (3, 3), 1, 1, 1, 3),
    (2, 40, 6, 7, 40, (3, 3), 2, 1, 1, 5),
    (2, 18, 7, 9, 36, (3, 3), 1, 1, 1, 9),
    (2, 12, 8, 7, 20, (3, 3), 1, 1, 1, 4),
    (2, 30, 6, 6, 10, (3, 3), 1, 1, 1, 5),
    (2, 24, 5, 8, 64, (3, 3), 1, 1, 1, 4),
    (2, 16, 32, 33, 16, (3, 3), 1, 1, 1, 2),
    (4, 32, 20, 20, 32, (3, 3), 1, 1, 1, 4),
    (2, 64, 11, 9, 48, (3, 3), 2, 1, 1, 4),  # one group a vector, 12 output channels, stride 2: NHWC grad_output in place
]


def assert_weight_grad_same_bits_at_1_2_3_threads(go, x, w, stride, padding, groups):
    old = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            grads.append(torch.ops.fastconv._conv2d_backward(go, x, w, [stride] * 2, [padding] * 2, [1, 1], groups,
                                                             [False, True, False])[1])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("case", GROUPED_WEIGHT_GRAD_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-g{c[9]}")
def test_grouped_weight_grad_matches_torch(case, monkeypatch, poison):
    run_grouped_case(case, monkeypatch, 2, "grouped-direct")


def _nhwc_weight_grad_groups_fit(case):
    """Input channels in the lanes (at most 16 input and output channels a group), the set's grad_output
    channels in one vector too."""
    n, c, h, w, oc, k, s, p, d, g = case
    cg, ocg = c // g, oc // g
    gi = 1
    while gi < 8 and 2 * gi * cg <= 16 and gi < g:
        gi *= 2
    return cg <= 16 and ocg <= 16 and gi * ocg <= 16


# ... and on channels_last tensors its NHWC form (each item's padded input pixels and grad_output planes
# made from their pixels): within tolerance of torch in float64 and the same bits as the NCHW kernel
# between transposes, at 1, 2 and 3 threads.
@pytest.mark.parametrize("case", [c for c in GROUPED_WEIGHT_GRAD_CASES if _nhwc_weight_grad_groups_fit(c)],
                         ids=lambda c: "x".join(map(str, c[:5])) + f"-g{c[9]}")
def test_channels_last_grouped_weight_grad(case, monkeypatch, poison):
    run_channels_last_grouped_gradient(case, monkeypatch, 1, "grouped-direct")


def test_grouped_weight_grad_chunks_same_bits_at_any_thread_count():
    # partial grad_weights per chunk of images, added in order: independent of the threads
    x, w = torch.randn(5, 64, 20, 20), torch.randn(64, 8, 3, 3)
    go = torch.randn(5, 64, 20, 20)
    if fastconv.conv2d_algorithm(x, w, 1, 1, 1, 8).split("/")[-1] != "grouped-direct":
        pytest.skip("no AVX-512 engine on this CPU")
    assert_weight_grad_same_bits_at_1_2_3_threads(go, x, w, 1, 1, 8)


# The channels-last direct backward-weight, forced on: output channels 13, 8, 24, 17, 9, 3 (8-row tile
# remainders), input channels a group 20, 17, 2 (idle lanes in the copy's last vector), taps 1, 4, 9,
# 25, 3x1 and 7x7 (tiles of 3, 2 and 1 vectors; the 7x7's 49 taps written 16 at a time), strides
# 2, 3 and (2, 1), dilation 2, padding 0-3, groups 2 and 32, batch 1 (grad_output's rows read in
# place), 1352 pixels (reductions in chunks of 512, the last one short), a copy cropped to the rows
# the taps reach (stride 3 without padding).
CHANNELS_LAST_WEIGHT_GRAD_CASES = [
    (2, 32, 9, 11, 13, (3, 3), 1, 1, 1, 1),
    (1, 20, 7, 6, 8, (2, 2), 1, 0, 1, 1),
    (3, 64, 10, 10, 24, (5, 5), 2, 2, 1, 2),
    (2, 16, 12, 13, 17, (1, 1), 1, 0, 1, 1),
    (2, 48, 8, 9, 36, (3, 1), (2, 1), (1, 0), 1, 3),
    (2, 40, 9, 9, 16, (3, 3), 1, 2, 2, 1),
    (8, 17, 13, 13, 9, (3, 3), 1, 1, 1, 1),
    (2, 64, 7, 7, 64, (3, 3), 1, 1, 1, 32),
    (1, 8, 5, 5, 3, (7, 7), 1, 3, 1, 1),
    (2, 24, 14, 11, 16, (3, 3), 3, 0, 1, 1),
]


@pytest.mark.parametrize("case", CHANNELS_LAST_WEIGHT_GRAD_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-g{c[9]}")
def test_channels_last_weight_grad_matches_torch(case, monkeypatch, poison):
    monkeypatch.setenv("FASTCONV_CPU_WEIGHT_GRAD", "channels-last")
    n, c, h, w, oc, k, s, p, d, g = case
    name = fastconv.conv2d_algorithm(torch.empty(n, c, h, w), torch.empty(oc, c // g, *k), s, p, d, g)
    if name.split("/")[-1] != "channels-last-direct":
        pytest.skip("no AVX-512 engine on this CPU")
    run_case(*case)



# ... on channels_last tensors straight from their pixels (the padded copy by row copies, grad_output's
# rows by one transpose): within tolerance of torch in float64, the same bits as from NCHW tensors.
@pytest.mark.parametrize("case", CHANNELS_LAST_WEIGHT_GRAD_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-g{c[9]}")
def test_channels_last_weight_grad_from_nhwc_tensors(case, monkeypatch, poison):
    monkeypatch.setenv("FASTCONV_CPU_WEIGHT_GRAD", "channels-last")
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST_WEIGHT_GRAD", "0")  # not the in-place kernel
    n, c, h, w, oc, k, s, p, d, g = case
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    wt = torch.randn(oc, c // g, *k, dtype=torch.float64)
    xc = x.float().contiguous(memory_format=torch.channels_last)
    if (fastconv.conv2d_algorithm(xc, wt.float(), s, p, d, g).split("/") * 3)[2] != "channels-last-direct":
        pytest.skip("no AVX-512 engine on this CPU")
    go = torch.randn(F.conv2d(x, wt, None, s, p, d, g).shape, dtype=torch.float64)
    want = torch.ops.aten.convolution_backward(go, x, wt, [oc], *pairs(s, p, d), False, [0, 0], g,
                                               [False, True, False])[1]
    args = op_args(s, p, d, g)
    mask = [False, True, False]
    got = torch.ops.fastconv._conv2d_backward(go.float().contiguous(memory_format=torch.channels_last), xc,
                                              wt.float(), *args, mask)[1]
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_written_and_close(got, want, "grad_weight")
    nchw = torch.ops.fastconv._conv2d_backward(go.float(), x.float(), wt.float(), *args, mask)[1]
    assert torch.equal(got, nchw)

def test_channels_last_weight_grad_same_bits_at_any_thread_count(monkeypatch):
    # every grad_weight element is one task's fixed-order sum over the whole batch: no partials
    monkeypatch.setenv("FASTCONV_CPU_WEIGHT_GRAD", "channels-last")
    x, w = torch.randn(3, 64, 15, 15), torch.randn(40, 32, 3, 3)
    go = torch.randn(3, 40, 8, 8)
    if fastconv.conv2d_algorithm(x, w, 2, 1, 1, 2).split("/")[-1] != "channels-last-direct":
        pytest.skip("no AVX-512 engine on this CPU")
    assert_weight_grad_same_bits_at_1_2_3_threads(go, x, w, 2, 1, 2)


def test_channels_last_weight_grad_rule(monkeypatch):
    """By rule on wide stride-1 3x3 layers (not Winograd's), not strided, not below 32 channels a group,
    not on 1x1 or 5x5; FASTCONV_CPU_WEIGHT_GRAD=gemm and the "gemm" setting turn it off."""
    def bww(xs, ws, s=1, p=1, g=1):
        return fastconv.conv2d_algorithm(torch.empty(xs), torch.empty(ws), s, p, 1, g).split("/")[-1]
    # 1024 -> 512 at 7x7: past every host's Winograd backward-weight rule (Intel AVX-512 hosts take 3x3
    # Winograd up to 512 x 512 channels, so ResNet's 512 at 7x7 would test that rule instead)
    if bww((8, 1024, 7, 7), (512, 1024, 3, 3)) in PORTABLE:
        pytest.skip("no AVX-512 engine on this CPU")
    assert bww((8, 1024, 7, 7), (512, 1024, 3, 3)) == "channels-last-direct"
    assert bww((8, 1024, 7, 7), (1024, 32, 3, 3), g=32) == "channels-last-direct"
    assert bww((8, 64, 56, 56), (128, 64, 3, 3), 2) == "im2col+gemm"
    assert bww((8, 512, 14, 14), (512, 16, 3, 3), g=32) != "channels-last-direct"
    assert bww((8, 256, 28, 28), (64, 256, 1, 1), p=0) != "channels-last-direct"
    assert bww((8, 64, 27, 27), (192, 64, 5, 5), p=2) != "channels-last-direct"
    with fastconv.conv_algorithm("gemm"):
        assert bww((8, 1024, 7, 7), (512, 1024, 3, 3)) == "im2col+gemm"
    monkeypatch.setenv("FASTCONV_CPU_WEIGHT_GRAD", "gemm")
    assert bww((8, 1024, 7, 7), (512, 1024, 3, 3)) == "im2col+gemm"


# Groups of 8-15 output channels (half-empty vectors) take the grouped kernels by rule (not forced)
# for the strided forward and, 8 a group sharing the vectors two by two, the forward on planes of at
# most 64 pixels (the GEMM otherwise, its work items split over the groups: few pixels, every thread
# gets groups), and for backward-weight (at most 16 input channels a group: several groups a vector).
# Threads 1-3.
SMALL_GROUP_CASES = [
    ((2, 64, 14, 14, 64, (3, 3), 2, 1, 1, 8), ("grouped-direct", "grouped-direct")),
    ((2, 48, 9, 11, 36, (3, 3), 2, 1, 1, 4), ("grouped-direct", "grouped-direct")),
    ((1, 40, 8, 8, 40, (3, 3), 1, 1, 1, 5), ("grouped-direct", "grouped-direct")),
    ((2, 64, 20, 20, 64, (3, 3), 1, 1, 1, 8), (None, "grouped-direct")),
]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", SMALL_GROUP_CASES, ids=lambda c: "x".join(map(str, c[0][:5])) + f"-g{c[0][9]}")
def test_small_groups_match_torch(case, threads, poison):
    (n, c, h, w, oc, k, s, p, d, g), (fwd, bww) = case
    names = fastconv.conv2d_algorithm(torch.empty(n, c, h, w), torch.empty(oc, c // g, *k), s, p, d, g).split("/")
    if set(names) & set(PORTABLE):
        pytest.skip("no AVX-512 engine on this CPU")
    names = names * 3 if len(names) == 1 else names
    assert (names[0] == "grouped-direct") == (fwd == "grouped-direct"), names
    assert (names[2] == "grouped-direct") == (bww == "grouped-direct"), names
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        run_case(n, c, h, w, oc, k, s, p, d, g)
    finally:
        torch.set_num_threads(old)


# (2 groups of 48 channels; 5 groups of 8, 2 to a vector, the last set one group)
@pytest.mark.parametrize("groups, out_channels", [(2, 96), (5, 40)])
def test_grouped_direct_relu_is_relu_of_conv2d(groups, out_channels, monkeypatch):
    # bias and ReLU in the kernel's epilogue: bitwise the unfused op then relu, NaN kept
    monkeypatch.setenv("FASTCONV_GROUPED_DIRECT", "1")
    x, w, b = torch.randn(2, 80, 7, 9), torch.randn(out_channels, 80 // groups, 3, 3), torch.randn(out_channels)
    x[1, 40, 3, 3] = float("nan")
    args = ([1, 1], [1, 1], [1, 1], groups)
    if fastconv.conv2d_algorithm(x, w, 1, 1, 1, groups).split("/")[0] != "grouped-direct":
        pytest.skip("no AVX-512 engine on this CPU")
    fused = torch.ops.fastconv.conv2d_relu(x, w, b, *args)
    plain = torch.ops.fastconv.conv2d(x, w, b, *args)
    assert torch.isnan(fused).any() and (fused == 0).any()
    torch.testing.assert_close(fused, plain.relu(), rtol=0, atol=0, equal_nan=True)


# Depthwise forward, backward-input and backward-weight with 16 channels in the lanes (forced on, and
# off: the phase planes): one block, partial blocks (17, 33, 40 channels), rows cut into tiles of 1-8 pixels
# (1, 7, 23, 40, 140 and 300 wide: past 128 each row goes to the planes alone), kernels 3/5/7 wide
# (registers reused across the row) and others (1x7, 4x4, 3x5), strides 2 and 3, dilation, no
# padding, padding past the kernel's half, 1x1 planes, batch 1 (rows split into runs).
DW_LANE_CASES = [
    (2, 16, 7, 7, 16, (7, 7), 1, 3, 1, 16),
    (3, 40, 9, 11, 40, (5, 5), 1, 2, 1, 40),
    (1, 17, 20, 23, 17, (3, 3), 1, 1, 1, 17),
    (2, 24, 15, 13, 24, (5, 5), 2, 2, 1, 24),
    (2, 20, 16, 17, 20, (3, 3), 3, 1, 1, 20),
    (2, 16, 12, 14, 16, (3, 5), (1, 2), (2, 1), (2, 1), 16),
    (1, 32, 1, 1, 32, (7, 7), 1, 3, 1, 32),
    (2, 33, 10, 9, 33, (7, 7), 1, 0, 1, 33),
    (1, 16, 5, 40, 16, (1, 7), 1, (0, 3), 1, 16),
    (2, 8, 8, 9, 8, (4, 4), 1, (2, 1), 1, 8),
    (1, 16, 6, 6, 16, (3, 3), 1, 2, 1, 16),
    (1, 16, 3, 300, 16, (5, 5), 1, 2, 1, 16),
    (4, 16, 5, 140, 16, (5, 5), 1, 2, 1, 16),
    # backward-input by phases of grad_input: stride 2 with dilation 2 (phases no tap reaches: zero rows
    # and columns), uneven strides and dilations, a stride past the kernel, stride 1 with padding past
    # dilation * (kernel - 1) (not a forward convolution)
    (2, 16, 11, 12, 16, (3, 3), 2, 2, 2, 16),
    (1, 20, 9, 13, 20, (5, 3), (3, 1), (1, 2), (1, 2), 20),
    (2, 16, 9, 10, 16, (2, 2), 3, 0, 1, 16),
    (1, 16, 5, 6, 16, (3, 3), 1, 3, 1, 16),
]


@pytest.mark.parametrize("lanes", ["1", "0"])
@pytest.mark.parametrize("case", DW_LANE_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-k{c[5][0]}{c[5][1]}")
def test_depthwise_channel_lanes_match_torch(case, lanes, monkeypatch, poison):
    monkeypatch.setenv("FASTCONV_DW_LANES", lanes)
    run_case(*case)
    if case[0] == 1:
        run_case(*case, bias=False)


def pairs(*values):
    """int-or-pair conv arguments (stride, padding, dilation) as pairs."""
    return tuple((v, v) if isinstance(v, int) else tuple(v) for v in values)


def op_args(s, p, d, g):
    """stride, padding and dilation as the ops' int lists, then groups."""
    return tuple(list(v) for v in pairs(s, p, d)) + (g,)


def assert_written_and_close(got, want, what):
    """Every element written (poisoned allocations show as NaN) and within 2e-5 of want, relative to
    want's largest element."""
    assert torch.isfinite(got).all(), f"{what}: unwritten (NaN) elements"
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < 2e-5, f"{what}: max error {err:.2e}"


# A channels_last input runs the lane forward in place (NHWC in, NHWC out: no transposes); every
# other kernel on an NCHW copy. Either way the output is channels_last, as torch's, and the fake
# kernel (torch.compile / export tracing) gives the same strides.
@pytest.mark.parametrize("lanes", ["1", "0"])
@pytest.mark.parametrize("case", [DW_LANE_CASES[i] for i in (0, 1, 2, 3, 5, 7)] + [(2, 16, 9, 10, 24, (3, 3), 1, 1, 1, 1)],
                         ids=lambda c: "x".join(map(str, c[:5])) + f"-g{c[9]}")
def test_channels_last_conv_matches_torch(case, lanes, monkeypatch, poison):
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("FASTCONV_DW_LANES", lanes)
    n, c, h, w, oc, k, s, p, d, g = case
    x = torch.randn(n, c, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(oc, c // g, *k, dtype=torch.float64), torch.randn(oc, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), wt.clone().requires_grad_()
    ref = F.conv2d(xr, wr, b, s, p, d, g)
    go = torch.randn_like(ref)
    ref.backward(go)
    xf, wf = x.float().requires_grad_(), wt.float().requires_grad_()
    assert xf.is_contiguous(memory_format=torch.channels_last) and not xf.is_contiguous()
    out = FC.conv2d(xf, wf, b.float(), s, p, d, g)
    out.backward(go.float())
    assert out.is_contiguous(memory_format=torch.channels_last)
    for name, got, want in (("output", out, ref), ("grad_input", xf.grad, xr.grad), ("grad_weight", wf.grad, wr.grad)):
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < 2e-5, f"{name}: max error {err:.2e}"
    args = op_args(s, p, d, g)
    xd, wd = xf.detach(), wf.detach()
    real = torch.ops.fastconv.conv2d(xd, wd, None, *args)
    mode = FakeTensorMode()
    fx, fw = mode.from_tensor(xd), mode.from_tensor(wd)
    with mode:
        fake = torch.ops.fastconv.conv2d(fx, fw, None, *args)
    assert fake.shape == real.shape and fake.stride() == real.stride()


# The NHWC direct forward (cpu/channels_last_conv2d.h), forced on: output channels 1-256 (blocks of
# 1-3 vectors: 17 = 2 vectors, 64 = 2+2, 80 = 3+2, 256 = 3+3+3+3+2+2), input channels 1-200 (200 with 3x3:
# three reduction blocks; below 16 a group the flat tile), pixel counts off the 8-pixel tile (tiles
# across rows and images), stride, dilation, asymmetric and cropping padding, groups, batch 1,
# unpadded layers read in place. The tests run each with NCHW and with channels_last weights (read in
# place: their rows in (tap, channel) order, and for backward-input 16 consecutive channels a vector).
CHANNELS_LAST_DIRECT_CASES = [
    (2, 16, 9, 11, 17, (3, 3), 1, 1, 1, 1),
    (1, 200, 7, 6, 64, (3, 3), 1, 1, 1, 1),
    (3, 3, 10, 9, 80, (3, 3), 2, 1, 1, 1),
    (2, 64, 6, 5, 256, (1, 1), 1, 0, 1, 1),
    (1, 48, 8, 8, 1, (1, 1), 1, 0, 1, 1),
    (2, 20, 15, 13, 33, (3, 5), (2, 3), (1, 0), (1, 2), 1),
    (2, 64, 7, 7, 64, (3, 3), 1, 1, 1, 32),
    (2, 48, 9, 9, 96, (3, 3), 1, 1, 1, 3),
    (1, 24, 12, 12, 40, (5, 5), 3, (2, 1), 2, 2),
    (2, 32, 14, 14, 48, (3, 3), 2, 0, 1, 1),
    (3, 1, 9, 8, 33, (3, 2), 1, (1, 0), (2, 1), 1),
    (2, 5, 11, 10, 20, (5, 5), 1, 2, 1, 1),
    (2, 3, 27, 25, 20, (11, 11), 4, 2, 1, 1),  # AlexNet's conv1 in small: 363 flat rows
]


WEIGHT_LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("weight_layout", WEIGHT_LAYOUTS, ids=["weight-nchw", "weight-nhwc"])
@pytest.mark.parametrize("case", CHANNELS_LAST_DIRECT_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-g{c[9]}")
def test_channels_last_direct_forward_matches_torch(case, weight_layout, monkeypatch, poison):
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST", "1")
    n, c, h, w, oc, k, s, p, d, g = case
    x = torch.randn(n, c, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(oc, c // g, *k, dtype=torch.float64), torch.randn(oc, dtype=torch.float64)
    wt = wt.contiguous(memory_format=weight_layout)
    if fastconv.conv2d_algorithm(x.float(), wt.float(), s, p, d, g).split("/")[0] != "channels-last-direct":
        pytest.skip("no AVX-512 engine on this CPU")
    ref = F.conv2d(x, wt, b, s, p, d, g)
    args = op_args(s, p, d, g)
    for bias in (b, None):
        want = ref if bias is not None else ref - b.view(1, -1, 1, 1)
        for op, expect in ((torch.ops.fastconv.conv2d, want), (torch.ops.fastconv.conv2d_relu, want.relu())):
            out = op(x.float(), wt.float(), None if bias is None else bias.float(), *args)
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert_written_and_close(out, expect, str(op))
    # float16 in, float16 out, through the same kernel in float32
    half = FC.conv2d(x.half(), wt.half(), b.half(), s, p, d, g)
    assert half.dtype == torch.float16 and half.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(half.double(), F.conv2d(x.half().double(), wt.half().double(), b.half().double(), s, p,
                                                       d, g), rtol=2e-3, atol=2e-3 * ref.abs().max().item())


@pytest.mark.parametrize("oc", [256, 200])
def test_channels_last_direct_forward_streamed_output_matches_torch(oc, monkeypatch, poison):
    """Input and output together past 16 MiB: the NHWC forward stores whole, aligned vectors
    non-temporally (200 channels: pixels whose channel rows are not 64-byte aligned and a partial last
    vector take ordinary stores), with bias and ReLU."""
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST", "1")
    x = torch.randn(2, 64, 128, 128).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(oc, 64, 1, 1), torch.randn(oc)
    if fastconv.conv2d_algorithm(x, wt).split("/")[0] != "channels-last-direct":
        pytest.skip("no AVX-512 engine on this CPU")
    assert 4 * (x.numel() + 2 * oc * 128 * 128) > 16 << 20
    ref = F.conv2d(x.double(), wt.double(), b.double())
    for op, want in ((torch.ops.fastconv.conv2d, ref), (torch.ops.fastconv.conv2d_relu, ref.relu())):
        out = op(x, wt, b, *op_args(1, 0, 1, 1))
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_written_and_close(out, want, str(op))


@pytest.mark.parametrize("weight_layout", WEIGHT_LAYOUTS, ids=["weight-nchw", "weight-nhwc"])
@pytest.mark.parametrize("case", CHANNELS_LAST_DIRECT_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-g{c[9]}")
def test_channels_last_direct_backward_input_matches_torch(case, weight_layout, monkeypatch, poison):
    """The stride-1 backward-input of a channels_last input on the same kernel (grad_output convolved
    with the flipped, transposed weights): channels_last grad_input, alone or with the weight and bias
    gradients the NCHW kernels compute beside it."""
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST", "1")
    n, c, h, w, oc, k, s, p, d, g = case
    x = torch.randn(n, c, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(oc, c // g, *k, dtype=torch.float64).contiguous(memory_format=weight_layout)
    if (fastconv.conv2d_algorithm(x.float(), wt.float(), s, p, d, g).split("/") * 3)[1] != "channels-last-direct":
        pytest.skip("strided or cropping (not a forward of grad_output), or no AVX-512 engine on this CPU")
    check_channels_last_backward_input(x, wt, s, p, d, g)


def check_channels_last_backward_input(x, wt, s, p, d, g):
    """fastconv's backward of float64 channels_last x and weights wt (in float32) against torch's in
    float64: channels_last grad_input alone, or with the weight and bias gradients; grad_output of either
    layout."""
    go = torch.randn(F.conv2d(x, wt, None, s, p, d, g).shape, dtype=torch.float64)
    want = torch.ops.aten.convolution_backward(go, x, wt, [wt.shape[0]], *pairs(s, p, d), False, [0, 0], g,
                                               [True, True, True])
    args = op_args(s, p, d, g)
    for layout in (torch.channels_last, torch.contiguous_format):
        go_f = go.float().contiguous(memory_format=layout)
        for mask in ([True, False, False], [True, True, True]):
            got = torch.ops.fastconv._conv2d_backward(go_f, x.float(), wt.float(), *args, mask)
            assert got[0].is_contiguous(memory_format=torch.channels_last)
            for i in (i for i in range(3) if mask[i]):
                assert_written_and_close(got[i], want[i], f"gradient {i}, mask {mask}")


# The in-place channels_last backward-weight (cpu/channels_last_weight_grad_in_place.h), forced on: output
# channels 1, 6, 17, 30, 48, 64, 70, 130 (1-4 vectors, masked last vectors, column blocks of 4 vectors
# and their remainders), rows C*KH*KW of 1, 9, 13 (row tiles 7 + 6), 25, 27, 75, 147 (6-row tiles of 4
# vectors), stride 2, 3 and (2, 1), dilation 2, asymmetric padding and padding past the kernel's reach,
# unpadded layers read in place, batch 1, 3280 pixels of 16 input channels (blocks of at most 2688
# pixels: two of 1640).
CHANNELS_LAST_WEIGHT_GRAD_IN_PLACE_CASES = [
    (3, 1, 20, 21, 32, (3, 3), 1, 1, 1),
    (2, 16, 40, 41, 24, (3, 3), 1, 1, 1),
    (1, 1, 12, 11, 6, (5, 5), 1, 0, 1),
    (2, 1, 13, 12, 30, (5, 5), 1, 0, 1),
    (2, 3, 17, 16, 64, (7, 7), 2, 3, 1),
    (2, 3, 9, 10, 17, (3, 3), (2, 1), (0, 2), (1, 2)),
    (1, 13, 7, 9, 70, (1, 1), 2, 0, 1),
    (2, 3, 11, 11, 48, (5, 5), 3, 2, 2),
    (2, 4, 6, 6, 130, (3, 3), 1, 4, 1),
    (2, 1, 5, 5, 1, (1, 1), 1, 0, 1),
    (1, 64, 8, 8, 33, (1, 1), 2, 0, 1),
]


@pytest.mark.parametrize("case", CHANNELS_LAST_WEIGHT_GRAD_IN_PLACE_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_channels_last_weight_grad_in_place_matches_torch(case, monkeypatch, poison):
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST_WEIGHT_GRAD", "1")
    n, c, h, w, oc, k, s, p, d = case
    # .to gives channels_last strides to one-channel tensors too (.contiguous keeps NCHW ones)
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(memory_format=torch.channels_last)
    wt = torch.randn(oc, c, *k, dtype=torch.float64)
    if fastconv.conv2d_algorithm(x.float(), wt.float(), s, p, d).split("/")[-1] != "channels-last-direct":
        pytest.skip("no AVX-512 engine on this CPU")
    go = torch.randn(F.conv2d(x, wt, None, s, p, d).shape, dtype=torch.float64)
    want = torch.ops.aten.convolution_backward(go, x, wt, [oc], *pairs(s, p, d), False, [0, 0], 1, [True, True, True])
    args = op_args(s, p, d, 1)
    for layout in (torch.channels_last, torch.contiguous_format):  # grad_output of either layout
        go_f = go.float().contiguous(memory_format=layout)
        for mask in ([False, True, False], [True, True, True], [False, True, True]):
            got = torch.ops.fastconv._conv2d_backward(go_f, x.float(), wt.float(), *args, mask)
            assert got[1].shape == wt.shape
            for i in (i for i in range(3) if mask[i]):
                assert_written_and_close(got[i], want[i], f"gradient {i}, mask {mask}")
    # 4500 pixels at 1-3 threads: partials per block of pixels (at most 3712 here: two of 2250), a size set
    # by the layer, added in order; the threads split each block's row tiles too
    xb = torch.randn(5, 3, 30, 30).to(memory_format=torch.channels_last)
    gob = torch.randn(5, 20, 30, 30).to(memory_format=torch.channels_last)
    assert_weight_grad_same_bits_at_1_2_3_threads(gob, xb, torch.randn(20, 3, 3, 3), 1, 1, 1)


def test_channels_last_weight_grad_in_place_rule():
    """By rule on channels_last layers of few FLOPs an element (first layers, 1x1 layers) and strided
    layers of small partial sums, not on wide 3x3 layers, grouped layers, NCHW inputs or under the "gemm" setting."""
    def bww(xs, ws, s=1, p=1, g=1, layout=torch.channels_last):
        x, w = torch.empty(xs).to(memory_format=layout), torch.empty(ws).to(memory_format=layout)
        return fastconv.conv2d_algorithm(x, w, s, p, 1, g).split("/")[-1]
    if bww((8, 64, 7, 7), (64, 64, 3, 3)) in PORTABLE:
        pytest.skip("no AVX-512 engine on this CPU")
    assert bww((512, 1, 28, 28), (32, 1, 3, 3)) == "channels-last-direct"
    assert bww((4, 3, 224, 224), (64, 3, 7, 7), 2, 3) == "channels-last-direct"
    assert bww((8, 64, 56, 56), (128, 64, 1, 1), 2, 0) == "channels-last-direct"
    assert bww((8, 64, 56, 56), (64, 64, 3, 3)) != "channels-last-direct"
    assert bww((8, 512, 7, 7), (2048, 512, 1, 1), 1, 0) != "channels-last-direct"
    # strided layers of 2+ taps whose blocks' partial sums stay within 6 MB (2.1 MB), each block 128+ pixels
    assert bww((8, 64, 56, 56), (128, 64, 3, 3), 2, 1) == "channels-last-direct"
    assert bww((32, 128, 28, 28), (256, 128, 3, 3), 2, 1) != "channels-last-direct"  # 11.8 MB
    assert bww((1, 256, 14, 14), (512, 256, 3, 3), 2, 1) != "channels-last-direct"  # 49 pixels
    assert bww((8, 64, 56, 56), (64, 2, 3, 3), g=32) != "channels-last-direct"
    assert bww((512, 2, 28, 28), (32, 2, 3, 3), layout=torch.contiguous_format) != "channels-last-direct"
    # an NCHW image into a channels_last model: channels_last results, grad_output read in place
    x, w = torch.empty(512, 1, 28, 28), torch.empty(32, 1, 3, 3).to(memory_format=torch.channels_last)
    assert fastconv.conv2d_algorithm(x, w, 1, 1).split("/")[-1] == "channels-last-direct"
    with fastconv.conv_algorithm("gemm"):
        assert bww((512, 1, 28, 28), (32, 1, 3, 3)) != "channels-last-direct"


# The NHWC depthwise kernels (cpu/channels_last_depthwise.h): channel counts off the 16-lane vector and
# the 128-channel block (17, 130, 300), border columns and interior 2-pixel tiles with a tail, stride,
# dilation, asymmetric kernels and padding, padding past the kernel's reach, 1x1, batch 1; 3x3
# backward-weight's register blocks of 1-3 vectors (200 channels: 3+3+3+2+2), planes narrower than the
# taps' reach, and a plane past 28x28; the per-tap dots for other kernels (5x5, 7x7, 4x4, 5x3, 3x5, 1x1);
# strided backward-input by phases (40, 64, 100, 130, 144 at strides 2, (2, 1) and 3, a 4x4 kernel) and
# per pixel (dilation 2). Stride-1
# kernel rows of 3 taps run on 8-pixel x 1-2 vector tiles: interior rows of 1-10 pixels (every tile
# remainder), 1-9 vectors (odd counts: a last 1-vector part; masked last vectors), a 5x3 kernel.
CHANNELS_LAST_DEPTHWISE_CASES = [
    (2, 200, 6, 7, (3, 3), 1, 1, 1),
    (1, 40, 4, 4, (3, 3), 1, 1, 1),
    (1, 48, 5, 6, (3, 3), 1, 1, 1),
    (2, 24, 5, 8, (3, 3), 1, 1, 1),
    (1, 50, 4, 9, (3, 3), 1, 1, 1),
    (1, 130, 3, 10, (3, 3), 1, 1, 1),
    (2, 20, 9, 12, (5, 3), 1, (2, 1), 1),
    (2, 40, 3, 2, (3, 3), (2, 1), 1, 1),
    (1, 64, 30, 29, (3, 3), 1, 1, 1),
    (2, 17, 9, 11, (3, 3), 1, 1, 1),
    (1, 144, 14, 14, (3, 3), 2, 1, 1),
    (2, 40, 13, 12, (5, 5), 2, 2, 1),
    (3, 32, 7, 7, (7, 7), 1, 3, 1),
    (2, 16, 10, 9, (3, 3), 1, 2, 2),
    (1, 130, 5, 6, (3, 3), 3, 0, 1),
    (2, 8, 6, 6, (3, 5), (1, 2), (0, 2), (2, 1)),
    (1, 300, 4, 4, (1, 1), 1, 0, 1),
    (2, 33, 8, 8, (3, 3), 1, 5, 1),
    (2, 64, 11, 13, (4, 4), 2, 1, 1),
    (1, 100, 10, 9, (5, 5), 3, 2, 1),
]


@pytest.mark.parametrize("case", CHANNELS_LAST_DEPTHWISE_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_channels_last_depthwise_matches_torch(case, poison):
    n, c, h, w, k, s, p, d = case
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    wt, b = torch.randn(c, 1, *k, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    if fastconv.conv2d_algorithm(x.float(), wt.float(), s, p, d, c) != "direct":
        pytest.skip("no AVX-512 engine on this CPU")
    ref = F.conv2d(x, wt, b, s, p, d, c)
    go = torch.randn(ref.shape, dtype=torch.float64)
    want = torch.ops.aten.convolution_backward(go, x, wt, [c], *pairs(s, p, d), False, [0, 0], c, [True, True, True])
    args = op_args(s, p, d, c)
    xf = x.float().contiguous(memory_format=torch.channels_last)
    for op, expect in ((torch.ops.fastconv.conv2d, ref), (torch.ops.fastconv.conv2d_relu, ref.relu())):
        out = op(xf, wt.float(), b.float(), *args)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_written_and_close(out, expect, str(op))
    assert_written_and_close(torch.ops.fastconv.conv2d(xf, wt.float(), None, *args), ref - b.view(1, -1, 1, 1), "no bias")
    for layout in (torch.channels_last, torch.contiguous_format):  # grad_output of either layout
        go_f = go.float().contiguous(memory_format=layout)
        for mask in ([True, False, False], [False, True, False], [True, True, True]):
            got = torch.ops.fastconv._conv2d_backward(go_f, xf, wt.float(), *args, mask)
            for i in (i for i in range(3) if mask[i]):
                assert_written_and_close(got[i], want[i], f"gradient {i}, mask {mask}")
            if mask[0]:
                assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", [(2, 144, 120, 120, 1), (2, 144, 121, 119, 2), (1, 136, 160, 161, 1),
                                  (1, 136, 80, 81, 2), (2, 64, 80, 81, 2)], ids=str)
def test_channels_last_depthwise_streamed_outputs_match_torch(case, poison):
    """Input and output together past 16 MiB (stride 1), or grad_input past 3 MiB (stride 2, by phases):
    the NHWC depthwise forward and backward-input store whole, aligned vectors non-temporally; 136
    channels: pixels whose channel rows are not 64-byte aligned and a partial last vector take ordinary
    stores."""
    n, c, h, w, s = case
    x = torch.randn(n, c, h, w)
    wt, b = torch.randn(c, 1, 3, 3), torch.randn(c)
    if fastconv.conv2d_algorithm(x, wt, s, 1, 1, c) != "direct":
        pytest.skip("no AVX-512 engine on this CPU")
    ref = F.conv2d(x.double(), wt.double(), b.double(), s, 1, 1, c)
    assert 4 * (x.numel() + ref.numel()) > 16 << 20 if s == 1 else 4 * x.numel() >= 3 << 20
    go = torch.randn(ref.shape)
    want = torch.ops.aten.convolution_backward(go.double(), x.double(), wt.double(), [c], [s, s], [1, 1], [1, 1], False,
                                               [0, 0], c, [True, False, False])[0]
    xf = x.contiguous(memory_format=torch.channels_last)
    assert_written_and_close(torch.ops.fastconv.conv2d(xf, wt, b, *op_args(s, 1, 1, c)), ref, "forward")
    got = torch.ops.fastconv._conv2d_backward(go.contiguous(memory_format=torch.channels_last), xf, wt,
                                              *op_args(s, 1, 1, c), [True, False, False])[0]
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_written_and_close(got, want, "grad_input")


@pytest.mark.parametrize("k,c", [(3, 16), (3, 40), (5, 36), (5, 150)], ids=str)
def test_channels_last_depthwise_strided_row_tiles_match_torch(k, c, poison):
    """Strided NHWC depthwise layers on the row tiles (kernel rows of k taps at stride 2 in the forward;
    the backward-input's phases are stride-1 rows of 1-3 taps): widths 5-24 give interior rows of 1 to
    more than 8 pixels (every tile remainder), 1-10 vectors of channels (masked last vectors)."""
    for w in range(5, 25):
        x = torch.randn(2, c, 7, w, dtype=torch.float64)
        wt = torch.randn(c, 1, k, k, dtype=torch.float64)
        if fastconv.conv2d_algorithm(x.float(), wt.float(), 2, k // 2, 1, c) != "direct":
            pytest.skip("no AVX-512 engine on this CPU")
        ref = F.conv2d(x, wt, None, 2, k // 2, 1, c)
        go = torch.randn(ref.shape, dtype=torch.float64)
        want = torch.ops.aten.convolution_backward(go, x, wt, None, [2, 2], [k // 2] * 2, [1, 1], False, [0, 0], c,
                                                   [True, False, False])[0]
        xf = x.float().contiguous(memory_format=torch.channels_last)
        args = op_args(2, k // 2, 1, c)
        assert_written_and_close(torch.ops.fastconv.conv2d(xf, wt.float(), None, *args), ref, f"forward, width {w}")
        got = torch.ops.fastconv._conv2d_backward(go.float().contiguous(memory_format=torch.channels_last), xf,
                                                  wt.float(), *args, [True, False, False])[0]
        assert_written_and_close(got, want, f"grad_input, width {w}")


def test_channels_last_depthwise_same_bits_at_any_thread_count():
    x = torch.randn(3, 200, 13, 11).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(200, 1, 3, 3), torch.randn(200)
    if fastconv.conv2d_algorithm(x, w, 1, 1, 1, 200) != "direct":
        pytest.skip("no AVX-512 engine on this CPU")
    y = FC.conv2d(x, w, b, 1, 1, 1, 200)
    go = torch.randn_like(y)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append((FC.conv2d(x, w, b, 1, 1, 1, 200),
                            *torch.ops.fastconv._conv2d_backward(go, x, w, [1, 1], [1, 1], [1, 1], 200,
                                                                 [True, True, True])))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("case", [((2, 64, 9, 11), 128, 2), ((1, 20, 8, 7), 40, (2, 3)), ((3, 48, 10, 10), 16, 3)],
                         ids=str)
def test_channels_last_strided_pointwise_backward_input_matches_torch(case, monkeypatch, poison):
    """A strided 1x1 layer's backward-input of a channels_last input: the dense 1x1 product scattered
    into the stride's pixels of a zeroed grad_input (odd sizes: the last rows and columns hit or not)."""
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST", "1")
    shape, oc, s = case
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(oc, shape[1], 1, 1, dtype=torch.float64)
    if (fastconv.conv2d_algorithm(x.float(), wt.float(), s).split("/") * 3)[1] != "channels-last-direct":
        pytest.skip("no AVX-512 engine on this CPU")
    (stride,) = pairs(s)
    go = torch.randn(F.conv2d(x, wt, None, stride).shape, dtype=torch.float64)
    want = torch.ops.aten.convolution_backward(go, x, wt, [oc], stride, (0, 0), (1, 1), False, [0, 0], 1,
                                               [True, True, False])
    for mask in ([True, False, False], [True, True, False]):
        got = torch.ops.fastconv._conv2d_backward(go.float(), x.float(), wt.float(), list(stride), [0, 0], [1, 1], 1,
                                                  mask)
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        for i in (i for i in range(2) if mask[i]):
            assert_written_and_close(got[i], want[i], f"gradient {i}")


# Strided backward-input of channels_last tensors by phases (cpu/phase_backward_input.h), forced on: one NHWC
# direct forward a phase storing into grad_input's pixels; stride 2, 3 and 4 and (2, 3), kernels 2x2 to 11x11
# and 3x5, phases reading past grad_output's last row and column (zeros) and with padding of their own,
# odd and even sizes (phases of unequal sizes), channel counts on and off the vector, batch 1.
CHANNELS_LAST_PHASES_CASES = [
    (2, 64, 14, 14, 128, (3, 3), 2, 1),
    (1, 48, 15, 13, 40, (3, 3), 2, 1),
    (2, 32, 17, 16, 64, (7, 7), 2, 3),
    (2, 24, 23, 23, 48, (11, 11), 4, 2),
    (3, 40, 9, 10, 33, (3, 5), (2, 3), (1, 2)),
    (1, 16, 11, 11, 20, (5, 5), 2, 2),
    (2, 64, 8, 8, 64, (4, 4), 2, 1),
    (2, 30, 10, 11, 16, (5, 5), 3, 2),
]


@pytest.mark.parametrize("weight_layout", WEIGHT_LAYOUTS, ids=["weight-nchw", "weight-nhwc"])
@pytest.mark.parametrize("case", CHANNELS_LAST_PHASES_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-s{c[6]}")
def test_channels_last_phases_backward_input_matches_torch(case, weight_layout, monkeypatch, poison):
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST_PHASES", "1")
    n, c, h, w, oc, k, s, p = case
    x = torch.randn(n, c, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(oc, c, *k, dtype=torch.float64).contiguous(memory_format=weight_layout)
    if (fastconv.conv2d_algorithm(x.float(), wt.float(), s, p).split("/") * 3)[1] != "channels-last-phases":
        pytest.skip("no AVX-512 engine on this CPU")
    check_channels_last_backward_input(x, wt, s, p, 1, 1)


# A channels_last 1x1 layer's backward-weight as the GEMM of the NHWC tensors (channels_last_weight_grad.h,
# backward_weight_pointwise_channels_last), forced on: strides 1, 2 and (2, 3) (the stride's pixels by
# offsets), input channels 16 to 256 (1-3 vectors a tile: 80 = 48 + 32), output channels off the 8-row
# tile (9, 70), two chunks of pixels (32 -> 40 channels at 30x31, batch 2: 1860 pixels, chunks of 1820),
# batch 1.
CHANNELS_LAST_POINTWISE_CASES = [
    ((2, 64, 14, 14), 128, 2),
    ((1, 48, 15, 13), 40, 1),
    ((3, 32, 9, 10), 70, (2, 3)),
    ((2, 256, 7, 7), 512, 1),
    ((1, 16, 5, 5), 9, 2),
    ((2, 80, 11, 11), 24, 1),
    ((2, 32, 30, 31), 40, 1),
]


@pytest.mark.parametrize("case", CHANNELS_LAST_POINTWISE_CASES, ids=str)
def test_channels_last_pointwise_weight_grad_matches_torch(case, monkeypatch, poison):
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST_POINTWISE", "1")
    shape, oc, s = case
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(oc, shape[1], 1, 1, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    if (fastconv.conv2d_algorithm(x.float(), wt.float(), s, 0).split("/") * 3)[2] != "channels-last-pointwise":
        pytest.skip("no AVX-512 engine on this CPU")
    (stride,) = pairs(s)
    go = torch.randn(F.conv2d(x, wt, None, stride).shape, dtype=torch.float64)
    want = torch.ops.aten.convolution_backward(go, x, wt, [oc], stride, (0, 0), (1, 1), False, [0, 0], 1,
                                               [True, True, True])
    go_f = go.float().contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            for mask in ([False, True, False], [True, True, True]):
                got = torch.ops.fastconv._conv2d_backward(go_f, x.float(), wt.float(), list(stride), [0, 0], [1, 1], 1,
                                                          mask)
                for i in (i for i in range(3) if mask[i]):
                    assert_written_and_close(got[i], want[i], f"gradient {i}, mask {mask}, {t} threads")
                results.append(got[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])  # the same bits at any thread count


@pytest.mark.parametrize("weight_layout", WEIGHT_LAYOUTS, ids=["weight-nchw", "weight-nhwc"])
def test_channels_last_direct_channel_blocks_match_pixel_blocks(weight_layout, monkeypatch, poison):
    """Batch 1 of a 13x13 plane: one pixel block a thread, so the NHWC forward's tasks are blocks of
    output channels (each packing its own weights); four copies of the image run as pixel blocks. The
    same sums in the same order: the same bits, forward and backward-input, at 1-3 threads."""
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST", "1")
    x1 = torch.randn(1, 64, 13, 13).contiguous(memory_format=torch.channels_last)
    w = torch.randn(200, 64, 3, 3).contiguous(memory_format=weight_layout)
    b = torch.randn(200)
    if fastconv.conv2d_algorithm(x1, w, 1, 1) != "channels-last-direct":
        pytest.skip("no AVX-512 engine on this CPU")
    x4 = torch.cat([x1] * 4).contiguous(memory_format=torch.channels_last)
    go1 = torch.randn(1, 200, 13, 13).contiguous(memory_format=torch.channels_last)
    go4 = torch.cat([go1] * 4).contiguous(memory_format=torch.channels_last)
    args = ([1, 1], [1, 1], [1, 1], 1, [True, False, False])
    ref = F.conv2d(x1.double(), w.double(), b.double(), 1, 1)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y1, y4 = FC.conv2d(x1, w, b, 1, 1), FC.conv2d(x4, w, b, 1, 1)
            assert_written_and_close(y1, ref, f"forward, {t} threads")
            assert torch.equal(y1[0], y4[3])
            g1 = torch.ops.fastconv._conv2d_backward(go1, x1, w, *args)[0]
            g4 = torch.ops.fastconv._conv2d_backward(go4, x4, w, *args)[0]
            assert torch.isfinite(g1).all() and torch.equal(g1[0], g4[2])
    finally:
        torch.set_num_threads(threads)


def test_channels_last_direct_forward_same_bits_at_any_thread_count(monkeypatch):
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST", "1")
    x = torch.randn(3, 200, 9, 10).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(80, 100, 3, 3), torch.randn(80)
    if fastconv.conv2d_algorithm(x, w, 1, 1, 1, 2).split("/")[0] != "channels-last-direct":
        pytest.skip("no AVX-512 engine on this CPU")
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(FC.conv2d(x, w, b, 1, 1, 1, 2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_channels_last_direct_rule(monkeypatch):
    """channels_last inputs take the NHWC direct forward where the transposes weigh (1x1 at few output
    channels, strided from large planes, the narrow kernel's first layers; grouped layers of 16+ channels a
    group the grouped kernel's NHWC form, forward and stride-1 backward-input), not on Winograd's
    layers nor on layers of much work per element; NCHW inputs never; the "gemm" setting and
    FASTCONV_CPU_CHANNELS_LAST=0 turn it off."""
    def fwd(xs, ws, s=1, p=1, g=1, cl=True, wcl=False):
        x = torch.empty(xs, device="meta")
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        w = torch.empty(ws, device="meta")
        w = w.contiguous(memory_format=torch.channels_last) if wcl else w
        return fastconv.conv2d_algorithm(x, w, s, p, 1, g).split("/")[0]
    if fwd((8, 256, 56, 56), (64, 256, 1, 1), p=0) in PORTABLE:
        pytest.skip("no AVX-512 engine on this CPU")
    assert fwd((8, 256, 56, 56), (64, 256, 1, 1), p=0) == "channels-last-direct"
    assert fwd((8, 1024, 7, 7), (1024, 32, 3, 3), g=32) == "channels-last-grouped"  # ResNeXt's 32 a group
    assert fwd((8, 512, 14, 14), (512, 16, 3, 3), g=32) == "channels-last-grouped"
    assert fwd((8, 256, 28, 28), (256, 8, 3, 3), g=32) == "channels-last-grouped"  # the NCHW route's GEMM
    assert fwd((8, 128, 56, 56), (128, 4, 3, 3), g=32) == "channels-last-grouped"
    assert fwd((1, 96, 6, 6), (16, 48, 3, 3), g=2) != "channels-last-grouped"  # 2 x 48 channels: one vector no
    assert fwd((8, 64, 56, 56), (128, 64, 3, 3), s=2) == "channels-last-direct"
    assert fwd((8, 256, 56, 56), (64, 256, 1, 1), p=0, cl=False) != "channels-last-direct"
    assert fwd((8, 64, 56, 56), (64, 64, 3, 3)) == "winograd"
    # up to 1300 FLOPs an element where the weight is at most twice the input and output (822 here)
    assert fwd((8, 512, 7, 7), (2048, 512, 1, 1), p=0) == "channels-last-direct"
    assert fwd((8, 128, 28, 28), (256, 128, 3, 3), s=2) == "channels-last-direct"  # 770
    assert fwd((8, 512, 14, 14), (512, 512, 3, 3), s=2) != "channels-last-direct"  # 1843
    assert fwd((1, 512, 7, 7), (2048, 512, 1, 1), p=0) != "channels-last-direct"  # 822, a weight 8x larger
    assert fwd((1, 384, 13, 13), (256, 384, 3, 3)) != "channels-last-direct"
    # ... unless the weights are channels_last, which the NCHW route would copy: AlexNet conv4 at batch 1
    assert fwd((1, 384, 13, 13), (256, 384, 3, 3), wcl=True) == "channels-last-direct"
    assert fwd((8, 384, 13, 13), (256, 384, 3, 3), wcl=True) == "winograd"
    assert fwd((8, 128, 56, 56), (128, 4, 3, 3), g=32) != "channels-last-direct"  # 4 of 16 lanes
    assert fwd((4, 3, 224, 224), (64, 3, 7, 7), s=2, p=3) == "channels-last-direct"  # ResNet's stem
    assert fwd((4, 3, 224, 224), (64, 3, 7, 7), s=2, p=3, cl=False) == "narrow-direct"
    assert fwd((8, 3, 224, 224), (64, 3, 11, 11), s=4, p=2) == "channels-last-direct"  # AlexNet's conv1

    def bwi(xs, ws, s=1, p=1, g=1, wcl=False):
        x = torch.empty(xs, device="meta").contiguous(memory_format=torch.channels_last)
        w = torch.empty(ws, device="meta")
        w = w.contiguous(memory_format=torch.channels_last) if wcl else w
        return (fastconv.conv2d_algorithm(x, w, s, p, 1, g).split("/") * 3)[1]
    # backward-input: stride 1, ungrouped, few FLOPs an element (grad_output into the wide side)
    assert bwi((8, 256, 56, 56), (64, 256, 1, 1), p=0) == "channels-last-direct"
    assert bwi((8, 64, 56, 56), (256, 64, 1, 1), p=0) == "channels-last-direct"
    assert bwi((8, 256, 14, 14), (1024, 256, 1, 1), p=0) == "channels-last-direct"  # 409 FLOPs an element
    assert bwi((1, 2048, 7, 7), (512, 2048, 1, 1), p=0) != "channels-last-direct"  # 819, a weight 8x larger
    assert bwi((8, 1024, 7, 7), (1024, 32, 3, 3), g=32) == "channels-last-grouped"
    assert bwi((8, 256, 28, 28), (256, 8, 3, 3), g=32) == "channels-last-grouped"  # 2 groups a vector
    assert bwi((8, 64, 56, 56), (128, 64, 1, 1), s=2, p=0) == "channels-last-direct"  # strided 1x1
    assert bwi((8, 512, 28, 28), (1024, 512, 1, 1), s=2, p=0) == "channels-last-direct"  # 683 FLOPs an element
    assert bwi((8, 1024, 14, 14), (2048, 1024, 1, 1), s=2, p=0) != "channels-last-direct"  # 1365
    assert bwi((8, 64, 56, 56), (128, 64, 3, 3), s=2, p=1) == "channels-last-phases"  # ResNet's 3x3/2
    assert bwi((4, 3, 224, 224), (64, 3, 7, 7), s=2, p=3) != "channels-last-phases"  # 3 of 16 lanes
    assert bwi((1, 192, 13, 13), (384, 192, 3, 3)) != "channels-last-direct"
    assert bwi((1, 192, 13, 13), (384, 192, 3, 3), wcl=True) == "channels-last-direct"
    # backward-weight of 1x1 layers too wide for the in-place kernel: the GEMM of the NHWC tensors
    x = torch.empty(8, 256, 14, 14, device="meta").contiguous(memory_format=torch.channels_last)
    assert fastconv.conv2d_algorithm(x, torch.empty(512, 256, 1, 1, device="meta"), 2, 0).split("/")[2] == (
        "channels-last-pointwise")
    with fastconv.conv_algorithm("gemm"):
        assert fwd((8, 256, 56, 56), (64, 256, 1, 1), p=0) == "im2col+gemm"
    monkeypatch.setenv("FASTCONV_CPU_CHANNELS_LAST", "0")
    assert fwd((8, 256, 56, 56), (64, 256, 1, 1), p=0) != "channels-last-direct"


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_depthwise_channel_lanes_split_rows_over_threads(threads, monkeypatch, poison):
    # batch 1 with one or two blocks of channels: the rows cut into runs (each its own zero padding)
    monkeypatch.setenv("FASTCONV_DW_LANES", "1")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        run_case(1, 16, 13, 9, 16, (5, 5), 1, 2, 1, 16)
        run_case(1, 24, 11, 12, 24, (7, 7), 2, 3, 1, 24)
        run_case(2, 16, 9, 9, 16, (3, 3), 1, 1, 1, 16)
    finally:
        torch.set_num_threads(old)


# The depthwise lane backward-weight sums fixed slots of images (set by the shapes, not the threads) in
# order: bitwise the same at 1, 2, 3 and 5 threads (3 blocks of channels, the last partial; 5 images in
# slots).
def test_depthwise_channel_lanes_weight_grad_independent_of_threads(monkeypatch, poison):
    monkeypatch.setenv("FASTCONV_DW_LANES", "1")
    x, go = torch.randn(5, 40, 9, 8), torch.randn(5, 40, 5, 4)
    w = torch.randn(40, 1, 3, 3)
    old = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            grads.append(torch.ops.fastconv._conv2d_backward(go, x, w, [2, 2], [1, 1], [1, 1], 40,
                                                             [False, True, False])[1])
    finally:
        torch.set_num_threads(old)
    ref = torch.ops.aten.convolution_backward(go.double(), x.double(), w.double(), None, [2, 2], [1, 1], [1, 1],
                                              False, [0, 0], 40, [False, True, False])[1]
    torch.testing.assert_close(grads[0].double(), ref, rtol=2e-5, atol=2e-5)
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


# A NaN in the input reaches only the weight-gradient taps whose windows hold it: kernels that run over
# padded planes with rows of the padded width (the implicit dot form's extra columns read the next
# row's first inputs) must mask those columns, not multiply them by zero.
@pytest.mark.parametrize("case", [(16, 16, 4), (32, 32, 1), (16, 8, 2)], ids=lambda c: "x".join(map(str, c)))
def test_weight_grad_keeps_nan_in_its_taps(case, poison):
    c, oc, g = case
    x = torch.randn(2, c, 9, 10, dtype=torch.float64)
    x[:, :, 3, -1] = float("nan")
    x[1, :, 0, 0] = float("inf")
    w = torch.randn(oc, c // g, 3, 3, dtype=torch.float64)
    go = torch.randn(2, oc, 9, 10, dtype=torch.float64)
    ref = torch.nn.grad.conv2d_weight(x, w.shape, go, padding=1, groups=g)
    with fastconv.conv_algorithm("gemm"):
        got = torch.ops.fastconv._conv2d_backward(go.float(), x.float(), w.float(), [1, 1], [1, 1], [1, 1], g,
                                                  [False, True, False])[1]
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(ref).any() and torch.isfinite(ref).any()
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin)
    assert ((got.double()[fin] - ref[fin]).abs().max() / ref[fin].abs().max()).item() < 2e-5


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts(threads, poison):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for algorithm in ALGORITHMS:
            with fastconv.conv_algorithm(algorithm):
                run_case(1, 32, 14, 14, 64, (3, 3))       # batch 1: the pixels/tiles are split, not images
                run_case(3, 64, 7, 7, 40, (3, 3), bias=False)
                run_case(2, 8, 10, 10, 16, (3, 3), 1, 1, 1, 8)
                # 392 pixels: work items cut at 16-pixel (not 48) boundaries; two k-blocks; groups
                # whose 12 input / 10 output channels leave partial 8-row blocks in the flipped weights
                run_case(8, 64, 7, 7, 12, (3, 3), bias=False)
                run_case(8, 24, 7, 7, 20, (3, 3), groups=2)
                run_case(3, 20, 9, 9, 12, (3, 3), stride=2)  # backward-input through col2im, split over
                run_case(1, 24, 11, 11, 16, (3, 3), stride=2, groups=2)  # images and channel blocks
                run_case(1, 40, 10, 9, 8, (1, 1), stride=2, padding=0)
                run_case(8, 16, 13, 11, 20, (3, 3), stride=2)  # backward-input by stride phases
    finally:
        torch.set_num_threads(old)


# Backward-weight split over the rows of grad_W when per-thread partials would exceed L2 (C*KH*KW x OC
# past 1 MiB): several pixel chunks with a tail, groups, and the same bits for every thread count (the
# GEMM engine's; auto may take Winograd on these shapes, whose per-slot sums depend on the threads).
@pytest.mark.parametrize("case", [(4, 32, 12, 12, 1030, 1), (3, 64, 11, 13, 1032, 2), (2, 128, 6, 5, 260, 1)],
                         ids=lambda c: "x".join(map(str, c)))
def test_backward_weight_by_rows(case, poison):
    n, c, h, w, oc, g = case
    x, wt = torch.randn(n, c, h, w), torch.randn(oc, c // g, 3, 3)
    go = torch.randn(n, oc, h, w)
    old = torch.get_num_threads()
    grads = []
    with fastconv.conv_algorithm("gemm"):
        run_case(n, c, h, w, oc, (3, 3), groups=g)
        try:
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                grads.append(torch.ops.fastconv._conv2d_backward(go, x, wt, [1, 1], [1, 1], [1, 1], g,
                                                                 [False, True, False])[1])
        finally:
            torch.set_num_threads(old)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.slow
def test_wide_layer(poison):
    for algorithm in ALGORITHMS:
        with fastconv.conv_algorithm(algorithm):
            run_case(2, 256, 7, 7, 264, (3, 3))


def test_float64_takes_the_portable_path_and_matches():
    run_case(2, 16, 9, 9, 9, (3, 3), dtype=torch.float64)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradients_are_bitwise_repeatable(algorithm):
    x = torch.randn(6, 32, 14, 14)
    w = torch.randn(64, 32, 3, 3)
    go = torch.randn(6, 64, 14, 14)
    with fastconv.conv_algorithm(algorithm):
        a = torch.ops.fastconv._conv2d_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, True])
        b = torch.ops.fastconv._conv2d_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, True])
        fa = torch.ops.fastconv.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)
        fb = torch.ops.fastconv.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.equal(fa, fb)


def test_algorithm_setting_and_report():
    assert fastconv.get_conv_algorithm() == "auto"
    x, w = torch.empty(100, 32, 14, 14), torch.empty(64, 32, 3, 3)
    with fastconv.conv_algorithm("gemm"):
        assert fastconv.get_conv_algorithm() == "gemm"
        assert "winograd" not in fastconv.conv2d_algorithm(x, w, padding=1)
    assert fastconv.get_conv_algorithm() == "auto"
    with fastconv.conv_algorithm("winograd"):
        name = fastconv.conv2d_algorithm(x, w, padding=1)
    assert name.startswith("winograd") or name in PORTABLE  # the latter without AVX-512
    # Winograd never claims shapes it cannot run
    with fastconv.conv_algorithm("winograd"):
        assert "winograd" not in fastconv.conv2d_algorithm(x, w, stride=2, padding=1)
        assert fastconv.conv2d_algorithm(torch.empty(2, 8, 9, 9), torch.empty(8, 1, 3, 3), padding=1, groups=8) == "direct"
    # groups of 2-4 channels: the engine where it runs, the direct kernels on the portable path
    x4, w4 = torch.empty(2, 32, 9, 9), torch.empty(32, 4, 3, 3)
    assert fastconv.conv2d_algorithm(x4.double(), w4.double(), padding=1, groups=8) == "direct"
    assert (fastconv.conv2d_algorithm(x4, w4, padding=1, groups=8) != "direct") == (
        not portable(fastconv.conv2d_algorithm(x, w, padding=1)))
    assert fastconv.conv2d_algorithm(x.double(), w.double(), padding=1) == "im2col+gemm-aten"
    # strided backward-input through col2im (stride phases only under FASTCONV_STRIDE_PHASES=1)
    name = fastconv.conv2d_algorithm(torch.empty(8, 32, 14, 14), torch.empty(64, 32, 3, 3), stride=2, padding=1)
    assert name in PORTABLE or name.split("/")[1] == "im2col+gemm+col2im"
    with pytest.raises(ValueError, match="expected one of"):
        fastconv.set_conv_algorithm("fft")


def test_benchmark_setting_measures_once_and_reports_the_choice(poison):
    """'benchmark' times the candidates on the first call of a shape and keeps the fastest: the
    results match torch on the measuring call and after it, the report names a kernel that can run
    the shape, and later calls repeat bit for bit (they run the cached choice)."""
    with fastconv.conv_algorithm("benchmark"):
        assert fastconv.get_conv_algorithm() == "benchmark"
        run_case(8, 32, 13, 13, 48, (3, 3))           # Winograd, forward engine or GEMM
        run_case(8, 32, 14, 14, 40, (3, 3), stride=2)  # stride phases or col2im
        run_case(2, 3, 30, 30, 24, (7, 7), stride=2, padding=3)  # narrow-direct or GEMM
        x, w = torch.randn(8, 32, 13, 13), torch.randn(48, 32, 3, 3)
        passes = fastconv.conv2d_algorithm(x, w, padding=1)
        go = torch.randn(8, 48, 13, 13)
        a = torch.ops.fastconv._conv2d_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, True])
        b = torch.ops.fastconv._conv2d_backward(go, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, True])
        assert fastconv.conv2d_algorithm(x, w, padding=1) == passes
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    known = {"winograd", "implicit-gemm", "im2col+gemm", "narrow-direct", "stride-phases", "im2col+gemm+col2im",
             "channels-last-direct", *PORTABLE}
    assert set(passes.split("/")) <= known, passes


def test_environment_variable_sets_the_starting_algorithm():
    code = "import fastconv; print(fastconv.get_conv_algorithm())"
    env = dict(os.environ, FASTCONV_CONV_ALGORITHM="winograd")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "winograd"


def test_winograd_random_shapes_every_variant(monkeypatch):
    # 80 random stride-1 shapes (kernels 3x3 to 7x7, square or not, any padding below the kernel, 8-70
    # channels, batch 1-4) on a random Winograd variant each (2x2 or 4x4 tiles for 3x3, blocks of tiles
    # or whole tiles): every pass within the 1e-4 of the largest element asked of Winograd in float32
    rng = torch.Generator().manual_seed(7)

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=rng))]

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    kernels = [(3, 3), (3, 3), (4, 4), (5, 5), (5, 5), (3, 5), (5, 3), (6, 6), (7, 7), (4, 6), (7, 5)]
    with fastconv.conv_algorithm("winograd"):
        if portable(fastconv.conv2d_algorithm(torch.empty(1, 8, 9, 9), torch.empty(8, 8, 3, 3), 1, 1)):
            pytest.skip("no AVX-512 engine on this CPU (its Winograd variants run on it)")
    for _ in range(80):
        monkeypatch.setenv("FASTCONV_WINOGRAD_TILE", pick(["2", "4"]))
        monkeypatch.setenv("FASTCONV_WINOGRAD_WHOLE_TILES", pick(["0", "1"]))
        k = pick(kernels)
        ph, pw = randint(0, k[0] - 1), randint(0, k[1] - 1)
        n, c, oc = randint(1, 4), randint(8, 70), randint(8, 70)
        h, w = randint(max(1, k[0] - 2 * ph), 40), randint(max(1, k[1] - 2 * pw), 40)
        x = torch.randn(n, c, h, w, dtype=torch.float64, generator=rng)
        wt = torch.randn(oc, c, *k, dtype=torch.float64, generator=rng)
        xr, wr = x.clone().requires_grad_(), wt.clone().requires_grad_()
        ref = F.conv2d(xr, wr, None, 1, (ph, pw))
        go = torch.randn(ref.shape, dtype=torch.float64, generator=rng)
        ref.backward(go)
        xf, wf = x.float().requires_grad_(), wt.float().requires_grad_()
        with fastconv.conv_algorithm("winograd"):
            out = FC.conv2d(xf, wf, None, 1, (ph, pw))
            out.backward(go.float())
            assert fastconv.conv2d_algorithm(xf, wf, 1, (ph, pw)).startswith("winograd")
        for name, got, want in (("output", out, ref), ("grad_input", xf.grad, xr.grad), ("grad_weight", wf.grad, wr.grad)):
            assert torch.isfinite(got).all(), f"{name} not finite for {(n, c, h, w, oc, k, ph, pw)}"
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert err < 1e-4, f"{name}: error {err:.2e} for {(n, c, h, w, oc, k, ph, pw)}"
