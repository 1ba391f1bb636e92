"""Choose units to remove: least importance lost with predicted saving >= required.

An exact knapsack over discretised savings (dynamic programming), with a
per-stage floor on surviving blocks. Any unit kind with an importance and a
measured saving fits; the units of one block (remove it, merge it) are
alternatives, of which at most one is taken. The search asks for the best set
it has not measured yet, saving less than a set that overshot: choose_units
takes the sets to leave out and an upper bound on the saving, and stays exact.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from compressor.graph.units import Unit

BINS = 1000


@dataclass(frozen=True)
class Choice:
    removed: tuple[str, ...]
    importance_lost: float
    predicted_saving_ms: float


# what the search asks for: propose(required_ms, below=None, exclude=()), a set saving at least `required_ms`
# by the table and, given the set `below` (one that overshot), less than it, none of the sets in `exclude`
# (those already measured); choose_units is one, greedy.greedy_proposer another
Proposer = Callable[..., "Choice | None"]


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
                 required_ms: float, min_per_stage: int = 1, below: Collection[str] | None = None,
                 exclude: Collection[Collection[str]] = ()) -> Choice | None:
    """The removal set of least total importance whose predicted saving >= `required_ms` and, given a set
    `below`, < that set's saving, other than the sets in `exclude` (those the search already measured).

    Among sets of (nearly) equal importance the one saving least is preferred:
    keep as much of the model as the target allows. None if no allowed set
    saves enough. Savings are compared in bins of 1/BINS of the total saving
    (`below` too: a set saving less than it by the bins).

    An importance below zero is taken as zero: removing a unit loses nothing at best, and a negative
    score is the criterion's noise (1 - CKA of nearly identical features, as on a ConvNeXt whose layer
    scale starts at 1e-6). Taken as it is, every such unit would lower a set's cost, and the optimum
    would remove as many of them as the stage floors allow, far past the target.
    """
    importance = {n: max(v, 0.0) for n, v in importance.items()}
    excluded = {frozenset(s) for s in exclude}
    if required_ms <= 0 and frozenset() not in excluded:
        return Choice((), 0.0, 0.0)
    gains = {u.name: max(savings_ms[u.name], 0.0) for u in units}
    total = sum(gains.values())
    if total <= 0:
        return None
    size = total / BINS
    bins = {n: int(round(g / size)) for n, g in gains.items()}
    most = None if below is None else sum(bins[n] for n in below) - 1
    problem = _Problem(list(units), importance, bins, max(0, int(np.ceil(required_ms / size - 1e-9))), most,
                       removable_limits(units, min_per_stage))
    names = _best_untried(problem, excluded)
    if names is None:
        return None
    removed = tuple(u.name for u in units if u.name in names)
    return Choice(removed, sum(importance[n] for n in removed), sum(savings_ms[n] for n in removed))


@dataclass
class _Problem:
    """The knapsack in bins: each unit's saving, the least and most total saving allowed, the stage limits."""

    units: list[Unit]
    importance: dict[str, float]
    bins: dict[str, int]
    need: int
    most: int | None  # None: no upper bound
    limits: dict[str, int]

    def __post_init__(self) -> None:
        self.nbins = sum(self.bins.values()) + 1
        self.scale = max((abs(v) for v in self.importance.values()), default=1.0) or 1.0

    def cost(self, importance: float, b: int) -> tuple[float, int]:
        """Least importance first; among (nearly) equal, the set saving least (`b` bins)."""
        return importance + 1e-6 * self.scale * b / BINS, b

    def key(self, names: Collection[str]) -> tuple[float, int]:
        return self.cost(sum(self.importance[n] for n in names), sum(self.bins[n] for n in names))


def _optimum(problem: _Problem, taken: Sequence[Unit], left_out: Collection[str]) -> frozenset[str] | None:
    """The best set that contains every unit of `taken` and none named in `left_out` (None: no such set)."""
    limits = dict(problem.limits)
    for u in taken:
        if u.removes_block:
            limits[u.stage] = limits.get(u.stage, 0) - 1
    paths = [u.path for u in taken]
    if any(v < 0 for v in limits.values()) or len(paths) != len(set(paths)):
        return None
    fixed = sum(problem.bins[u.name] for u in taken)
    free = [u for u in problem.units if u.name not in left_out and u.path not in paths]
    nbins = problem.nbins
    combined = np.full(nbins, np.inf)
    combined[0] = 0.0
    origins: list[tuple[list[list[Unit]], np.ndarray, list[tuple[tuple[int, int], ...]]]] = []
    for stage in dict.fromkeys(u.stage for u in free):
        blocks: dict[str, list[Unit]] = {}
        for u in free:
            if u.stage == stage:
                blocks.setdefault(u.path, []).append(u)
        members = list(blocks.values())
        groups = [[(problem.bins[u.name], problem.importance[u.name], int(u.removes_block)) for u in options]
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
    top = nbins - 1 if problem.most is None else min(nbins - 1, problem.most - fixed)
    feasible = [b for b in range(max(0, problem.need - fixed), top + 1) if np.isfinite(combined[b])]
    if not feasible:
        return None
    taken_importance = sum(problem.importance[u.name] for u in taken)
    b = min(feasible, key=lambda b: problem.cost(combined[b] + taken_importance, b + fixed))
    chosen = {u.name for u in taken}
    for members, origin, picks in reversed(origins):
        b2 = int(origin[b])
        chosen.update(members[g][o].name for g, o in picks[b2])
        b -= b2
    return frozenset(chosen)


def _best_untried(problem: _Problem, excluded: set[frozenset[str]]) -> frozenset[str] | None:
    """The optimum of `problem` that is not in `excluded`, exactly, by Lawler's partition: the sets other
    than an excluded optimum S, with the units in a fixed order u1..un, fall into the parts "agrees with S
    on u1..u(k-1), differs on uk" (k = 1..n); each part is one knapsack with units forced in or left out,
    and the parts are searched best first. Each excluded set is met at most once, so at most
    1 + len(excluded) x n knapsacks are solved."""
    order = itertools.count()  # ties in cost pop in the order found
    first = _optimum(problem, (), ())
    queue = [] if first is None else [(problem.key(first), next(order), first, (), ())]
    while queue:
        _, _, names, taken, left_out = heapq.heappop(queue)
        if names not in excluded:
            return names
        fixed = {u.name for u in taken} | set(left_out)
        agree_in, agree_out = list(taken), list(left_out)  # u1..u(k-1) as in `names`
        for u in problem.units:
            if u.name in fixed:
                continue
            part_in, part_out = (agree_in, [*agree_out, u.name]) if u.name in names else ([*agree_in, u], agree_out)
            best = _optimum(problem, part_in, part_out)
            if best is not None:
                heapq.heappush(queue, (problem.key(best), next(order), best, tuple(part_in), tuple(part_out)))
            if u.name in names:
                agree_in.append(u)
            else:
                agree_out.append(u.name)
    return None


def most_removable(units: Sequence[Unit], min_per_stage: int, savings_ms: dict[str, float] | None = None
                   ) -> list[Unit]:
    """The largest allowed removal: per stage, the units saving most (or the last ones); and every block left
    with a width unit, at its level saving most (or keeping fewest channels)."""
    limits = removable_limits(units, min_per_stage)
    chosen: list[Unit] = []
    for stage, limit in limits.items():
        members = [u for u in units if u.stage == stage and u.removes_block]
        if savings_ms is not None:
            members.sort(key=lambda u: -savings_ms[u.name])
        else:
            members = members[::-1]
        chosen += members[:limit]
    return sorted(chosen + _slimmest(units, {u.path for u in chosen}, savings_ms), key=lambda u: u.order)


def _slimmest(units: Sequence[Unit], taken: set[str], savings_ms: dict[str, float] | None) -> list[Unit]:
    """Per block not in `taken`, its width unit saving most (or keeping the fewest channels)."""
    best: dict[str, Unit] = {}
    for u in units:
        if u.kind != "width" or u.path in taken:
            continue
        key = (lambda v: savings_ms[v.name]) if savings_ms is not None else (lambda v: -sum(v.slim.kept))
        if u.path not in best or key(u) > key(best[u.path]):
            best[u.path] = u
    return list(best.values())
