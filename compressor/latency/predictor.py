"""Calibrating a latency table's predictions on measured candidates (torch-free).

A table predicts a removal set's saving as the sum of its single-unit savings
(ms). On this machine that sum is biased, by an amount and in a direction that
change between runs and runtimes (resnet20, 2-core machine under load: the
most removable set saved 0.77x to 2.6x the table's sum). Predictions are
therefore made on the *fraction of the baseline latency saved* and corrected
with a fit on candidates whose latency was measured against the baseline in
interleaved rounds:

    saved fraction = scale * (sum of savings / table baseline) + per_unit * k

where k is the number of units removed. Kinds of fit:

- ``none``: scale 1, per_unit 0 (the raw sum, moved to a measured baseline);
- ``scale``: per_unit 0, scale by least squares through the origin (one
  measured candidate gives scale = measured / predicted fraction: what
  compressor.targets.search_under_target does);
- ``offset``: scale 1, per_unit by least squares (a constant error per removed
  unit, e.g. from the common baseline median every table saving is taken from);
- ``affine``: both, by least squares; needs two candidates that differ in
  (fraction, k) direction, otherwise it falls back to ``scale``;
- ``count``: scale 0, per_unit by least squares: ignores the table (every
  removal saves the same). A null model: where it predicts as well as the
  table, the table's per-unit differences are measurement noise.

`pooled` is a second, independent correction: each unit's saving replaced by
the mean over units of identical structure (same stage, kind and size), whose
true savings are equal, so the table's noise shrinks.

Latencies are in milliseconds, fractions are of the unpruned model's latency.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from compressor.errors import InputError

KINDS = ("none", "scale", "offset", "affine", "count")
WITHIN = 0.10  # the share of predictions within this relative error is reported (docs/measurement.md)


class SavingsTable(Protocol):
    """What a prediction needs from compressor.latency.LatencyTable (ms)."""

    baseline_ms: float
    savings_ms: dict[str, float]


@dataclass(frozen=True)
class Savings:
    """A plain SavingsTable: baseline latency and per-unit savings (ms)."""

    baseline_ms: float
    savings_ms: dict[str, float] = field(default_factory=dict)


def pooled(table: SavingsTable, groups: Mapping[str, Hashable]) -> Savings:
    """`table` with each unit's saving replaced by the mean over its group (ms); `groups` maps a
    unit name to a key shared by units of identical structure. Units without a group keep theirs."""
    members: dict[Hashable, list[str]] = {}
    for name in table.savings_ms:
        if name in groups:
            members.setdefault(groups[name], []).append(name)
    savings = dict(table.savings_ms)
    for names in members.values():
        mean = sum(table.savings_ms[n] for n in names) / len(names)
        savings.update(dict.fromkeys(names, mean))
    return Savings(table.baseline_ms, savings)


@dataclass(frozen=True)
class Observation:
    """One measured candidate, in fractions of the baseline latency.

    predicted_fraction: the table's sum of savings / the table's baseline;
    measured_fraction: 1 - candidate median / baseline median from one
    interleaved measurement; removed: how many units the candidate lacks.
    """

    predicted_fraction: float
    measured_fraction: float
    removed: int

    @classmethod
    def measured(cls, table: SavingsTable, removed: Sequence[str], baseline_ms: float,
                 candidate_ms: float) -> Observation:
        """From a table, a removal set and its measured latency and baseline (ms)."""
        return cls(predicted_fraction(table, removed), 1.0 - candidate_ms / baseline_ms, len(removed))


def predicted_fraction(table: SavingsTable, removed: Sequence[str]) -> float:
    """The table's predicted saving for `removed` as a fraction of its own baseline."""
    return sum(table.savings_ms[u] for u in removed) / table.baseline_ms


@dataclass(frozen=True)
class Calibration:
    """Saved fraction = scale * predicted fraction + per_unit * units removed; `n` candidates fitted."""

    kind: str = "none"
    scale: float = 1.0
    per_unit: float = 0.0
    n: int = 0

    def saved_fraction(self, predicted: float, removed: int) -> float:
        """Corrected fraction of the baseline latency saved."""
        return self.scale * predicted + self.per_unit * removed

    def predict_fraction(self, obs: Observation) -> float:
        """Predicted latency of `obs` as a fraction of its measured baseline."""
        return 1.0 - self.saved_fraction(obs.predicted_fraction, obs.removed)

    def predict_ms(self, table: SavingsTable, removed: Sequence[str], baseline_ms: float | None = None) -> float:
        """Predicted latency (ms) with `removed` gone, in the frame of a measured `baseline_ms`
        (default: the table's own baseline)."""
        base = table.baseline_ms if baseline_ms is None else baseline_ms
        return base * (1.0 - self.saved_fraction(predicted_fraction(table, removed), len(removed)))

    def required_saving_ms(self, table: SavingsTable, fraction: float, removed: int) -> float:
        """The table-frame sum of savings (ms) whose corrected saving is `fraction` with `removed` units:
        what to ask a knapsack over the raw table for."""
        if not self.scale > 0:
            msg = f"a {self.kind} calibration with scale {self.scale} does not rank by the table"
            raise InputError(msg)
        return table.baseline_ms * (fraction - self.per_unit * removed) / self.scale

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scale": self.scale, "per_unit": self.per_unit, "n": self.n}


def fit_calibration(observations: Sequence[Observation], kind: str = "scale") -> Calibration:
    """Least-squares fit of `kind` (see the module docstring) on measured candidates.

    No usable observation gives the identity; `affine` on fewer than two
    independent observations falls back to `scale`.
    """
    if kind not in KINDS:
        msg = f"unknown calibration kind {kind!r}; known: {', '.join(KINDS)}"
        raise InputError(msg)
    if kind == "none":
        return Calibration()
    obs = [o for o in observations if o.removed > 0]
    n = len(obs)
    if not obs:
        return Calibration(kind)
    p = np.array([o.predicted_fraction for o in obs])
    m = np.array([o.measured_fraction for o in obs])
    k = np.array([o.removed for o in obs], dtype=float)
    if kind == "affine":
        design = np.column_stack([p, k])
        if n >= 2 and np.linalg.matrix_rank(design, tol=1e-9 * float(np.abs(design).max())) == 2:
            (scale, per_unit), *_ = np.linalg.lstsq(design, m, rcond=None)
            return Calibration("affine", float(scale), float(per_unit), n)
        kind = "scale"
    if kind == "scale":
        denominator = float(p @ p)
        scale = float(p @ m) / denominator if denominator > 0 else 1.0
        return Calibration("scale", scale, 0.0, n)
    if kind == "count":
        return Calibration("count", 0.0, float(k @ m) / float(k @ k), n)
    return Calibration("offset", 1.0, float(k @ (m - p)) / float(k @ k), n)


def prediction_errors(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    """Relative errors of predicted against measured latencies (any one unit, e.g. ms).

    mape: mean |p - m| / m; within_10pct: share with |p - m| / m <= 10%;
    bias: mean signed (p - m) / m (positive: predicted slower than measured);
    max: the largest |p - m| / m; n: how many.
    """
    p = np.asarray(predicted, dtype=float)
    m = np.asarray(measured, dtype=float)
    if p.shape != m.shape:
        msg = f"{len(p)} predictions for {len(m)} measurements"
        raise InputError(msg)
    if not len(m):
        return {"mape": None, "within_10pct": None, "bias": None, "max": None, "n": 0}
    rel = (p - m) / m
    return {"mape": float(np.mean(np.abs(rel))), "within_10pct": float(np.mean(np.abs(rel) <= WITHIN + 1e-12)),
            "bias": float(np.mean(rel)), "max": float(np.max(np.abs(rel))), "n": int(len(m))}


def _errors_of(fits: Sequence[tuple[Calibration, Observation]]) -> dict:
    """Errors of each calibration's prediction of its observation, on latency / baseline."""
    return prediction_errors([c.predict_fraction(o) for c, o in fits], [1.0 - o.measured_fraction for _, o in fits])


def errors_fitted_on(train: Sequence[Observation], test: Sequence[Observation], kind: str) -> dict:
    """Fit `kind` on `train` once and score it on `test`."""
    cal = fit_calibration(train, kind)
    return {**_errors_of([(cal, o) for o in test]), "calibration": cal.to_dict()}


def leave_one_out(test: Sequence[Observation], kind: str, always: Sequence[Observation] = ()) -> dict:
    """Each of `test` predicted by a fit on all the others plus `always` (e.g. the floor candidate)."""
    fits = [(fit_calibration([*always, *test[:i], *test[i + 1:]], kind), o) for i, o in enumerate(test)]
    out = _errors_of(fits)
    out["scale"] = _spread([c.scale for c, _ in fits])
    out["per_unit"] = _spread([c.per_unit for c, _ in fits])
    return out


def anchor_plus_one(test: Sequence[Observation], kind: str, anchor: Sequence[Observation]) -> dict:
    """Every ordered pair (i, j), i != j, of `test`: fit on `anchor` plus j, predict i.

    What the search knows after measuring the floor (`anchor`) and one candidate.
    """
    fits = [(fit_calibration([*anchor, extra], kind), o)
            for i, o in enumerate(test) for j, extra in enumerate(test) if i != j]
    return _errors_of(fits)


def _spread(values: Sequence[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())} if len(a) else {}


def compare(test: Sequence[Observation], floor: Observation | None,
            kinds: Sequence[str] = KINDS) -> dict[str, dict[str, dict]]:
    """Cross-validated errors of every kind on `test` (the floor is never scored):

    on_floor: fitted on the floor only (what prune has before its first candidate);
    floor_plus_one: fitted on the floor and one other test candidate;
    leave_one_out: fitted on the floor and all other test candidates.
    """
    anchor = [floor] if floor is not None else []
    schemes: dict[str, Callable[[str], dict]] = {
        "on_floor": lambda kind: errors_fitted_on(anchor, test, kind),
        "floor_plus_one": lambda kind: anchor_plus_one(test, kind, anchor),
        "leave_one_out": lambda kind: leave_one_out(test, kind, anchor),
    }
    return {name: {kind: scheme(kind) for kind in kinds} for name, scheme in schemes.items()}


def summarise(results: Mapping[str, Mapping[str, dict]]) -> str:
    """One line per (scheme, kind): MAPE, share within 10%, bias."""
    lines = []
    for scheme, by_kind in results.items():
        for kind, e in by_kind.items():
            if e.get("n"):
                lines.append(f"{scheme:>15} {kind:>7}: MAPE {e['mape']:.1%}, within 10% {e['within_10pct']:.0%}, "
                             f"bias {e['bias']:+.1%} (n={e['n']})")
    return "\n".join(lines)
