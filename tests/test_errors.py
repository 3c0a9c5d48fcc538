"""Bad input gets a clear error that names the problem (never a crash, a hang or a wrong answer)."""
import pytest
import torch

import fastconv
import fastconv.functional as FC

ops = torch.ops.fastconv
x4 = torch.randn(2, 4, 8, 8)
w4 = torch.randn(6, 4, 3, 3)

CONV_ERRORS = [
    (lambda: FC.conv2d(torch.randn(8, 8), w4), RuntimeError, r"3-D \(unbatched\) or 4-D .* got 2-D"),
    (lambda: FC.conv2d(torch.randn(1, 2, 4, 8, 8), w4), RuntimeError, r"got 5-D"),
    (lambda: FC.conv2d(x4, torch.randn(6, 4, 3)), RuntimeError, r"4-D weight"),
    (lambda: FC.conv2d(torch.randn(2, 3, 8, 8), w4), RuntimeError, r"expects 4 input channels.*3 channels"),
    (lambda: FC.conv2d(x4, torch.randn(6, 2, 3, 3), groups=3), RuntimeError, r"in_channels \(4\) must be divisible by groups \(3\)"),
    (lambda: FC.conv2d(x4, torch.randn(5, 2, 3, 3), groups=2), RuntimeError, r"out_channels \(5\) must be divisible by groups \(2\)"),
    (lambda: FC.conv2d(x4, w4, groups=0), RuntimeError, r"groups must be positive"),
    (lambda: FC.conv2d(x4, w4, stride=0), RuntimeError, r"stride must be positive"),
    (lambda: FC.conv2d(x4, w4, stride=(1, -1)), RuntimeError, r"stride must be positive"),
    (lambda: FC.conv2d(x4, w4, dilation=0), RuntimeError, r"dilation must be positive"),
    (lambda: FC.conv2d(x4, w4, padding=-1), RuntimeError, r"padding must be non-negative"),
    (lambda: FC.conv2d(x4, torch.randn(6, 4, 9, 3)), RuntimeError, r"kernel size .* can't be greater than the padded input size"),
    (lambda: FC.conv2d(x4, w4, dilation=4), RuntimeError, r"can't be greater than the padded input"),
    (lambda: FC.conv2d(x4, w4.double()), RuntimeError, r"input \(Float\) and weight \(Double\) must have the same dtype"),
    (lambda: FC.conv2d(x4, w4, torch.randn(6).double()), RuntimeError, r"bias \(Double\) must have the input's dtype"),
    (lambda: FC.conv2d(x4, w4, torch.randn(5)), RuntimeError, r"expected bias of size \[6\]"),
    (lambda: FC.conv2d(x4.long(), w4.long()), RuntimeError, r"floating-point tensor.*got Long"),
    (lambda: FC.conv2d(x4.int(), w4), RuntimeError, r"floating-point tensor.*got Int"),
    (lambda: FC.conv2d(x4, w4, stride=(1, 2, 3)), TypeError, r"stride must be an int or a pair"),
    (lambda: FC.conv2d(x4, w4, stride=1.5), TypeError, r"stride must be an int or a pair"),
    (lambda: FC.conv2d(x4, w4, padding="full"), ValueError, r"invalid padding string 'full'"),
    (lambda: FC.conv2d(x4, w4, stride=2, padding="same"), ValueError, r"'same' is not supported for strided"),
    (lambda: FC.conv2d(x4, w4, groups=1.0), TypeError, r"groups must be an int"),
    (lambda: FC.conv2d([1.0], w4), TypeError, r"input must be a Tensor"),
    (lambda: FC.conv2d(x4, torch.randn(0, 4, 3, 3)), RuntimeError, r"weight must have no zero-size dimension"),
    (lambda: ops.conv2d(x4, w4, None, [1], [0, 0], [1, 1], 1), RuntimeError, r"stride"),
    (lambda: ops._conv2d_backward(torch.randn(2, 6, 5, 5), x4, w4, [1, 1], [0, 0], [1, 1], 1, [True, True, True]),
     RuntimeError, r"expected grad_output of size \[2, 6, 6, 6\], got \[2, 6, 5, 5\]"),
]

POOL_ERRORS = [
    (lambda: FC.max_pool2d(torch.randn(8, 8), 2), RuntimeError, r"3-D \(unbatched\) or 4-D"),
    (lambda: FC.max_pool2d(x4, 0), RuntimeError, r"kernel_size must be positive"),
    (lambda: FC.max_pool2d(x4, 2, stride=0), RuntimeError, r"stride must be positive"),
    (lambda: FC.max_pool2d(x4, 2, padding=-1), RuntimeError, r"padding must be non-negative"),
    (lambda: FC.max_pool2d(x4, 2, dilation=0), RuntimeError, r"dilation must be positive"),
    (lambda: FC.max_pool2d(x4, 2, padding=2), RuntimeError, r"pad should be at most half of kernel size"),
    (lambda: FC.max_pool2d(x4, 3, padding=2), RuntimeError, r"pad should be at most half"),
    (lambda: FC.max_pool2d(x4, 3, padding=(0, 2), dilation=2), RuntimeError, r"pad should be at most half"),
    (lambda: FC.max_pool2d(torch.randn(1, 1, 2, 2), 3), RuntimeError, r"output size .* too small"),
    (lambda: FC.max_pool2d(x4 > 0, 2), RuntimeError, r"floating-point tensor .* or an integer tensor .*got Bool"),
    (lambda: FC.max_pool2d(x4.to(torch.complex64), 2), RuntimeError, r"or an integer tensor .*got ComplexFloat"),
    # integer inputs pool (as torch's), but the backward op takes only floating-point tensors
    (lambda: ops._max_pool2d_backward(torch.ones(2, 4, 4, 4, dtype=torch.long), x4.long(),
                                      torch.zeros(2, 4, 4, 4, dtype=torch.long), [2, 2], [2, 2], [0, 0], [1, 1], False),
     RuntimeError, r"_max_pool2d_backward: expected input to be a floating-point tensor.*got Long"),
    (lambda: FC.max_pool2d(torch.randn(1, 1, 1, 1), (2, 1), 1, (1, 0), (2, 1)), RuntimeError,
     r"window of output row 0 lies entirely in the padding"),
    (lambda: FC.max_pool2d(torch.randn(2, 0, 4, 4), 2), RuntimeError, r"non-zero channels, height and width"),
    (lambda: FC.max_pool2d(x4, (2, 2, 2)), TypeError, r"kernel_size must be an int or a pair"),
    (lambda: ops._max_pool2d_backward(torch.randn(2, 4, 4, 4), x4, torch.zeros(2, 4, 4, 4, dtype=torch.int32),
                                      [2, 2], [2, 2], [0, 0], [1, 1], False), RuntimeError, r"expected int64 indices"),
]


@pytest.mark.parametrize("call, exc, match", CONV_ERRORS + POOL_ERRORS)
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_torch_rejects_what_we_reject():
    """Spot-check that the inputs above are ones torch itself rejects (we mirror, not invent, rules)."""
    import torch.nn.functional as F
    for call in (lambda: F.conv2d(torch.randn(2, 3, 8, 8), w4), lambda: F.conv2d(x4, w4, stride=0),
                 lambda: F.conv2d(x4, torch.randn(6, 4, 9, 3)), lambda: F.max_pool2d(x4, 2, padding=2),
                 lambda: F.max_pool2d(torch.randn(1, 1, 2, 2), 3)):
        with pytest.raises((RuntimeError, ValueError)):
            call()


def test_device_mismatch_is_named():
    meta = torch.randn(6, 4, 3, 3, device="meta")
    with pytest.raises(RuntimeError, match=r"input is on cpu but weight is on meta|same device|meta"):
        FC.conv2d(x4, meta)


def test_module_errors_match_torch_nn():
    with pytest.raises(ValueError, match="padding_mode"):
        fastconv.Conv2d(1, 1, 3, padding_mode="mirror")
