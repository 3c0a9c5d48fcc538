"""fastconv.Conv2d / MaxPool2d against torch.nn with shared weights, state_dict both ways, convert()."""
import pytest
import torch
from torch import nn

import fastconv

from devices import cpu_and_cuda

CONV_CONFIGS = [
    dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, bias=False),
    dict(in_channels=3, out_channels=5, kernel_size=4, padding="same"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="valid"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=2, padding_mode="reflect"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="replicate"),
    dict(in_channels=3, out_channels=5, kernel_size=(3, 5), padding=(1, 2), padding_mode="circular"),
]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("config", CONV_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv2d_module_matches_nn(config, device):
    torch.manual_seed(0)
    ours = fastconv.Conv2d(**config, device=device, dtype=torch.float64)
    torch.manual_seed(0)
    theirs = nn.Conv2d(**config, device=device, dtype=torch.float64)
    # same constructor, same initialisation from the same seed, same names, same repr
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert repr(ours) == repr(theirs)
    x = torch.randn(2, config["in_channels"], 9, 10, dtype=torch.float64, device=device)
    out, ref = ours(x), theirs(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_state_dict_moves_both_ways():
    ours = fastconv.Conv2d(3, 4, 3, padding=1)
    theirs = nn.Conv2d(3, 4, 3, padding=1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x))
    theirs2 = nn.Conv2d(3, 4, 3, padding=1)
    ours.load_state_dict(theirs2.state_dict())
    torch.testing.assert_close(ours(x), theirs2(x))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_max_pool2d_module_matches_nn(device):
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64, device=device)
    for kwargs in (dict(kernel_size=2), dict(kernel_size=3, stride=2), dict(kernel_size=3, stride=2, padding=1,
                                                                              ceil_mode=True, return_indices=True),
                   dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1))):
        ours, theirs = fastconv.MaxPool2d(**kwargs), nn.MaxPool2d(**kwargs)
        assert repr(ours) == repr(theirs)
        a, b = ours(x), theirs(x)
        if kwargs.get("return_indices"):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        else:
            assert torch.equal(a, b)


def test_conv2d_is_drop_in():
    m = fastconv.Conv2d(1, 2, 3)
    assert isinstance(m, nn.Conv2d)  # code that checks isinstance(m, nn.Conv2d) keeps working
    m.reset_parameters()
    assert m.weight.shape == (2, 1, 3, 3)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.ReLU()))
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.head = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_convert_nested_model(device):
    model = Nested().to(device=device, dtype=torch.float64).eval()
    x = torch.randn(3, 1, 10, 10, dtype=torch.float64, device=device)
    before = model(x)
    weights = [p for p in model.parameters()]
    assert fastconv.convert(model) is model
    kinds = [type(m) for m in model.modules()]
    assert nn.Conv2d not in kinds and nn.MaxPool2d not in kinds
    assert kinds.count(fastconv.Conv2d) == 2 and kinds.count(fastconv.MaxPool2d) == 2
    # same Parameter objects: weights, device and dtype kept, optimizers stay valid
    assert all(a is b for a, b in zip(weights, model.parameters()))
    assert not model.training
    torch.testing.assert_close(model(x), before)
    assert isinstance(fastconv.convert(nn.Conv2d(1, 1, 1)), fastconv.Conv2d)
