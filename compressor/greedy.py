"""Greedy set selection: remove units one at a time, each time the one that loses least
fidelity per ms saved *given the units already removed*.

The knapsack (search.py) adds up single-unit scores, so it cannot see that two removals
together cost more (or less) than apart; at 1.3x on efficientnet_lite0 no criterion's
knapsack set beat random sets (benchmarks/results/criteria_at_speedup.md). Here every
step runs the model with each candidate set removed on calibration images and takes the
KL divergence of its logits from the unpruned model's: a measured set-level cost.

Cost: for U units and k steps, U + (U-1) + ... + (U-k+1) forward passes over the
calibration images, computed lazily up to the saving a search asks for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from compressor.search import Choice, removable_limits
from compressor.surgery import remove_units
from compressor.units import Unit

BATCH = 64  # images per forward pass


@dataclass(frozen=True)
class Step:
    """One greedy removal: the unit, the table's cumulative saving (ms) and the set's KL (nats)."""

    unit: str
    saving_ms: float
    kl: float


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model`'s logits on `x` in eval mode, BATCH images at a time (its mode restored)."""
    mode = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i:i + BATCH]) for i in range(0, len(x), BATCH)])
    model.train(mode)
    return out


def kl_from(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference || logits) over the rows of two logit matrices (nats)."""
    log_p, log_q = F.log_softmax(reference.double(), 1), F.log_softmax(logits.double(), 1)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


class GreedyOrder:
    """The greedy removal order of `units`, extended one step at a time as savings are asked for.

    A step takes, among the units still allowed (a stage keeps `min_per_stage` blocks; a block is
    removed or merged, not both; units saving nothing by the table are skipped), the one with the
    least rise in KL per ms of table saving. `choose(required_ms)` is the shortest prefix saving
    at least `required_ms`, as a search.Choice whose importance_lost is that set's KL.
    """

    def __init__(self, model: nn.Module, units: Sequence[Unit], savings_ms: dict[str, float],
                 x: torch.Tensor, min_per_stage: int = 1,
                 log: Callable[[str], None] = lambda _: None) -> None:
        self.model = model
        self.units = list(units)
        self.savings_ms = savings_ms
        self.x = x
        self.limits = removable_limits(self.units, min_per_stage)
        self.reference = logits_of(model, x)
        self.steps: list[Step] = []
        self.evaluations = 0
        self._log = log
        self._done = False

    def set_kl(self, removed: Sequence[Unit]) -> float:
        """KL (nats) of the model with `removed` taken out, from the unpruned model, on the calibration images."""
        self.evaluations += 1
        return kl_from(self.reference, logits_of(remove_units(self.model, removed), self.x))

    def _allowed(self, taken: list[Unit]) -> list[Unit]:
        blocks = {u.path for u in taken}
        removed_per_stage: dict[str, int] = {}
        for u in taken:
            if u.kind != "merge":
                removed_per_stage[u.stage] = removed_per_stage.get(u.stage, 0) + 1
        return [u for u in self.units
                if u.path not in blocks and self.savings_ms[u.name] > 0
                and (u.kind == "merge" or removed_per_stage.get(u.stage, 0) < self.limits.get(u.stage, 0))]

    def extend(self) -> bool:
        """Take one more step; False once nothing more may be removed."""
        if self._done:
            return False
        by_name = {u.name: u for u in self.units}
        taken = [by_name[s.unit] for s in self.steps]
        candidates = self._allowed(taken)
        if not candidates:
            self._done = True
            return False
        kl_now = self.steps[-1].kl if self.steps else 0.0
        costs = {u.name: self.set_kl(taken + [u]) for u in candidates}
        best = min(candidates, key=lambda u: ((costs[u.name] - kl_now) / self.savings_ms[u.name], u.order))
        saving = (self.steps[-1].saving_ms if self.steps else 0.0) + self.savings_ms[best.name]
        self.steps.append(Step(best.name, saving, costs[best.name]))
        self._log(f"  greedy step {len(self.steps)}: {best.name} (KL {costs[best.name]:.4f} nats, "
                  f"table saving {saving:.3f} ms; {len(candidates)} sets evaluated)")
        return True

    def choose(self, required_ms: float) -> Choice | None:
        """The shortest prefix of the order whose table saving is >= `required_ms` (None if none is)."""
        if required_ms <= 0:
            return Choice((), 0.0, 0.0)
        while not self.steps or self.steps[-1].saving_ms < required_ms:
            if not self.extend():
                return None
        k = next(i for i, s in enumerate(self.steps) if s.saving_ms >= required_ms) + 1
        names = {s.unit for s in self.steps[:k]}
        removed = tuple(u.name for u in self.units if u.name in names)
        return Choice(removed, self.steps[k - 1].kl, self.steps[k - 1].saving_ms)


def greedy_or(order: GreedyOrder, fallback: Callable[[float], Choice | None]) -> Callable[[float], Choice | None]:
    """Propose `order`'s prefix, or `fallback`'s set where the greedy order runs out before the
    required saving: one step at a time it can strand itself (a block taken by removal cannot be
    merged, a stage at its floor takes no more) where another combination still reaches the saving."""

    def choose(required_ms: float) -> Choice | None:
        chosen = order.choose(required_ms)
        return chosen if chosen is not None else fallback(required_ms)

    return choose
