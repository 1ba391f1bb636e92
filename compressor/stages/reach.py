"""Stage `reach`: the unpruned model against the most that may be removed, timed interleaved.

Run first, so an unreachable target is refused before anything is scored; the
baseline artifact it exports is the one every candidate is timed against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from compressor.errors import UnreachableTargetError
from compressor.graph.surgery import remove_units
from compressor.latency.deploy import Deployment
from compressor.latency.table import LatencyTable
from compressor.latency.timing import TimingPolicy
from compressor.search.knapsack import most_removable
from compressor.search.target import Measured, Target, margin_from
from compressor.stages.plan import Plan
from compressor.stages.state import RunState


def timed_pair(deployment: Deployment, base: Path, candidate: Path, policy: TimingPolicy) -> Measured:
    """Baseline and candidate artifacts timed in interleaved rounds."""
    result = deployment.time([base, candidate], policy)
    return Measured(result.stats[0].median, result.stats[1].median, result.speedup_spread(),
                    result.stats[1].noisy)


@dataclass
class Reach:
    """The baseline artifact, the most-pruned model's measurement and the search's margin."""

    baseline_path: Path
    floor_units: list[str]  # the most that may be removed
    floor: Measured
    margin: float  # how far under the target the search aims (from the measured spread)
    reaches: bool = True  # whether removal alone (fp32) can meet the target
    margin_sets: int = 0  # the latency table's timed sets whose spreads the margin also comes from

    def unreachable(self, target: Target, profile: str) -> str:
        """Why removal alone cannot meet `target`: the fastest reachable latency."""
        floor = self.floor
        return (f"target {target.describe()} is unreachable on {profile}: the fastest reachable latency is "
                f"{floor.candidate_ms:.3f} ms ({floor.speedup:.2f}x; unpruned {floor.baseline_ms:.3f} ms)")


def check_reachable(plan: Plan, target: Target, min_per_stage: int, work: Path,
                    log: Callable[[str], None], state: RunState, int8_may_help: bool = False) -> Reach:
    """Export and time the unpruned and the most-pruned models; UnreachableTargetError if even
    the most-pruned one misses the target (the message gives the fastest reachable latency), unless
    `int8_may_help` (--precision auto or int8): then the INT8 stage decides, with `reaches` False.
    A resumed run reuses the saved measurement (the baseline is exported again: it is deterministic)."""
    deployment, suffix = plan.deployment, plan.deployment.exporter.suffix
    baseline_path = deployment.export(plan.model, work / f"baseline{suffix}")
    floor_units = most_removable(plan.candidates, min_per_stage)
    saved = state.load("reach")
    if saved is not None:
        floor = Measured(**saved["floor"])
        state.note_reused("reachability (baseline and most-pruned model, measured)")
    else:
        floor_model = remove_units(plan.model, floor_units, plan.example)
        floor_path = deployment.export(floor_model, work / f"floor{suffix}")
        floor = timed_pair(deployment, baseline_path, floor_path, deployment.profile.search_policy)
        state.save("reach", {"floor": asdict(floor)})
    log(f"baseline {floor.baseline_ms:.3f} ms; fastest reachable {floor.candidate_ms:.3f} ms "
        f"({floor.speedup:.2f}x) with {min_per_stage} block(s) kept per stage")
    reach = Reach(baseline_path, [u.name for u in floor_units], floor, margin_from(floor.spread),
                  floor.candidate_ms <= target.goal_ms(floor.baseline_ms))
    if not reach.reaches and not int8_may_help:
        raise UnreachableTargetError(reach.unreachable(target, deployment.profile.name))
    if not reach.reaches:
        log(f"removal alone cannot meet {target.describe()} here ({floor.speedup:.2f}x at most); "
            "INT8 with removal may")
    return reach


def settled_margin(reach: Reach, table: LatencyTable, log: Callable[[str], None]) -> Reach:
    """`reach` with its margin from the median per-round spread of the floor measurement and of every set
    the latency table timed, where the table has any (a version-1 table has none: the floor's alone).

    The spread of one measurement is itself noisy: two EfficientNet-Lite0 runs minutes apart on one machine
    read 6% and 2% at their floors, aimed 3% and 1% under the target, and delivered different sets. A
    table times tens of sets on the same device under the same policy; their median spread varies less."""
    spreads = table.round_spreads()
    if not spreads:
        return reach
    margin = margin_from(float(np.median([reach.floor.spread, *spreads])))
    log(f"margin {margin:.1%}: half the median per-round spread of the floor measurement and the table's "
        f"{len(spreads)} timed sets (the floor's alone: {margin_from(reach.floor.spread):.1%})")
    return replace(reach, margin=margin, margin_sets=len(spreads))
