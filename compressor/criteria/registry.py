"""The criteria registry: one signature, the shared ScoringContext, and each criterion's cost.

A criterion maps a ScoringContext to {unit name: importance}; higher = keep.
Each registers its cost in forward/backward passes over the calibration set
(N = calibration images, U = units), shown by `compressor score`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from compressor.compute.group import World
from compressor.errors import InputError
from compressor.graph.units import Unit

F = TypeVar("F", bound=Callable)


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


class NamedFunctions(Generic[F]):
    """Scoring functions by name, each with a line saying what it costs; `what` names them in a refusal.

    One class for the unit criteria here and the channel criteria (criteria/channels.py)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.functions: dict[str, F] = {}
        self.costs: dict[str, str] = {}

    def register(self, name: str, cost: str) -> Callable[[F], F]:
        """A decorator adding a function under `name`; `cost` says what it runs, in passes over the
        calibration set."""

        def add(fn: F) -> F:
            self.functions[name] = fn
            self.costs[name] = cost
            return fn

        return add

    def get(self, name: str) -> F:
        if name not in self.functions:
            msg = f"unknown {self.what} {name!r}; known: {', '.join(sorted(self.functions))}"
            raise InputError(msg)
        return self.functions[name]


Criterion = Callable[[ScoringContext], dict[str, float]]
_UNIT_CRITERIA: NamedFunctions[Criterion] = NamedFunctions("criterion")
CRITERIA = _UNIT_CRITERIA.functions
COSTS = _UNIT_CRITERIA.costs
register = _UNIT_CRITERIA.register
get_criterion = _UNIT_CRITERIA.get


def score_units(name: str, ctx: ScoringContext) -> dict[str, float]:
    """Importance of every unit under criterion `name` (higher = keep)."""
    ctx.model.eval()
    return get_criterion(name)(ctx)
