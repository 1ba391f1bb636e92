"""Model zoo and checkpoints.

`--model` is a zoo name or a checkpoint file written by this package. Zoo
models trained on a data source are cached (trained by our own code on first
use); the default resnet56 on digits32 ships with the package.
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
class ZooEntry:
    """How to build a zoo architecture; `input_size` is its native H = W in pixels."""

    build: Callable[[int], nn.Module]
    input_size: int


ZOO: dict[str, ZooEntry] = {
    **{f"resnet{d}": ZooEntry(partial(_cifar_resnet, d), 32) for d in (20, 32, 44, 56, 110)},
    **{n: ZooEntry(partial(_torchvision, n), 224)
       for n in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small")},
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
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path) -> LoadedModel:
    """Load a checkpoint written by save_checkpoint; removed units are removed again."""
    from compressor.surgery import remove_units
    from compressor.units import find_units, units_by_name

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
    loaded = LoadedModel(build(payload["arch"], payload["num_classes"]), payload["arch"],
                         payload["num_classes"], tuple(payload["input_shape"]), str(path),
                         list(payload.get("removed_units", [])))
    if loaded.removed_units:
        x = loaded.example_input()
        units = units_by_name(find_units(loaded.model, x), loaded.removed_units)
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


def load_model(spec: str, data: object | None = None) -> LoadedModel:
    """A zoo name (trained on `data` when given) or a checkpoint path; with `data`, the model
    must take the data's input shape (InputError otherwise)."""
    if spec in ZOO:
        if data is None:
            size = ZOO[spec].input_size
            return LoadedModel(build(spec, 10), spec, 10, (3, size, size), f"{spec} (untrained)")
        loaded = pretrained_on(spec, data)
    elif spec.endswith((".pt", ".pth")) or os.sep in spec or Path(spec).exists():
        loaded = load_checkpoint(spec)
    else:
        msg = f"unknown model {spec!r}; zoo: {', '.join(ZOO)} (or a checkpoint file)"
        raise InputError(msg)
    if data is not None and tuple(loaded.input_shape) != tuple(data.input_shape):
        msg = f"model expects inputs {loaded.input_shape}, data {data.spec} gives {tuple(data.input_shape)}"
        raise InputError(msg)
    return loaded
