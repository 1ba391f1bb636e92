"""Choose units to remove: least importance lost with predicted saving >= required.

An exact knapsack over discretised savings (dynamic programming), with a
per-stage floor on surviving blocks. Any unit kind with an importance and a
measured saving fits; the units of one block (remove it, merge it) are
alternatives, of which at most one is taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compressor.graph.units import Unit

BINS = 1000


@dataclass(frozen=True)
class Choice:
    removed: tuple[str, ...]
    importance_lost: float
    predicted_saving_ms: float


def removable_limits(units: Sequence[Unit], min_per_stage: int) -> dict[str, int]:
    """How many blocks each stage may lose so that `min_per_stage` blocks survive, counting a merged
    block, a block that lost a branch and a stage's block that is not a unit (Unit.anchored) as survivors."""
    counts: dict[str, int] = {}
    anchors: dict[str, int] = {}
    for u in units:
        if u.removes_block:
            counts[u.stage] = counts.get(u.stage, 0) + 1
            anchors[u.stage] = int(u.anchored)
    return {s: max(0, n - max(0, min_per_stage - anchors[s])) for s, n in counts.items()}


Option = tuple[int, float, int]  # (saving in bins, importance lost, 1 if it removes the block else 0)


def _stage_table(groups: list[list[Option]], limit: int, nbins: int
                 ) -> tuple[np.ndarray, list[tuple[tuple[int, int], ...]]]:
    """Multiple-choice knapsack over one stage: each block is kept or takes one of its options
    (removed, merged), with at most `limit` removals. Returns the least importance lost for each
    exact saving bin and the (block, option) picks reaching it."""
    cost = np.full((limit + 1, nbins), np.inf)
    cost[0, 0] = 0.0
    pick = np.full((len(groups), limit + 1, nbins), -1, dtype=np.int8)
    for g, options in enumerate(groups):
        new = cost.copy()
        for o, (size, importance, removes) in enumerate(options):
            for k in range(limit + 1 - removes):
                candidate = cost[k, : nbins - size] + importance
                better = candidate < new[k + removes, size:]
                new[k + removes, size:][better] = candidate[better]
                pick[g, k + removes, size:][better] = o
        cost = new
    best_k = np.argmin(cost, axis=0)
    table = cost[best_k, np.arange(nbins)]
    members: list[tuple[tuple[int, int], ...]] = []
    for b in range(nbins):
        if not np.isfinite(table[b]):
            members.append(())
            continue
        k, bin_, taken = int(best_k[b]), b, []
        for g in range(len(groups) - 1, -1, -1):
            o = int(pick[g, k, bin_])
            if o >= 0:
                taken.append((g, o))
                size, _, removes = groups[g][o]
                bin_ -= size
                k -= removes
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
    origins: list[tuple[list[list[Unit]], np.ndarray, list[tuple[tuple[int, int], ...]]]] = []
    limits = removable_limits(units, min_per_stage)
    for stage in dict.fromkeys(u.stage for u in units):
        blocks: dict[str, list[Unit]] = {}
        for u in units:
            if u.stage == stage:
                blocks.setdefault(u.path, []).append(u)
        members = list(blocks.values())
        groups = [[(int(round(gains[u.name] / size)), importance[u.name], int(u.removes_block)) for u in options]
                  for options in members]
        table, picks = _stage_table(groups, limits.get(stage, 0), nbins)
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
        chosen.update(members[g][o].name for g, o in picks[b2])
        b -= b2
    removed = tuple(u.name for u in units if u.name in chosen)
    return Choice(removed, sum(importance[n] for n in removed), sum(savings_ms[n] for n in removed))


def most_removable(units: Sequence[Unit], min_per_stage: int, savings_ms: dict[str, float] | None = None
                   ) -> list[Unit]:
    """The largest allowed removal: per stage, the units saving most (or the last ones)."""
    limits = removable_limits(units, min_per_stage)
    chosen: list[Unit] = []
    for stage, limit in limits.items():
        members = [u for u in units if u.stage == stage and u.removes_block]
        if savings_ms is not None:
            members.sort(key=lambda u: -savings_ms[u.name])
        else:
            members = members[::-1]
        chosen += members[:limit]
    return sorted(chosen, key=lambda u: u.order)
