"""The measured search loop: choose by the lookup table, measure, recalibrate, repeat.

The table only ranks candidates; every decision is taken on measured latency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from compressor.graph.units import Unit
from compressor.search.knapsack import Choice, choose_units, most_removable
from compressor.search.target import MIN_MARGIN, OVERSHOOT_BAND, Measured, Target, meets, required_fraction


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


def search_under_target(units: Sequence[Unit], importance: dict[str, float], savings_ms: dict[str, float],
                        table_baseline_ms: float, target: Target,
                        measure: Callable[[tuple[str, ...]], Measured], margin: float,
                        calibration: tuple[float, Measured] | None = None,
                        min_per_stage: int = 1, max_trials: int = 8,
                        choose: Callable[[float], Choice | None] | None = None) -> SearchResult:
    """Choose by the table, measure, recalibrate the table, repeat.

    Sums of single-unit savings are biased (on this machine removing one
    block saves more than its share), so the table's predicted fraction of
    latency saved is scaled by c = measured / predicted fraction, taken from
    the last measured candidate (first: `calibration`, a predicted saving in ms
    with its measurement). Keeps the passing candidate with the least
    importance lost and refines a pass whose latency is more than
    OVERSHOOT_BAND under the aimed one, so no more of the model is removed
    than the target needs.

    `choose(required_ms)` proposes a set saving at least `required_ms` by the table; the default is
    the knapsack over `importance` (search.choose_units), another greedy.greedy_proposer.

    No request exceeds the most the table can remove: on a loaded machine single-unit savings can be
    noise around zero, and a request past them would end the loop before the sets that remove the most
    were measured (first request or after a failed candidate alike).
    """
    if choose is None:
        def choose(required_ms: float) -> Choice | None:
            return choose_units(units, importance, savings_ms, required_ms, min_per_stage)

    result = SearchResult(None, margin=margin)
    scale = 1.0
    if calibration is not None:
        predicted, m = calibration
        if predicted > 0:
            scale = max(0.2, (1 - m.candidate_ms / m.baseline_ms) / (predicted / table_baseline_ms))
    baseline_ms = calibration[1].baseline_ms if calibration else table_baseline_ms
    low, high = 0.0, float("inf")  # required savings (ms, table frame) known to fail / to pass
    most = most_removable(units, min_per_stage, savings_ms)
    ceiling = 0.95 * sum(max(savings_ms[u.name], 0.0) for u in most)  # 5% below: the knapsack rounds to bins
    required = min(ceiling, table_baseline_ms * required_fraction(target, baseline_ms, margin) / scale)
    seen: dict[tuple[str, ...], bool] = {}  # measured sets -> passed
    for _ in range(20 * max_trials):  # choices that repeat a measured set cost no trial
        if len(result.trials) >= max_trials:
            break
        choice = choose(required)
        if choice is None:
            if required > low:
                low = required
            if high == float("inf"):
                break
            required = (low + high) / 2
            continue
        if choice.removed in seen:
            if seen[choice.removed] or required >= high:
                break
            required += 0.01 * table_baseline_ms  # a failed set again: ask for a little more
            continue
        m = measure(choice.removed)
        trial = Trial(choice, table_baseline_ms - choice.predicted_saving_ms, m, meets(target, m, margin))
        result.trials.append(trial)
        seen[choice.removed] = trial.passed
        need = required_fraction(target, m.baseline_ms, margin)
        got = 1 - m.candidate_ms / m.baseline_ms
        if trial.passed:
            high = min(high, required)
            if result.best is None or choice.importance_lost < result.best.choice.importance_lost:
                result.best = trial
            aimed_ms = m.baseline_ms * (1 - need)
            if m.candidate_ms >= aimed_ms * (1 - OVERSHOOT_BAND):
                break
        else:
            low = max(low, required)
        if choice.predicted_saving_ms > 0 and got > 0:
            scale = max(0.2, got / (choice.predicted_saving_ms / table_baseline_ms))
        proposal = table_baseline_ms * need / scale
        if not low < proposal < high:
            proposal = (low + high) / 2 if high < float("inf") else max(proposal, low * 1.05)
        if proposal > ceiling:  # past the most the table can remove: ask for that once, then stop
            if low >= ceiling:
                break
            proposal = ceiling
        required = proposal
    return result
