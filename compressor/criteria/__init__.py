"""Unit-importance criteria behind one registry and one signature.

A criterion maps a ScoringContext to {unit name: importance}; higher = keep.
Each documents its cost in forward/backward passes over the calibration set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from compressor.errors import InputError
from compressor.units import Unit


@dataclass
class ScoringContext:
    """What every criterion may use: the model, its units, calibration batches, a seed."""

    model: nn.Module
    units: list[Unit]
    calibration: DataLoader
    seed: int = 0
    use_cache: bool = True  # prefix caching where the criterion supports it


Criterion = Callable[[ScoringContext], dict[str, float]]
CRITERIA: dict[str, Criterion] = {}


def register(name: str) -> Callable[[Criterion], Criterion]:
    def add(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn

    return add


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        msg = f"unknown criterion {name!r}; known: {', '.join(sorted(CRITERIA))}"
        raise InputError(msg)
    return CRITERIA[name]


def score_units(name: str, ctx: ScoringContext) -> dict[str, float]:
    """Importance of every unit under criterion `name` (higher = keep)."""
    with torch.no_grad():
        ctx.model.eval()
    return get_criterion(name)(ctx)


from compressor.criteria import cka, magnitude, random  # noqa: E402,F401  (registration)
