"""Choose units to remove: least importance lost with predicted saving >= required.

An exact knapsack over discretised savings (dynamic programming), with a
per-stage floor on surviving units. Any unit kind with an importance and a
measured saving fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compressor.units import Unit

BINS = 1000


@dataclass(frozen=True)
class Choice:
    removed: tuple[str, ...]
    importance_lost: float
    predicted_saving_ms: float


def removable_limits(units: Sequence[Unit], min_per_stage: int) -> dict[str, int]:
    """How many units each stage may lose so that `min_per_stage` survive."""
    counts: dict[str, int] = {}
    for u in units:
        counts[u.stage] = counts.get(u.stage, 0) + 1
    return {s: max(0, n - min_per_stage) for s, n in counts.items()}


def _stage_table(sizes: list[int], costs: list[float], limit: int, nbins: int
                 ) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """0/1 knapsack over one stage: min importance for each exact saving bin using at most
    `limit` items, and the items (indices) reaching it."""
    cost = np.full((limit + 1, nbins), np.inf)
    cost[0, 0] = 0.0
    keep = np.zeros((len(sizes), limit + 1, nbins), dtype=bool)
    for i, (size, importance) in enumerate(zip(sizes, costs, strict=True)):
        for k in range(limit - 1, -1, -1):
            candidate = cost[k, : nbins - size] + importance
            better = candidate < cost[k + 1, size:]
            cost[k + 1, size:][better] = candidate[better]
            keep[i, k + 1, size:][better] = True
    best_k = np.argmin(cost, axis=0)
    table = cost[best_k, np.arange(nbins)]
    members: list[tuple[int, ...]] = []
    for b in range(nbins):
        if not np.isfinite(table[b]):
            members.append(())
            continue
        k, bin_, taken = int(best_k[b]), b, []
        for i in range(len(sizes) - 1, -1, -1):
            if k > 0 and keep[i, k, bin_]:
                taken.append(i)
                bin_ -= sizes[i]
                k -= 1
        members.append(tuple(taken))
    return table, members


def choose_units(units: Sequence[Unit], importance: dict[str, float], savings_ms: dict[str, float],
                 required_ms: float, min_per_stage: int = 1) -> Choice | None:
    """The removal set of least total importance whose predicted saving >= `required_ms`.

    Among sets of (nearly) equal importance the one saving least is preferred:
    keep as much of the model as the target allows. None if no allowed set
    saves enough.
    """
    if required_ms <= 0:
        return Choice((), 0.0, 0.0)
    gains = {u.name: max(savings_ms[u.name], 0.0) for u in units}
    total = sum(gains.values())
    if total <= 0:
        return None
    size = total / BINS
    nbins = BINS + len(units) + 1  # rounding each saving to a bin can exceed BINS in sum
    need = int(np.ceil(required_ms / size - 1e-9))
    combined = np.full(nbins, np.inf)
    combined[0] = 0.0
    origins: list[tuple[list[Unit], np.ndarray, list[tuple[int, ...]]]] = []
    for stage, limit in removable_limits(units, min_per_stage).items():
        members = [u for u in units if u.stage == stage]
        sizes = [int(round(gains[u.name] / size)) for u in members]
        table, picks = _stage_table(sizes, [importance[u.name] for u in members], limit, nbins)
        merged = np.full(nbins, np.inf)
        origin = np.zeros(nbins, dtype=int)
        for b2 in np.flatnonzero(np.isfinite(table)):
            candidate = combined[: nbins - b2] + table[b2]
            better = candidate < merged[b2:]
            merged[b2:][better] = candidate[better]
            origin[b2:][better] = b2
        combined = merged
        origins.append((members, origin, picks))
    feasible = [b for b in range(min(need, nbins), nbins) if np.isfinite(combined[b])]
    if not feasible:
        return None
    scale = max((abs(v) for v in importance.values()), default=1.0) or 1.0
    best = min(feasible, key=lambda b: (combined[b] + 1e-6 * scale * b / BINS, b))
    chosen: set[str] = set()
    b = best
    for members, origin, picks in reversed(origins):
        b2 = int(origin[b])
        chosen.update(members[i].name for i in picks[b2])
        b -= b2
    removed = tuple(u.name for u in units if u.name in chosen)
    return Choice(removed, sum(importance[n] for n in removed), sum(savings_ms[n] for n in removed))


def most_removable(units: Sequence[Unit], min_per_stage: int, savings_ms: dict[str, float] | None = None
                   ) -> list[Unit]:
    """The largest allowed removal: per stage, the units saving most (or the last ones)."""
    limits = removable_limits(units, min_per_stage)
    chosen: list[Unit] = []
    for stage, limit in limits.items():
        members = [u for u in units if u.stage == stage]
        if savings_ms is not None:
            members.sort(key=lambda u: -savings_ms[u.name])
        else:
            members = members[::-1]
        chosen += members[:limit]
    return sorted(chosen, key=lambda u: u.order)
