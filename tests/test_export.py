"""Deployment: torch.export, ONNX export (standard Conv/MaxPool nodes, checked with onnxruntime), revert()."""
import pytest
import torch
from torch import nn

import fastconv
from fastconv.models import build_model


class Odd(nn.Module):
    """Asymmetric stride/padding/dilation, groups, no bias, ceil_mode and pool padding."""

    def __init__(self):
        super().__init__()
        self.conv1 = fastconv.Conv2d(2, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
        self.conv2 = fastconv.Conv2d(6, 4, 3, padding="same", groups=2, bias=False)
        self.pool = fastconv.MaxPool2d(3, 2, 1, ceil_mode=True)

    def forward(self, x):
        return self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def _onnx_export(model, x):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    proto = program.model_proto
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return proto, torch.from_numpy(got)


@pytest.mark.parametrize("name", ["mnist_cnn", "lenet", "odd", "fused"])
def test_onnx_export_writes_standard_conv_and_maxpool(name):
    torch.manual_seed(0)
    if name == "fused":  # fastconv.fuse(): the fused conv2d_relu op
        model = fastconv.fuse(build_model("mnist_cnn")).eval()
        assert any(isinstance(m, fastconv.Conv2dReLU) for m in model.modules())
    else:
        model = (Odd() if name == "odd" else build_model(name)).eval()
    x = torch.randn(3, 2 if name == "odd" else 1, 19 if name == "odd" else 28, 14 if name == "odd" else 28)
    proto, got = _onnx_export(model, x)
    kinds = [n.op_type for n in proto.graph.node]
    assert kinds.count("Conv") == 2 and kinds.count("MaxPool") in (1, 2), kinds
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), [n.domain for n in proto.graph.node]
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_torch_export_keeps_fastconv_ops():
    model = build_model("mnist_cnn").eval()
    x = torch.randn(2, 1, 28, 28)
    ep = torch.export.export(model, (x,))
    # torch.export's default decompositions keep the ops too: only the ONNX exporter decomposes them
    for program in (ep, ep.run_decompositions()):
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert "fastconv.conv2d.default" in targets and "fastconv.max_pool2d.default" in targets
        torch.testing.assert_close(program.module()(x), model(x))


def test_revert_is_the_inverse_of_convert():
    torch.manual_seed(0)
    reference = build_model("configurable_cnn", impl="torch", batch_norm=True).eval()
    model = build_model("configurable_cnn", impl="torch", batch_norm=True).eval()
    model.load_state_dict(reference.state_dict())
    params = list(model.parameters())
    x = torch.randn(2, 1, 28, 28)
    fastconv.convert(model)
    assert fastconv.revert(model) is model
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert all(a is b for a, b in zip(params, model.parameters()))  # the same Parameter objects
    assert [repr(m) for m in model.modules()] == [repr(m) for m in reference.modules()]
    assert not model.training
    torch.testing.assert_close(model(x), reference(x))


def test_revert_bare_modules_and_mode():
    conv = fastconv.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False).train()
    back = fastconv.revert(conv)
    assert type(back) is nn.Conv2d and back.weight is conv.weight and back.bias is None and back.training
    assert repr(back) == repr(conv)
    pool = fastconv.MaxPool2d((2, 3), (1, 2), (1, 1), 2, return_indices=True, ceil_mode=True).eval()
    back = fastconv.revert(pool)
    assert type(back) is nn.MaxPool2d and repr(back) == repr(pool) and not back.training
    x = torch.randn(1, 2, 9, 9)
    assert all(torch.equal(a, b) for a, b in zip(back(x), pool(x)))
    other = nn.Linear(2, 2)
    assert fastconv.revert(other) is other
