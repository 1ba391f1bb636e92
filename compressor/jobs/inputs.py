"""What the Python API accepts, resolved to what the jobs take: the user's own nn.Module or a model
spec, a DataLoader or a data spec, a Profile or a profile name."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from compressor.data.bundle import DataBundle
from compressor.errors import InputError
from compressor.latency.profiles import Profile, load_profile
from compressor.models.loaded import LoadedModel


def as_profile(profile: str | Path | Profile) -> Profile:
    """A Profile, a built-in profile's name, or a YAML path, as a Profile."""
    return profile if isinstance(profile, Profile) else load_profile(str(profile))


def as_data(data: str | DataBundle | Iterable) -> DataBundle:
    """A DataBundle, a data spec string, or the user's batches (data/batches.py), as a DataBundle."""
    if isinstance(data, DataBundle):
        return data
    if isinstance(data, str):
        from compressor.data import load_data

        return load_data(data)
    from compressor.data.batches import from_batches

    return from_batches(data)


def as_loaded(model: nn.Module | LoadedModel | str, data: DataBundle,
               input_shape: tuple[int, int, int] | None) -> LoadedModel:
    """The user's nn.Module (its input shape from the data unless given), a LoadedModel, or a model spec."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        from compressor.models.sources import load_model

        return load_model(model, data, input_shape=input_shape)
    from compressor.models.sources import from_module

    shape = tuple(input_shape) if input_shape else tuple(data.input_shape)
    if shape != tuple(data.input_shape):
        msg = f"input_shape {shape} differs from the data's {tuple(data.input_shape)}"
        raise InputError(msg)
    return from_module(model, shape)
