"""Zoo models trained here on a data source: bundled, cached, or trained on first use and cached."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from compressor.models.checkpoint import load_checkpoint, save_checkpoint
from compressor.models.loaded import LoadedModel
from compressor.models.zoo import build

BUNDLED_WEIGHTS = Path(__file__).parent / "weights"
PRETRAIN_EPOCHS = 20
PRETRAIN_LR = 0.1


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))


def _weights_name(arch: str, data_spec: str) -> str:
    if data_spec == "digits32":
        return f"{arch}-digits32.pt"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", data_spec)[:40]
    return f"{arch}-{slug}-{hashlib.sha1(data_spec.encode()).hexdigest()[:8]}.pt"


def pretrained_on(arch: str, data: object, epochs: int = PRETRAIN_EPOCHS) -> LoadedModel:
    """`arch` trained on `data` (a DataBundle): bundled, cached, or trained now and cached."""
    from compressor.finetune.training import accuracy, train

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
