"""Latency targets and the measured search loop that meets them.

The lookup table only ranks candidates; every decision is taken on measured
latency: a `--target-speedup` on interleaved rounds of baseline and candidate,
a `--target-ms` on the candidate's protocol median (MEASURE.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from compressor.errors import InputError
from compressor.search import Choice, choose_units
from compressor.units import Unit

MIN_MARGIN, MAX_MARGIN = 0.01, 0.05
OVERSHOOT_BAND = 0.04  # a passing candidate faster than target by more than this is refined


@dataclass(frozen=True)
class Target:
    """Either a latency in ms or a speedup over the unpruned model."""

    ms: float | None = None
    speedup: float | None = None

    def __post_init__(self) -> None:
        if (self.ms is None) == (self.speedup is None):
            msg = "give exactly one of --target-ms and --target-speedup"
            raise InputError(msg)
        if self.ms is not None and not self.ms > 0:
            msg = f"--target-ms must be a positive number of milliseconds, got {self.ms}"
            raise InputError(msg)
        if self.speedup is not None and not self.speedup > 1:
            msg = f"--target-speedup must be greater than 1, got {self.speedup}"
            raise InputError(msg)

    def describe(self) -> str:
        return f"{self.ms} ms" if self.ms is not None else f"{self.speedup}x speedup"

    def goal_ms(self, baseline_ms: float) -> float:
        """The candidate latency (ms) that meets the target, in the frame of `baseline_ms`."""
        return self.ms if self.ms is not None else baseline_ms / self.speedup


@dataclass
class Measured:
    """One candidate measured against the baseline in interleaved rounds (ms)."""

    baseline_ms: float
    candidate_ms: float
    spread: float  # IQR/median of the per-round speedups
    noisy: bool = False

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.candidate_ms


@dataclass
class Trial:
    choice: Choice
    predicted_ms: float
    measured: Measured
    passed: bool


@dataclass
class SearchResult:
    best: Trial | None
    trials: list[Trial] = field(default_factory=list)
    margin: float = MIN_MARGIN


def margin_from(spread: float) -> float:
    """Aim under the target by half the per-round spread, within [1%, 5%]."""
    return min(MAX_MARGIN, max(MIN_MARGIN, spread / 2))


def meets(target: Target, m: Measured, margin: float) -> bool:
    if target.speedup is not None:
        return m.speedup >= target.speedup * (1 + margin)
    return m.candidate_ms <= target.ms * (1 - margin)


def search_under_target(units: Sequence[Unit], importance: dict[str, float], savings_ms: dict[str, float],
                        table_baseline_ms: float, target: Target,
                        measure: Callable[[tuple[str, ...]], Measured], margin: float,
                        min_per_stage: int = 1, max_trials: int = 8) -> SearchResult:
    """Choose by the table, measure, correct the required saving by the measured gap, repeat.

    Keeps the passing candidate with the least importance lost; refines a pass
    that overshoots by more than OVERSHOOT_BAND, so no more model is removed
    than the target needs.
    """
    result = SearchResult(None, margin=margin)
    goal = target.goal_ms(table_baseline_ms) * (1 - margin)
    required = table_baseline_ms - goal
    low, high = 0.0, float("inf")  # required savings known to fail / to pass
    seen: dict[tuple[str, ...], Trial] = {}
    for _ in range(max_trials):
        choice = choose_units(units, importance, savings_ms, required, min_per_stage)
        if choice is None:
            break
        if choice.removed in seen:
            trial = seen[choice.removed]
        else:
            measured = measure(choice.removed)
            trial = Trial(choice, table_baseline_ms - choice.predicted_saving_ms, measured,
                          meets(target, measured, margin))
            seen[choice.removed] = trial
            result.trials.append(trial)
        m = trial.measured
        if trial.passed:
            high = min(high, required)
            if result.best is None or choice.importance_lost < result.best.choice.importance_lost:
                result.best = trial
        else:
            low = max(low, required)
        # the measured gap, in the table's frame of milliseconds
        goal_measured = target.goal_ms(m.baseline_ms) * (1 - margin)
        gap = (m.candidate_ms - goal_measured) * table_baseline_ms / m.baseline_ms
        overshoot = trial.passed and gap < -OVERSHOOT_BAND * goal
        if trial.passed and not overshoot:
            break
        proposal = required + gap
        if not low < proposal < high:
            proposal = (low + high) / 2 if high < float("inf") else required + abs(gap) + 0.01 * goal
        if abs(proposal - required) < 1e-4 * table_baseline_ms:
            break
        required = proposal
    return result
