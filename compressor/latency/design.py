"""Designed removal sets for the latency model: which sets to export and time.

A single unit's saving read as the difference of two medians is mostly noise (resnet56: 0.05 ms of
2 ms), while a set of many units saves far more than the noise. So the design is:

- each group of one unit removed alone (its coefficient then has a set of its own);
- the most removable set (what the search can reach at most);
- balanced random sets: each block taken with a probability spread over 0.15..0.95 across the sets
  (so sizes cover small to large), as one of its units where a block has several (remove, merge),
  within the per-stage limits the search keeps (search/knapsack.py `removable_limits`);
- then, while the sets the search will ask about are predicted less precisely than wanted, more
  sets chosen from random candidates to shrink those predictions' variance most (a sequential
  I-optimal design: each pick maximises the summed reduction of the query sets' variance).

All sets are tuples of unit names in graph order; every draw is seeded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from compressor.graph.units import Unit
from compressor.latency.model import LatencyModel, UnitInfo, design_matrix
from compressor.search.knapsack import most_removable, removable_limits

P_LOW, P_HIGH = 0.15, 0.95  # the spread of inclusion probabilities over a batch of random sets


def unit_infos(units: Sequence[Unit], signatures: dict[str, str]) -> list[UnitInfo]:
    """The model's view of `units`, each in the group of its structural signature and of what the unit takes
    from its block (the part of its name after "/": "attn" and "mlp" of one transformer block differ even
    where a signature describes the whole block); a width unit with timed channel counts names the unit that
    removes what it slims, where there is one, and its timed share (the fit's prior)."""
    names = {u.name for u in units}

    def info(u: Unit) -> UnitInfo:
        share = u.slim.timed_share if u.slim is not None else None
        of = u.acts_on if share is not None and u.acts_on in names else ""
        return UnitInfo(u.name, f"{signatures[u.name]}{'/' + u.name.partition('/')[2] if '/' in u.name else ''}",
                        u.stage, u.order, u.path, u.kind, of, share if of else None)

    return [info(u) for u in units]


def ordered(units: Sequence[Unit], names: set[str] | frozenset[str]) -> tuple[str, ...]:
    return tuple(u.name for u in sorted(units, key=lambda u: u.order) if u.name in names)


def random_set(units: Sequence[Unit], limits: dict[str, int], rng: random.Random, p: float) -> tuple[str, ...]:
    """Blocks in random order, each taken with probability `p` as one of its units (chosen uniformly),
    while its stage may lose another block (merges and branches do not count against a stage)."""
    blocks: dict[str, list[Unit]] = {}
    for u in units:
        blocks.setdefault(u.path, []).append(u)
    taken: dict[str, int] = {}
    chosen: set[str] = set()
    for path in rng.sample(sorted(blocks), len(blocks)):
        if rng.random() >= p:
            continue
        options = [u for u in blocks[path] if not u.removes_block or taken.get(u.stage, 0) < limits.get(u.stage, 0)]
        if not options:
            continue
        unit = rng.choice(sorted(options, key=lambda u: u.order))
        if unit.removes_block:
            taken[unit.stage] = taken.get(unit.stage, 0) + 1
        chosen.add(unit.name)
    return ordered(units, chosen)


def random_sets(units: Sequence[Unit], n: int, rng: random.Random, min_per_stage: int = 1,
                exclude: Sequence[tuple[str, ...]] = ()) -> list[tuple[str, ...]]:
    """`n` distinct non-empty random sets (none in `exclude`), inclusion probabilities spread evenly
    over P_LOW..P_HIGH."""
    limits = removable_limits(units, min_per_stage)
    seen = set(exclude) | {()}
    out: list[tuple[str, ...]] = []
    for attempt in range(200 * max(n, 1)):
        if len(out) >= n:
            break
        p = P_LOW + (P_HIGH - P_LOW) * ((len(out) + 0.5) / max(n, 1) if attempt < 20 * n else rng.random())
        s = random_set(units, limits, rng, p)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def initial_design(units: Sequence[Unit], infos: Sequence[UnitInfo], rng: random.Random,
                   min_per_stage: int = 1, n_random: int | None = None) -> list[tuple[str, ...]]:
    """Single-unit sets for groups of one, the most removable set, and `n_random` balanced random sets
    (default: one more than the number of groups, at least 4: with the others, twice as many sets as
    coefficients for a model of a few groups)."""
    members: dict[str, list[str]] = {}
    for info in infos:
        members.setdefault(info.group, []).append(info.name)
    singles = [(names[0],) for names in members.values() if len(names) == 1]
    floor = tuple(u.name for u in most_removable(units, min_per_stage))
    sets = list(dict.fromkeys([*singles, *([floor] if floor else [])]))
    n_random = max(4, len(members) + 1) if n_random is None else n_random
    return sets + random_sets(units, n_random, rng, min_per_stage, sets)


def informative_sets(model: LatencyModel, candidates: Sequence[tuple[str, ...]], queries: Sequence[tuple[str, ...]],
                     k: int, noise_sd: float) -> list[tuple[str, ...]]:
    """The `k` candidates that, measured with noise `noise_sd` (fraction), most reduce the summed variance
    of the `queries`' predictions, picked one at a time (each pick updates the covariance)."""
    cov = np.where(np.isfinite(model.cov), model.cov, 0.0)
    unknown = ~np.isfinite(np.diag(model.cov))
    cov[unknown, unknown] = 1.0  # a term never varied: as uncertain as a whole baseline
    x = design_matrix(model.terms, candidates)
    q = design_matrix(model.terms, queries)
    picks: list[tuple[str, ...]] = []
    left = list(range(len(candidates)))
    noise = max(noise_sd, 1e-6) ** 2
    for _ in range(min(k, len(candidates))):
        cx = x[left] @ cov  # (candidates, terms)
        denom = noise + np.einsum("ij,ij->i", cx, x[left])
        gain = ((q @ cx.T) ** 2).sum(axis=0) / denom
        best = left[int(np.argmax(gain))]
        picks.append(candidates[best])
        c = cov @ x[best]
        cov = cov - np.outer(c, c) / (noise + x[best] @ c)
        left.remove(best)
    return picks


def query_sd(model: LatencyModel, queries: Sequence[tuple[str, ...]]) -> float:
    """Root mean square over `queries` of sd / predicted latency: how precisely the model predicts the
    sets it will be asked about (0 with none; a set predicted at no latency counts as infinite)."""
    rel = []
    for s in queries:
        predicted = model.predict_ms(s)
        rel.append(model.sd_ms(s) / predicted if predicted > 0 else float("inf"))
    return float(np.sqrt(np.mean(np.square(rel)))) if rel else 0.0


def query_sets(sets: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The distinct non-empty sets of `sets`, in order."""
    return [s for s in dict.fromkeys(tuple(s) for s in sets) if s]
