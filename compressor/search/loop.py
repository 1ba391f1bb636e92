"""The measured search loop: choose by the lookup table, measure, recalibrate, repeat.

The table only ranks candidates; every decision is taken on measured latency.
No set is measured twice: every proposal excludes the sets already measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from compressor.graph.units import Unit
from compressor.search.knapsack import Choice, Proposer, choose_units, most_removable
from compressor.search.target import MIN_MARGIN, OVERSHOOT_BAND, Measured, Target, meets, required_fraction


@dataclass
class Trial:
    choice: Choice
    predicted_ms: float
    measured: Measured
    passed: bool
    overshot: bool = False  # passed, more than OVERSHOOT_BAND under the latency aimed at


@dataclass
class SearchResult:
    best: Trial | None
    trials: list[Trial] = field(default_factory=list)
    margin: float = MIN_MARGIN
    ended: str = ""  # why the search stopped, in one sentence


def _scale(choice: Choice, m: Measured, table_baseline_ms: float, scale: float) -> float:
    """The table's bias c = measured / predicted fraction of latency saved, from one measured set."""
    got = 1 - m.candidate_ms / m.baseline_ms
    if m.refused or choice.predicted_saving_ms <= 0 or got <= 0:
        return scale
    return max(0.2, got / (choice.predicted_saving_ms / table_baseline_ms))


def _nothing_left(result: SearchResult, closest: Trial | None, low: float) -> str:
    """Why no set was left to propose, in one sentence (`closest`: the pass that overshot saving least)."""
    predicted = "predicted by the table (recalibrated on the measurements) to meet the target"
    if closest is not None:
        missed = f", saves more than the {low:.3f} ms (by the table) of a set that missed" if low > 0 else ""
        return (f"no set not yet measured removes less than the passing one that measured "
                f"{closest.measured.speedup:.2f}x{missed} and is {predicted}")
    if result.trials:
        return f"no set not yet measured is {predicted}"
    return "no allowed set saves enough by the table"


def search_under_target(units: Sequence[Unit], importance: dict[str, float], savings_ms: dict[str, float],
                        table_baseline_ms: float, target: Target,
                        measure: Callable[[tuple[str, ...]], Measured], margin: float,
                        calibration: tuple[float, Measured] | None = None,
                        min_per_stage: int = 1, max_trials: int = 8,
                        choose: Proposer | None = None) -> SearchResult:
    """Choose by the table, measure, recalibrate the table, repeat; never propose a set already measured.

    Sums of single-unit savings are biased (on this machine removing one
    block saves more than its share), so the table's predicted fraction of
    latency saved is scaled by c = measured / predicted fraction, taken from
    the last measured candidate (first: `calibration`, a predicted saving in ms
    with its measurement). A set that misses the target makes every later
    proposal save more than it; a pass whose latency is more than OVERSHOOT_BAND
    under the aimed one (it removed more of the model than the target needs) makes
    every later proposal save less than it: the best set not yet measured between
    the two, until a pass lands within the band, or no such set is left, or
    `max_trials` sets were measured. The result keeps the pass within the band, else
    the passing candidate with the least importance lost; `ended` says why it stopped.

    `choose(required_ms, below=, exclude=)` proposes a set; the default is the knapsack over
    `importance` (search.choose_units), another greedy.greedy_proposer.

    No request exceeds the most the table can remove: on a loaded machine single-unit savings can be
    noise around zero, and a request past them would end the loop before the sets that remove the most
    were measured (first request or after a failed candidate alike).
    """
    if choose is None:
        def choose(required_ms: float, below: Collection[str] | None = None, exclude: Collection = ()
                   ) -> Choice | None:
            return choose_units(units, importance, savings_ms, required_ms, min_per_stage, below, exclude)

    result = SearchResult(None, margin=margin)
    scale = 1.0
    if calibration is not None:
        predicted, m = calibration
        if predicted > 0:
            scale = max(0.2, (1 - m.candidate_ms / m.baseline_ms) / (predicted / table_baseline_ms))
    baseline_ms = calibration[1].baseline_ms if calibration else table_baseline_ms
    low = 0.0  # table ms: proposals save more than a set that missed
    closest: Trial | None = None  # ... and less than the pass that overshot saving least
    most = most_removable(units, min_per_stage, savings_ms)
    ceiling = 0.95 * sum(max(savings_ms[u.name], 0.0) for u in most)  # 5% below: the knapsack rounds to bins
    required = min(ceiling, table_baseline_ms * required_fraction(target, baseline_ms, margin) / scale)
    tried: set[frozenset[str]] = set()
    result.ended = f"max_trials ({max_trials}) candidates were measured"
    while len(result.trials) < max_trials:
        choice = choose(required, below=closest.choice.removed if closest else None, exclude=frozenset(tried))
        if choice is None or frozenset(choice.removed) in tried:
            result.ended = _nothing_left(result, closest, low)
            break
        m = measure(choice.removed)
        trial = Trial(choice, table_baseline_ms - choice.predicted_saving_ms, m, meets(target, m, margin))
        result.trials.append(trial)
        tried.add(frozenset(choice.removed))
        need = required_fraction(target, m.baseline_ms, margin)
        if trial.passed:
            if result.best is None or choice.importance_lost < result.best.choice.importance_lost:
                result.best = trial
            if m.candidate_ms >= m.baseline_ms * (1 - need) * (1 - OVERSHOOT_BAND):
                result.best = trial
                result.ended = f"a candidate met the target within {OVERSHOOT_BAND:.0%} of the latency aimed at"
                break
            trial.overshot = True
            if closest is None or choice.predicted_saving_ms < closest.choice.predicted_saving_ms:
                closest = trial
        elif m.refused:  # not timed (below the INT8 fidelity floor): the same request, without that set
            continue
        else:
            low = max(low, choice.predicted_saving_ms)
        scale = _scale(choice, m, table_baseline_ms, scale)
        required = min(ceiling, table_baseline_ms * need / scale)
        below = closest.choice.predicted_saving_ms if closest else math.inf
        if not low <= required < below:
            required = (low + below) / 2 if below < math.inf else max(required, low)
    return result
