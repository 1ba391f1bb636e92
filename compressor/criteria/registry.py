"""The criteria registry: one signature, the shared ScoringContext, and each criterion's cost.

A criterion maps a ScoringContext to {unit name: importance}; higher = keep.
Each registers its cost in forward/backward passes over the calibration set
(N = calibration images, U = units), shown by `compressor score`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from compressor.compute.group import World
from compressor.errors import InputError
from compressor.graph.units import Unit


@dataclass
class ScoringContext:
    """What every criterion may use: the model, its units, calibration batches, a seed.

    The batches are on the model's device. In a process group they are this rank's contiguous share of
    the calibration set, and a criterion that reads them combines what each rank found through `group`
    (World.cat: rows in order; World.total: sums), so that every rank returns the scores of the whole set.
    """

    model: nn.Module
    units: list[Unit]
    calibration: DataLoader | Iterable
    seed: int = 0
    use_cache: bool = True  # prefix caching where the criterion supports it
    repeats: int = 3  # seeds averaged by stochastic criteria (SR-init)
    group: World = field(default_factory=World)  # alone: cat and total of one process

    @property
    def example(self) -> torch.Tensor:
        """The first calibration batch: what the model's graph is captured on."""
        return next(iter(self.calibration))[0]


Criterion = Callable[[ScoringContext], dict[str, float]]
CRITERIA: dict[str, Criterion] = {}
COSTS: dict[str, str] = {}


def register(name: str, cost: str) -> Callable[[Criterion], Criterion]:
    """Add a criterion under `name`; `cost` says what it runs, in passes over the calibration set."""

    def add(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        COSTS[name] = cost
        return fn

    return add


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        msg = f"unknown criterion {name!r}; known: {', '.join(sorted(CRITERIA))}"
        raise InputError(msg)
    return CRITERIA[name]


def score_units(name: str, ctx: ScoringContext) -> dict[str, float]:
    """Importance of every unit under criterion `name` (higher = keep)."""
    ctx.model.eval()
    return get_criterion(name)(ctx)
