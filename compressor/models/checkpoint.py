"""Checkpoints that load without running pickled code: tensors and plain data only.

A checkpoint holds the architecture's name (a zoo name, or what rebuilds the
user's architecture), the recipe of removed units, and the state_dict of the
result; loading rebuilds the architecture, redoes the recipe, loads the weights
with `strict=True`. Version 1 (a list of removed unit names) still loads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compressor.data.bundle import Preprocessing
from compressor.errors import InputError, first_line
from compressor.fileio import atomic_write
from compressor.graph.recipe import apply_recipe, make_recipe
from compressor.models.architectures import build_arch
from compressor.models.loaded import LoadedModel

CHECKPOINT_FORMAT = "compressor-checkpoint"
CHECKPOINT_VERSION = 2


def save_checkpoint(path: str | Path, loaded: LoadedModel, recipe: dict | None = None, **extra: object) -> Path:
    """Write a checkpoint that loads with torch.load(weights_only=True): tensors and plain data."""
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": loaded.arch,
        "num_classes": loaded.num_classes, "input_shape": list(loaded.input_shape),
        "removed_units": list(loaded.removed_units),
        "recipe": recipe if recipe is not None else names_recipe(loaded.removed_units, loaded.input_shape),
        "state_dict": {k: v.detach().clone() for k, v in loaded.model.state_dict().items()},
        **extra,
    }
    if loaded.preprocessing is not None:
        payload["preprocessing"] = loaded.preprocessing.to_dict()
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def names_recipe(names: list[str], input_shape: tuple[int, ...]) -> dict:
    """A recipe that names the removed units only (their kinds are found again by tracing)."""
    return {**make_recipe([], input_shape), "units": [{"name": n} for n in names]}


def why_not_loadable(error: Exception) -> str:
    """What torch.load(weights_only=True) refused, in one line without torch's advice to trust the file."""
    import pickle

    if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error):
        return ("it holds pickled objects other than tensors and plain data, which could run code when "
                "loaded; refused")
    if isinstance(error, pickle.UnpicklingError):
        return "its bytes are not a torch file (unreadable pickle data)"
    if isinstance(error, EOFError):
        return "the file is empty or cut short"
    return f"{type(error).__name__}: {first_line(error, 160)}"


def load_tensors_file(path: str | Path, file: str, holds: str) -> object:
    """torch.load(weights_only=True) of the user's `path` (no pickled code runs); InputError "<file> not
    found" or "<path> is not a loadable <holds>" with why (why_not_loadable)."""
    path = Path(path)
    if not path.is_file():
        msg = f"{file} not found: {path}"
        raise InputError(msg)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (a pickle with code in it), RuntimeError, EOFError, ...
        msg = f"{path} is not a loadable {holds} (weights_only=True): {why_not_loadable(e)}"
        raise InputError(msg) from e


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's payload, read with weights_only=True (no pickled code runs); InputError otherwise."""
    payload = load_tensors_file(path, "checkpoint", "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        msg = f"{path} is not a compressor checkpoint (no '{CHECKPOINT_FORMAT}' header)"
        raise InputError(msg)
    return payload


def check_state_dict(state: object, path: str | Path) -> None:
    """A mapping of parameter names to finite tensors; InputError naming the first non-finite ones."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"{path}: its state_dict is not a mapping of parameter names to tensors"
        raise InputError(msg)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        msg = f"{path}: NaN or Inf values in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
        raise InputError(msg)


def load_checkpoint(path: str | Path) -> LoadedModel:
    """Load a checkpoint written by save_checkpoint; its recipe (removed units) is redone first."""
    payload = read_checkpoint(path)
    preprocessing = payload.get("preprocessing")
    loaded = LoadedModel(build_arch(payload["arch"], payload["num_classes"]), payload["arch"],
                         payload["num_classes"], tuple(payload["input_shape"]), str(path),
                         list(payload.get("removed_units", [])),
                         Preprocessing.from_dict(preprocessing) if preprocessing else None)
    check_state_dict(payload.get("state_dict"), path)
    recipe = payload.get("recipe") or names_recipe(loaded.removed_units, loaded.input_shape)  # version 1: names
    if recipe is not None and recipe.get("units"):
        loaded.model = apply_recipe(loaded.model, recipe, loaded.example_input())
    try:
        loaded.model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        msg = f"{path}: weights do not fit {payload['arch']}: {first_line(e)}"
        raise InputError(msg) from e
    loaded.model.eval()
    return loaded
