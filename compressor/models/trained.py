"""Zoo models trained here on a data source: bundled, cached, or trained on first use and cached."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from compressor.models.checkpoint import load_checkpoint, save_checkpoint
from compressor.models.loaded import LoadedModel
from compressor.models.recipes import Recipe, TrainSettings, sgd_recipe
from compressor.models.zoo import ZOO, build

BUNDLED_WEIGHTS = Path(__file__).parent / "weights"


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))


def _weights_name(arch: str, data_spec: str) -> str:
    """`ARCH-SPEC.pt` for a source named by a plain word (digits32, digit_canvas), else a slug and a hash."""
    if re.fullmatch(r"[A-Za-z0-9_]+", data_spec):
        return f"{arch}-{data_spec}.pt"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", data_spec)[:40]
    return f"{arch}-{slug}-{hashlib.sha1(data_spec.encode()).hexdigest()[:8]}.pt"


def recipe_of(arch: str) -> Recipe:
    """How the zoo architecture `arch` is trained here."""
    return ZOO[arch].recipe or sgd_recipe


def train_recipe(arch: str, data: object, settings: TrainSettings) -> tuple[nn.Module, dict[str, float]]:
    """A fresh `arch` (initialised from `settings.seed`) trained on `data` (a DataBundle) by its recipe;
    returns the model and what the recipe reports (figures on the held-out split, settings used)."""
    torch.manual_seed(settings.seed)
    model = build(arch, data.num_classes)
    return model.eval(), recipe_of(arch)(model, data, settings)


def stored_weights(arch: str, data_spec: str, input_shape: tuple[int, ...] | None = None) -> LoadedModel | None:
    """`arch` as trained on `data_spec`, bundled with the package or cached, if either is there (and takes
    `input_shape`, where given)."""
    name = _weights_name(arch, data_spec)
    for candidate in (BUNDLED_WEIGHTS / name, cache_dir() / name):
        if candidate.is_file():
            loaded = load_checkpoint(candidate)
            if input_shape is None or loaded.input_shape == tuple(input_shape):
                loaded.source = f"{arch} trained on {data_spec} ({candidate})"
                return loaded
    return None


def pretrained_on(arch: str, data: object) -> LoadedModel:
    """`arch` trained on `data` (a DataBundle): bundled, cached, or trained now and cached."""
    found = stored_weights(arch, data.spec, data.input_shape)
    if found is not None:
        return found
    print(f"training {arch} on {data.spec} (first use; cached afterwards)")
    model, record = train_recipe(arch, data, TrainSettings())
    loaded = LoadedModel(model, arch, data.num_classes, tuple(data.input_shape), f"{arch} trained on {data.spec}")
    target = cache_dir() / _weights_name(arch, data.spec)
    save_checkpoint(target, loaded, trained_on=data.spec, **record)
    loaded.source += f" ({target})"
    return loaded


def default_weights(arch: str) -> LoadedModel:
    """A zoo entry with a default data source (`trained_on`) as trained on it: bundled, cached, or trained now."""
    from compressor.data.sources import load_data

    spec = ZOO[arch].trained_on
    return stored_weights(arch, spec) or pretrained_on(arch, load_data(spec))
