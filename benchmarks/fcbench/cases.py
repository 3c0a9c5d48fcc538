"""What bench_ops.py measures: layers (cases), the passes of each, and the suites that list them.

Suites:
  core  7 rows, forward+backward: the first convs and pools of the seed models at their training
        batch (quick; the number the project has tracked from the start).
  full  every conv and pool layer of the five seed models (fastconv.models) at batch 1, 100 and 512
        (AlexNet at 224x224, batch 1, 8 and 32), every conv layer of a ResNet-18 (stem at batch 4,
        the rest at batch 8), a depthwise 3x3, ResNet-50's 1x1s, MobileNetV2's depthwise 3x3s,
        ConvNeXt-T's 7x7 and EfficientNet-B0's 5x5 depthwise, ResNeXt-50's grouped 3x3s (batch 8),
        the rows of issue #8's table, and the core rows; convs in four passes (fwd, bwd-input,
        bwd-weight, fwd+bwd), pools in three (fwd, bwd, fwd+bwd).
Layers with the same geometry merge into one row; the other names are kept as aliases.
"""
from dataclasses import dataclass, field

from .numpy_im2col import output_size

CONV_PASSES = ("fwd", "bwd-input", "bwd-weight", "fwd+bwd")
POOL_PASSES = ("fwd", "bwd", "fwd+bwd")
SUITES = ("core", "full")


def _hw(t):
    return str(t[0]) if t[0] == t[1] else f"{t[0]}x{t[1]}"


@dataclass(frozen=True)
class ConvCase:
    layer: str
    n: int
    c: int
    h: int
    w: int
    cout: int
    kh: int
    kw: int
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    bias: bool = True
    op = "conv2d"

    @property
    def out_hw(self):
        return output_size(self.h, self.w, self.kh, self.kw, self.stride, self.padding, self.dilation)

    def geometry(self):
        return (self.n, self.c, self.h, self.w, self.cout, self.kh, self.kw, self.stride, self.padding,
                self.dilation, self.groups, self.bias)

    def shape_str(self):
        s = f"({self.n},{self.c},{self.h},{self.w})x({self.cout},{self.c // self.groups},{self.kh},{self.kw})"
        for tag, v, default in (("s", self.stride, (1, 1)), ("p", self.padding, (0, 0)), ("d", self.dilation, (1, 1))):
            if v != default:
                s += f" {tag}{_hw(v)}"
        if self.groups != 1:
            s += f" g{self.groups}"
        return s

    def macs(self):
        oh, ow = self.out_hw
        return self.n * self.cout * oh * ow * (self.c // self.groups) * self.kh * self.kw

    def sizes(self):
        oh, ow = self.out_hw
        return {"input": self.n * self.c * self.h * self.w,
                "weight": self.cout * (self.c // self.groups) * self.kh * self.kw,
                "bias": self.cout if self.bias else 0, "output": self.n * self.cout * oh * ow}


@dataclass(frozen=True)
class PoolCase:
    layer: str
    n: int
    c: int
    h: int
    w: int
    kernel: tuple
    stride: tuple
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    ceil_mode: bool = False
    op = "max_pool2d"

    @property
    def out_hw(self):
        def one(size, k, s, p, d):
            eff = d * (k - 1) + 1
            if self.ceil_mode:
                o = -(-(size + 2 * p - eff) // s) + 1
                if (o - 1) * s >= size + p:
                    o -= 1
                return o
            return (size + 2 * p - eff) // s + 1
        return (one(self.h, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0]),
                one(self.w, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1]))

    def geometry(self):
        return (self.n, self.c, self.h, self.w, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)

    def shape_str(self):
        s = f"({self.n},{self.c},{self.h},{self.w}) k{_hw(self.kernel)} s{_hw(self.stride)}"
        if self.padding != (0, 0):
            s += f" p{_hw(self.padding)}"
        if self.dilation != (1, 1):
            s += f" d{_hw(self.dilation)}"
        if self.ceil_mode:
            s += " ceil"
        return s

    def window_ops(self):
        oh, ow = self.out_hw
        return self.n * self.c * oh * ow * self.kernel[0] * self.kernel[1]

    def sizes(self):
        oh, ow = self.out_hw
        return {"input": self.n * self.c * self.h * self.w, "output": self.n * self.c * oh * ow}


def conv(layer, n, c, hw, cout, k, stride=1, padding=0, groups=1, bias=True):
    return ConvCase(layer, n, c, hw, hw, cout, k, k, (stride, stride), (padding, padding), groups=groups, bias=bias)


def pool(layer, n, c, hw, k, stride, padding=0):
    return PoolCase(layer, n, c, hw, hw, (k, k), (stride, stride), (padding, padding))


# --------------------------------------------------------------------------------------------------
# Layers. tests/test_benchmarks.py checks these against the models in fastconv.models (traced).
# --------------------------------------------------------------------------------------------------

def small_model_cases(n):
    """The seed models on 28x28 MNIST images: conv and pool layers in order."""
    return [
        conv("mnist_cnn.conv1", n, 1, 28, 32, 3, padding=1),
        pool("mnist_cnn.pool1", n, 32, 28, 2, 2),
        conv("mnist_cnn.conv2", n, 32, 14, 64, 3, padding=1),
        pool("mnist_cnn.pool2", n, 64, 14, 2, 2),
        conv("lenet.conv1", n, 1, 28, 6, 5),
        pool("lenet.pool1", n, 6, 24, 2, 2),
        conv("lenet.conv2", n, 6, 12, 16, 5),
        pool("lenet.pool2", n, 16, 8, 2, 2),
        conv("simple_convnet.conv1", n, 1, 28, 30, 5),
        pool("simple_convnet.pool1", n, 30, 24, 2, 2),
        # configurable_cnn's default: 3x3 "same" convs 1->32->64 at 28x28 with 2x2 pools; the same
        # geometry as mnist_cnn, so these rows merge into mnist_cnn's (listed as aliases).
        conv("configurable_cnn.conv1", n, 1, 28, 32, 3, padding=1),
        pool("configurable_cnn.pool1", n, 32, 28, 2, 2),
        conv("configurable_cnn.conv2", n, 32, 14, 64, 3, padding=1),
        pool("configurable_cnn.pool2", n, 64, 14, 2, 2),
    ]


def alexnet_cases(n, size=224, in_channels=3):
    s1 = (size + 2 * 2 - 11) // 4 + 1   # 55
    p1 = (s1 - 3) // 2 + 1              # 27
    p2 = (p1 - 3) // 2 + 1              # 13
    return [
        conv("alexnet.conv1", n, in_channels, size, 64, 11, stride=4, padding=2),
        pool("alexnet.pool1", n, 64, s1, 3, 2),
        conv("alexnet.conv2", n, 64, p1, 192, 5, padding=2),
        pool("alexnet.pool2", n, 192, p1, 3, 2),
        conv("alexnet.conv3", n, 192, p2, 384, 3, padding=1),
        conv("alexnet.conv4", n, 384, p2, 256, 3, padding=1),
        conv("alexnet.conv5", n, 256, p2, 256, 3, padding=1),
        pool("alexnet.pool3", n, 256, p2, 3, 2),
    ]


def resnet18_cases(n, size=224, n_stem=None):
    """Every conv of torchvision's resnet18 (no conv biases) and its max-pool; the stem and pool at
    batch n_stem (default n). Repeated geometries (the second conv of each stage, the second block)
    merge into one row with aliases."""
    n_stem = n if n_stem is None else n_stem
    s = (size + 2 * 3 - 7) // 2 + 1      # 112
    hw = (s + 2 - 3) // 2 + 1            # 56
    cases = [conv("resnet18.conv1", n_stem, 3, size, 64, 7, stride=2, padding=3, bias=False),
             pool("resnet18.maxpool", n_stem, 64, s, 3, 2, padding=1)]
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        stride = 1 if stage == 1 else 2
        out = (hw + 2 - 3) // stride + 1
        for block in range(2):
            pre = f"resnet18.layer{stage}.{block}"
            if block == 0:
                cases.append(conv(f"{pre}.conv1", n, cin, hw, cout, 3, stride=stride, padding=1, bias=False))
            else:
                cases.append(conv(f"{pre}.conv1", n, cout, out, cout, 3, padding=1, bias=False))
            cases.append(conv(f"{pre}.conv2", n, cout, out, cout, 3, padding=1, bias=False))
            if block == 0 and stride != 1:
                cases.append(conv(f"{pre}.downsample.0", n, cin, hw, cout, 1, stride=2, bias=False))
        cin, hw = cout, out
    return cases


def extra_cases(n, scale=1):
    """Shapes outside the seed models and ResNet-18 that issue #8 tracks."""
    return [conv("depthwise3x3", n, 96, 56 // scale, 96, 3, padding=1, groups=96),
            conv("bottleneck1x1", n, 256, 28 // scale, 64, 1)]


def resnet50_1x1_cases(n, scale=1):
    """ResNet-50's bottleneck 1x1 convolutions (torchvision's layout, no biases): the expanding and
    reducing 1x1s at each stage's plane size and two 1x1/2 shortcuts."""
    return [conv("resnet50.layer1.0.conv3", n, 64, 56 // scale, 256, 1, bias=False),
            conv("resnet50.layer2.0.conv1", n, 256, 56 // scale, 128, 1, bias=False),
            conv("resnet50.layer2.0.downsample.0", n, 256, 56 // scale, 512, 1, stride=2, bias=False),
            conv("resnet50.layer3.1.conv1", n, 1024, 14 // scale, 256, 1, bias=False),
            conv("resnet50.layer4.0.downsample.0", n, 1024, 14 // scale, 2048, 1, stride=2, bias=False),
            conv("resnet50.layer4.0.conv3", n, 512, max(1, 7 // scale), 2048, 1, bias=False)]


def mobilenet_v2_depthwise_cases(n, scale=1):
    """MobileNetV2's depthwise 3x3 convolutions (torchvision's layout, no biases): the strided ones of
    three stages and two stride-1 ones on small planes."""
    return [conv("mobilenet_v2.features.2.conv.1.0", n, 96, 112 // scale, 96, 3, stride=2, padding=1, groups=96,
                 bias=False),
            conv("mobilenet_v2.features.4.conv.1.0", n, 144, 56 // scale, 144, 3, stride=2, padding=1, groups=144,
                 bias=False),
            conv("mobilenet_v2.features.12.conv.1.0", n, 576, 14 // scale, 576, 3, padding=1, groups=576, bias=False),
            conv("mobilenet_v2.features.14.conv.1.0", n, 576, 14 // scale, 576, 3, stride=2, padding=1, groups=576,
                 bias=False),
            conv("mobilenet_v2.features.17.conv.1.0", n, 960, max(1, 7 // scale), 960, 3, padding=1, groups=960,
                 bias=False)]


def large_kernel_depthwise_cases(n, scale=1):
    """Depthwise convolutions with 5x5 and 7x7 kernels (torchvision's layouts): ConvNeXt-T's 7x7 of each
    stage (with biases) and EfficientNet-B0's 5x5, strided and not (no biases)."""
    convnext = [conv(f"convnext_tiny.features.{2 * i + 1}.0.block.0", n, c, max(1, hw // scale), c, 7, padding=3,
                     groups=c) for i, (c, hw) in enumerate(((96, 56), (192, 28), (384, 14), (768, 7)))]
    return convnext + [
        conv("efficientnet_b0.features.3.0.block.1.0", n, 144, 56 // scale, 144, 5, stride=2, padding=2, groups=144,
             bias=False),
        conv("efficientnet_b0.features.5.1.block.1.0", n, 672, 14 // scale, 672, 5, padding=2, groups=672, bias=False),
        conv("efficientnet_b0.features.6.0.block.1.0", n, 672, 14 // scale, 672, 5, stride=2, padding=2, groups=672,
             bias=False)]


def resnext50_grouped_cases(n, scale=1):
    """ResNeXt-50 32x4d's grouped 3x3 convolutions (torchvision's layout, 32 groups, no biases): 4, 8,
    16 and 32 channels per group, the stride-2 one of layer2 and stride-1 ones."""
    return [conv("resnext50_32x4d.layer1.0.conv2", n, 128, 56 // scale, 128, 3, padding=1, groups=32, bias=False),
            conv("resnext50_32x4d.layer2.0.conv2", n, 256, 56 // scale, 256, 3, stride=2, padding=1, groups=32,
                 bias=False),
            conv("resnext50_32x4d.layer3.1.conv2", n, 512, 14 // scale, 512, 3, padding=1, groups=32, bias=False),
            conv("resnext50_32x4d.layer4.1.conv2", n, 1024, max(1, 7 // scale), 1024, 3, padding=1, groups=32,
                 bias=False)]


def core_cases(tiny=False):
    """The core suite: exactly these rows, forward+backward, float32."""
    n, n_alex, n_pool, size = (100, 4, 8, 224) if not tiny else (2, 1, 2, 67)
    small = {c.layer: c for c in small_model_cases(n)}
    alex_conv1 = alexnet_cases(n_alex, size)[0]
    alex_pool1 = alexnet_cases(n_pool, size)[1]
    return [small["mnist_cnn.conv1"], small["mnist_cnn.conv2"], small["lenet.conv2"], small["simple_convnet.conv1"],
            alex_conv1, small["mnist_cnn.pool1"], alex_pool1]


def issue8_cases(tiny=False):
    """The layers of issue #8's table (all passes of each are tagged in the full suite)."""
    n, n_alex, size, scale = (8, 8, 224, 1) if not tiny else (2, 2, 67, 7)
    small = {c.layer: c for c in small_model_cases(100 if not tiny else 2)}
    alex = {c.layer: c for c in alexnet_cases(n_alex, size)}
    res = {c.layer: c for c in resnet18_cases(n, 224 // scale, n_stem=4 if not tiny else 1)}
    extra = {c.layer: c for c in extra_cases(n, scale)}
    return [small["mnist_cnn.conv2"], small["lenet.conv2"], alex["alexnet.conv2"], alex["alexnet.conv3"],
            res["resnet18.layer2.0.conv2"], res["resnet18.conv1"], res["resnet18.layer2.0.conv1"],
            extra["bottleneck1x1"], extra["depthwise3x3"]]


@dataclass
class Row:
    case: object
    pass_: str
    aliases: list = field(default_factory=list)
    core: bool = False     # a row of the core suite (the fwd+bwd pass of a core case)
    issue8: bool = False   # a pass of a layer in issue #8's table

    @property
    def op(self):
        return self.case.op

    @property
    def id(self):
        return f"{self.op}/{self.pass_}/{self.case.layer}/n{self.case.n}"

    @property
    def label(self):
        return f"{self.op} {self.pass_}"

    @property
    def sub_label(self):
        return f"{self.case.layer} {self.case.shape_str()}"

    @property
    def name(self):
        return f"{self.label} {self.sub_label}"


def build_rows(suite, tiny=False):
    """Rows of a suite, in order; cases with the same geometry are merged (the first name wins)."""
    core = core_cases(tiny)
    issue8 = issue8_cases(tiny)
    if suite == "core":
        cases = list(core)
        passes = {"conv2d": ("fwd+bwd",), "max_pool2d": ("fwd+bwd",)}
    elif suite == "full":
        batches = (1, 100, 512) if not tiny else (1, 2)
        alex_batches, size = ((1, 8, 32), 224) if not tiny else ((1, 2), 67)
        n_res, n_stem, scale = (8, 4, 1) if not tiny else (2, 1, 7)
        cases = []
        for n in batches:
            cases += small_model_cases(n)
        for n in alex_batches:
            cases += alexnet_cases(n, size)
        cases += resnet18_cases(n_res, 224 // scale, n_stem=n_stem)
        cases += extra_cases(n_res, scale)
        cases += resnet50_1x1_cases(n_res, scale)
        cases += mobilenet_v2_depthwise_cases(n_res, scale)
        cases += large_kernel_depthwise_cases(n_res, scale)
        cases += resnext50_grouped_cases(n_res, scale)
        cases += issue8 + core
        passes = {"conv2d": CONV_PASSES, "max_pool2d": POOL_PASSES}
    else:
        raise ValueError(f"unknown suite {suite!r}; expected one of {SUITES}")
    core_geoms = {(c.op, c.geometry()) for c in core}
    issue8_geoms = {(c.op, c.geometry()) for c in issue8}
    merged = {}
    for c in cases:
        key = (c.op, c.geometry())
        if key in merged:
            if c.layer != merged[key][0].layer and c.layer not in merged[key][1]:
                merged[key][1].append(c.layer)
        else:
            merged[key] = (c, [])
    rows = []
    for key, (c, aliases) in merged.items():
        for p in passes[c.op]:
            rows.append(Row(c, p, aliases, core=(key in core_geoms and p == "fwd+bwd"),
                            issue8=(key in issue8_geoms and suite == "full")))
    return rows


def work(row, element_size):
    """(flops, bytes) of one call: flops = 2*MACs per GEMM pass (window compares for pooling);
    bytes = compulsory traffic (read each operand, write each result once)."""
    c, p = row.case, row.pass_
    es = element_size
    s = c.sizes()
    if c.op == "conv2d":
        f = 2 * c.macs()
        fwd_b = s["input"] + s["weight"] + s["bias"] + s["output"]
        bi_b = s["output"] + s["weight"] + s["input"]
        bw_b = s["output"] + s["input"] + s["weight"]
        flops = {"fwd": f, "bwd-input": f, "bwd-weight": f, "fwd+bwd": 3 * f}[p]
        elems = {"fwd": fwd_b, "bwd-input": bi_b, "bwd-weight": bw_b, "fwd+bwd": fwd_b + bi_b + bw_b + s["bias"]}[p]
        return flops, elems * es
    f = c.window_ops()
    idx_bytes = 8 * s["output"]  # int64 indices
    fwd_bytes = (s["input"] + s["output"]) * es + idx_bytes
    bwd_bytes = (s["output"] + s["input"]) * es + idx_bytes  # read grad_out + indices, write grad_input
    return ({"fwd": f, "bwd": 0, "fwd+bwd": f}[p],
            {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[p])


def traced_layers(model_name, batch, size, in_channels=1, **model_kwargs):
    """The conv and max-pool geometries a fastconv.models model runs on a (batch, in_channels, size,
    size) input, traced with forward hooks on the meta device (no memory, no compute)."""
    import torch

    from fastconv.models import build_model

    with torch.device("meta"):
        model = build_model(model_name, impl="torch", in_channels=in_channels, **model_kwargs)
    found = []

    def hook(mod, args, _out):
        x = args[0]
        n, c, h, w = x.shape
        if isinstance(mod, torch.nn.Conv2d):
            found.append(ConvCase(model_name, n, c, h, w, mod.out_channels, *mod.kernel_size, tuple(mod.stride),
                                  tuple(mod.padding), tuple(mod.dilation), mod.groups, mod.bias is not None))
        else:
            pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
            found.append(PoolCase(model_name, n, c, h, w, pair(mod.kernel_size), pair(mod.stride), pair(mod.padding),
                                  pair(mod.dilation), mod.ceil_mode))

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            m.register_forward_hook(hook)
    model.eval()
    with torch.no_grad():
        model(torch.empty(batch, in_channels, size, size, device="meta"))
    return found
