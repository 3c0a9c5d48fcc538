"""The classic tutorial CNNs, built from fastconv layers or, with ``impl="torch"``, from torch.nn.

Both implementations of a model have the same structure, the same parameter names and counts, and
the same initialisation: built after the same ``torch.manual_seed`` they hold equal weights, and a
``state_dict`` of one loads into the other. Only the conv and max-pool layers differ
(``fastconv.Conv2d``/``fastconv.MaxPool2d`` versus ``torch.nn.Conv2d``/``torch.nn.MaxPool2d``).

    >>> from fastconv.models import build_model
    >>> model = build_model("mnist_cnn")                # fastconv layers
    >>> twin = build_model("mnist_cnn", impl="torch")   # torch.nn layers
    >>> twin.load_state_dict(model.state_dict())

Models (all take 1x28x28 inputs by default; ``in_channels`` and ``num_classes`` are arguments):

==================== ==============================================================================
``mnist_cnn``        :class:`MNISTCNN`, conv32-pool-conv64-pool-fc (50,186 params); Adam 1e-3
``lenet``            :class:`LeNet`, conv6(5x5)-pool-conv16(5x5)-pool-fc64-fc; SGD 0.01
``simple_convnet``   :class:`SimpleConvNet`, conv30(5x5)-pool-fc100-fc; Adam 1e-3
``configurable_cnn`` :class:`ConfigurableCNN`, 'same' convs, optional BatchNorm, Dropout2d
``alexnet``          :class:`AlexNet`, the torchvision layout; 28x28 inputs are resized (see class)
==================== ==============================================================================
"""
from typing import Final, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AlexNet",
    "ConfigurableCNN",
    "LeNet",
    "MNISTCNN",
    "MODELS",
    "MODEL_KWARGS",
    "RECIPES",
    "Resize",
    "SimpleConvNet",
    "TRAINING_DEFAULTS",
    "build_model",
    "canonical_name",
    "layer_classes",
]

IMPLS = ("fastconv", "torch")


def layer_classes(impl: str) -> Tuple[type, type]:
    """``(Conv2d, MaxPool2d)`` of ``impl``: fastconv's modules or torch.nn's."""
    if impl == "torch":
        return nn.Conv2d, nn.MaxPool2d
    if impl == "fastconv":
        import fastconv  # late: fastconv/__init__ may import this module

        return fastconv.Conv2d, fastconv.MaxPool2d
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _out_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class MNISTCNN(nn.Module):
    """The MNIST CNN of the PyTorch tutorials (deeplearningzerotoall, lab-10-1).

    Conv2d(1,32,3,p=1)-ReLU-MaxPool2d(2) -> Conv2d(32,64,3,p=1)-ReLU-MaxPool2d(2) -> Linear(3136,10),
    the Linear initialised Xavier-uniform. 320 + 18,496 + 31,370 = 50,186 parameters. The tutorial
    trains it with Adam lr 1e-3, batch 100, 15 epochs to 98.79% on MNIST.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, impl: str = "fastconv", image_size: int = 28):
        super().__init__()
        Conv2d, MaxPool2d = layer_classes(impl)
        self.impl = impl
        self.layer1 = nn.Sequential(Conv2d(in_channels, 32, kernel_size=3, stride=1, padding=1), nn.ReLU(),
                                    MaxPool2d(kernel_size=2, stride=2))
        self.layer2 = nn.Sequential(Conv2d(32, 64, kernel_size=3, stride=1, padding=1), nn.ReLU(),
                                    MaxPool2d(kernel_size=2, stride=2))
        side = image_size // 2 // 2
        self.fc = nn.Linear(64 * side * side, num_classes, bias=True)
        nn.init.xavier_uniform_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(x))
        return self.fc(x.flatten(1))


class LeNet(nn.Module):
    """LeNet-style: Conv2d(1,6,5)-ReLU-MaxPool(2) -> Conv2d(6,16,5)-ReLU-MaxPool(2) -> Linear(256,64)-ReLU
    -> Linear(64,10). Trained with SGD lr 0.01."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, impl: str = "fastconv", image_size: int = 28):
        super().__init__()
        Conv2d, MaxPool2d = layer_classes(impl)
        self.impl = impl
        self.features = nn.Sequential(
            Conv2d(in_channels, 6, kernel_size=5), nn.ReLU(), MaxPool2d(2),
            Conv2d(6, 16, kernel_size=5), nn.ReLU(), MaxPool2d(2),
        )
        side = _out_size(_out_size(image_size, 5) // 2, 5) // 2
        self.classifier = nn.Sequential(nn.Linear(16 * side * side, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class SimpleConvNet(nn.Module):
    """SimpleConvNet ("Deep Learning from Scratch", ch. 7): Conv2d(1,30,5)-ReLU-MaxPool(2) ->
    Linear(4320,100)-ReLU -> Linear(100,10). Trained with Adam lr 1e-3."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, impl: str = "fastconv", image_size: int = 28,
                 filters: int = 30, kernel_size: int = 5, hidden: int = 100):
        super().__init__()
        Conv2d, MaxPool2d = layer_classes(impl)
        self.impl = impl
        self.features = nn.Sequential(Conv2d(in_channels, filters, kernel_size), nn.ReLU(), MaxPool2d(2))
        side = _out_size(image_size, kernel_size) // 2
        self.classifier = nn.Sequential(nn.Linear(filters * side * side, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class ConfigurableCNN(nn.Module):
    """A CNN of ``len(conv_channels)`` blocks, each Conv2d('same' padding) -> [BatchNorm2d] -> ReLU ->
    MaxPool2d(2) -> [Dropout2d(dropout)], then hidden Linear-ReLU-Dropout layers and a classifier.

    ``kernel_size`` must be odd ('same' padding is ``kernel_size // 2`` on every side). Convs and
    Linears are Kaiming-normal initialised (ReLU gain) with zero biases; BatchNorm starts at 1/0.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, impl: str = "fastconv", image_size: int = 28,
                 kernel_size: int = 3, conv_channels: Sequence[int] = (32, 64),
                 hidden: Sequence[int] = (1024, 128), batch_norm: bool = False, dropout: float = 0.5):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ConfigurableCNN: kernel_size must be odd for 'same' padding, got {kernel_size}")
        Conv2d, MaxPool2d = layer_classes(impl)
        self.impl = impl
        self._conv_cls = Conv2d
        blocks = []
        channels, side = in_channels, image_size
        for width in conv_channels:
            blocks.append(Conv2d(channels, width, kernel_size, padding=kernel_size // 2, bias=not batch_norm))
            if batch_norm:
                blocks.append(nn.BatchNorm2d(width))
            blocks += [nn.ReLU(), MaxPool2d(2)]
            if dropout > 0:
                blocks.append(nn.Dropout2d(dropout))
            channels, side = width, side // 2
        if side < 1:
            raise ValueError(f"ConfigurableCNN: {len(conv_channels)} pooling stages shrink {image_size}px to nothing")
        self.features = nn.Sequential(*blocks)
        head = []
        features = channels * side * side
        for width in hidden:
            head += [nn.Linear(features, width), nn.ReLU()]
            if dropout > 0:
                head.append(nn.Dropout(dropout))
            features = width
        head.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*head)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, self._conv_cls)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class Resize(nn.Module):
    """Bilinear resize to ``size`` x ``size`` (a module so model summaries show it)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class AlexNet(nn.Module):
    """AlexNet in torchvision's layout (Krizhevsky 2014, "One weird trick"): convs of 64-192-384-256-256
    channels (11x11 stride 4 pad 2, 5x5 pad 2, three 3x3 pad 1), overlapping MaxPool2d(3, 2) after
    the 1st, 2nd and 5th, AdaptiveAvgPool2d((6, 6)), then Dropout-Linear(9216,4096)-ReLU-Dropout-
    Linear(4096,4096)-ReLU-Linear(4096,num_classes).

    Made for 224x224 inputs. ``resize=N`` bilinearly resizes inputs to NxN first, so 28x28 MNIST
    images can go through: 63 is the smallest size at which the 11x11/4 conv and the three 3x3/2
    pools still leave at least one pixel (63 -> 15 -> 7 -> 7 -> 3 -> 3 -> 1, then the adaptive pool
    replicates it to 6x6), and the quick runs of ``fastconv.train`` use it; ``resize=224`` is the
    faithful (and ~13x slower) choice.
    """

    MIN_SIZE: Final[int] = 63

    def __init__(self, num_classes: int = 10, in_channels: int = 1, impl: str = "fastconv",
                 resize: Optional[int] = None, dropout: float = 0.5):
        super().__init__()
        Conv2d, MaxPool2d = layer_classes(impl)
        self.impl = impl
        if resize is not None and resize < self.MIN_SIZE:
            raise ValueError(f"AlexNet: resize={resize} is below the smallest size that fits, {self.MIN_SIZE}")
        self.resize = Resize(resize) if resize is not None else nn.Identity()
        self.features = nn.Sequential(
            Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            MaxPool2d(kernel_size=3, stride=2),
            Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            MaxPool2d(kernel_size=3, stride=2),
            Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(p=dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resize(x)
        if min(x.shape[-2], x.shape[-1]) < self.MIN_SIZE:
            size = str(self.MIN_SIZE)  # (str() and +: the message compiles under torch.jit.script too)
            raise ValueError(
                "AlexNet needs inputs of at least " + size + "x" + size + " (224x224 is standard), got (" +
                str(x.shape[-2]) + ", " + str(x.shape[-1]) + "); build it with resize=" + size +
                " or resize=224 for small images"
            )
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


MODELS = {
    "mnist_cnn": MNISTCNN,
    "lenet": LeNet,
    "simple_convnet": SimpleConvNet,
    "configurable_cnn": ConfigurableCNN,
    "alexnet": AlexNet,
}

# Training recipes of the CLI (``python -m fastconv.train --recipe NAME``): the optimiser, learning
# rate and SGD momentum per model.
# - "tutorial": exactly what each model's tutorial trains it with. Plain SGD at lr 0.01 (LeNet,
#   AlexNet) needs many epochs: after the CLI's default quick run (10,000 Fashion-MNIST images, one
#   epoch) LeNet is at 23% test accuracy and AlexNet at chance.
# - "quick" (the default): settings with which every model passes 70% test accuracy in that quick run
#   (measured, README): Adam for all; more steps in the one epoch for ConfigurableCNN (dropout 0.5
#   after every block: batch 25) and AlexNet (batch 50).
RECIPES = {
    "tutorial": {
        "mnist_cnn": {"optimizer": "adam", "lr": 1e-3, "momentum": 0.0},
        "lenet": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0},
        "simple_convnet": {"optimizer": "adam", "lr": 1e-3, "momentum": 0.0},
        "configurable_cnn": {"optimizer": "adam", "lr": 1e-3, "momentum": 0.0},
        "alexnet": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0},
    },
    "quick": {
        "mnist_cnn": {"optimizer": "adam", "lr": 1e-3, "momentum": 0.0},
        "lenet": {"optimizer": "adam", "lr": 3e-3, "momentum": 0.0},
        "simple_convnet": {"optimizer": "adam", "lr": 1e-3, "momentum": 0.0},
        "configurable_cnn": {"optimizer": "adam", "lr": 2e-3, "momentum": 0.0, "batch_size": 25},
        "alexnet": {"optimizer": "adam", "lr": 2e-4, "momentum": 0.0, "batch_size": 50},
    },
}
TRAINING_DEFAULTS = RECIPES["quick"]

# Extra constructor arguments the training CLI passes for 28x28 inputs.
MODEL_KWARGS = {"alexnet": {"resize": AlexNet.MIN_SIZE}}


def canonical_name(name: str) -> str:
    """The key of :data:`MODELS` for ``name``: case and ``-``/``_`` do not matter (``mnist-cnn``)."""
    return name.lower().replace("-", "_")


def build_model(name: str, impl: str = "fastconv", num_classes: int = 10, in_channels: int = 1,
                **kwargs) -> nn.Module:
    """Build the model ``name`` (a key of :data:`MODELS`) with ``impl``'s conv and pool layers.

    Extra keyword arguments go to the model's constructor (e.g. ``batch_norm=True`` for
    ``configurable_cnn``, ``resize=63`` for ``alexnet``). Call ``torch.manual_seed`` first to get
    the same weights from both implementations.
    """
    key = canonical_name(name)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return MODELS[key](num_classes=num_classes, in_channels=in_channels, impl=impl, **kwargs)
