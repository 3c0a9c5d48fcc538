"""fastconv.models: each tutorial CNN built from fastconv layers equals its torch.nn twin."""
import math

import pytest
import torch
from torch import nn

import fastconv
from fastconv import models
from fastconv.models import build_model

from devices import cpu_and_cuda

# Constructor arguments that make each model take 1x28x28 inputs quickly.
KWARGS = {"alexnet": {"resize": 63}}

# Hand-computed parameter counts (1 input channel, 10 classes).
KNOWN_PARAMS = {
    "mnist_cnn": 320 + 18_496 + 31_370,                       # 50,186
    "lenet": 156 + 2_416 + 16_448 + 650,                      # 19,670
    "simple_convnet": 780 + 432_100 + 1_010,                  # 433,890
    # convs 3x3 'same' without BN: 320 + 18,496; fcs 3136*1024+1024, 1024*128+128, 128*10+10
    "configurable_cnn": 320 + 18_496 + 3_212_288 + 131_200 + 1_290,
    # torchvision's AlexNet (61,100,840 for 3 channels and 1000 classes) with 1 channel and 10 classes
    "alexnet": 61_100_840 - 2 * 64 * 121 - (4096 * 990 + 990),
}


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _pair(name, seed=0, **kw):
    kw = {**KWARGS.get(name, {}), **kw}
    torch.manual_seed(seed)
    fc = build_model(name, impl="fastconv", **kw)
    torch.manual_seed(seed)
    tn = build_model(name, impl="torch", **kw)
    return fc, tn


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_shapes_params_and_init_match_torch_twin(name):
    fc, tn = _pair(name)
    assert _n_params(fc) == _n_params(tn) == KNOWN_PARAMS[name]
    # Same parameter names and, from the same seed, the same initial weights.
    sd_fc, sd_tn = fc.state_dict(), tn.state_dict()
    assert list(sd_fc) == list(sd_tn)
    for k in sd_fc:
        assert sd_fc[k].shape == sd_tn[k].shape, k
        assert torch.equal(sd_fc[k], sd_tn[k]), f"{name}: {k} differs with the same seed"
    # The convs and pools really are fastconv's in one and torch.nn's in the other.
    fc_types = {type(m) for m in fc.modules()}
    tn_types = {type(m) for m in tn.modules()}
    assert fastconv.Conv2d in fc_types and nn.Conv2d not in fc_types
    assert nn.Conv2d in tn_types and fastconv.Conv2d not in tn_types
    assert fastconv.MaxPool2d in fc_types and nn.MaxPool2d in tn_types
    # Same outputs (eval mode: no dropout, BatchNorm running stats).
    fc.eval(), tn.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        y_fc, y_tn = fc(x), tn(x)
    assert y_fc.shape == y_tn.shape == (3, 10)
    torch.testing.assert_close(y_fc, y_tn, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mnist_cnn", "lenet", "simple_convnet"])
def test_state_dict_loads_across_impls(name):
    fc, _ = _pair(name, seed=1)
    _, tn = _pair(name, seed=2)
    assert not torch.equal(fc.state_dict()[next(iter(fc.state_dict()))], tn.state_dict()[next(iter(tn.state_dict()))])
    tn.load_state_dict(fc.state_dict())  # strict: same keys, same shapes
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(fc(x), tn(x), rtol=1e-4, atol=1e-5)
    fc2 = build_model(name, impl="fastconv")
    fc2.load_state_dict(tn.state_dict())
    torch.testing.assert_close(fc2(x), fc(x))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_gradients_match_torch_twin(device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare fp32 with fp32
    fc, tn = _pair("mnist_cnn", seed=3)
    fc, tn = fc.to(device), tn.to(device)
    x = torch.randn(4, 1, 28, 28, device=device)
    y = torch.tensor([0, 3, 7, 9], device=device)
    for m in (fc, tn):
        nn.functional.cross_entropy(m(x), y).backward()
    for (k, p_fc), (_, p_tn) in zip(fc.named_parameters(), tn.named_parameters()):
        torch.testing.assert_close(p_fc.grad, p_tn.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_mnist_cnn_layout():
    m = build_model("mnist_cnn", impl="torch")
    assert [_n_params(c) for c in (m.layer1, m.layer2, m.fc)] == [320, 18_496, 31_370]
    assert m.fc.in_features == 3136
    # Xavier-uniform Linear: |w| <= sqrt(6 / (fan_in + fan_out)).
    assert m.fc.weight.abs().max() <= math.sqrt(6 / (3136 + 10))
    assert m.fc.weight.abs().max() > 0.9 * math.sqrt(6 / (3136 + 10))


def test_lenet_and_simple_convnet_layouts():
    lenet = build_model("lenet", impl="torch")
    assert lenet.classifier[0].in_features == 256
    scn = build_model("simple_convnet", impl="torch")
    assert scn.classifier[0].in_features == 4320


def test_configurable_cnn_options():
    m = build_model("configurable_cnn", impl="fastconv", kernel_size=5, conv_channels=[8, 16, 32],
                    hidden=[64], batch_norm=True, dropout=0.25)
    convs = [c for c in m.modules() if isinstance(c, fastconv.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32]
    assert all(c.padding == (2, 2) and c.bias is None for c in convs)  # 'same'; BN makes biases redundant
    assert sum(isinstance(c, nn.BatchNorm2d) for c in m.modules()) == 3
    assert sum(isinstance(c, nn.Dropout2d) for c in m.modules()) == 3
    assert m.classifier[0].in_features == 32 * 3 * 3
    for lin in (c for c in m.modules() if isinstance(c, nn.Linear)):
        assert torch.count_nonzero(lin.bias) == 0
    # Kaiming-normal (fan_in, ReLU gain): std close to sqrt(2 / fan_in).
    w = m.classifier[0].weight
    assert abs(w.std().item() / math.sqrt(2 / w.shape[1]) - 1) < 0.1
    m.train()
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="odd"):
        build_model("configurable_cnn", impl="torch", kernel_size=4)


def test_configurable_cnn_default_biases_zero():
    m = build_model("configurable_cnn", impl="fastconv")
    convs = [c for c in m.modules() if isinstance(c, fastconv.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64]
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)
    assert [c.out_features for c in m.modules() if isinstance(c, nn.Linear)] == [1024, 128, 10]


def test_alexnet_sizes():
    fc, tn = _pair("alexnet", resize=None)
    # The standard 224x224 input.
    x = torch.randn(1, 1, 224, 224)
    fc.eval(), tn.eval()
    with torch.no_grad():
        torch.testing.assert_close(fc(x), tn(x), rtol=1e-4, atol=1e-5)
    feats = tn.features(x)
    assert feats.shape == (1, 256, 6, 6)
    # 28x28 without resizing cannot go through the 11x11/4 conv and three 3x3/2 pools.
    with pytest.raises(ValueError, match="at least 63x63"):
        tn(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="smallest size"):
        build_model("alexnet", impl="torch", resize=62)
    # 63 is the smallest size that fits: the last pool leaves 1x1.
    assert build_model("alexnet", impl="torch", resize=63).features(torch.randn(1, 1, 63, 63)).shape[-2:] == (1, 1)


def test_in_channels_and_num_classes():
    for name in models.MODELS:
        m = build_model(name, impl="fastconv", num_classes=7, in_channels=3, **KWARGS.get(name, {}))
        assert m.eval()(torch.randn(2, 3, 28, 28)).shape == (2, 7)


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(ValueError, match="impl must be one of"):
        build_model("lenet", impl="numpy")
    assert isinstance(build_model("mnist-cnn", impl="torch"), models.MNISTCNN)
