"""Stage `choose`: the measured search for the removal set that meets the target.

Sets are proposed by the knapsack over the criterion's scores, or greedily by
the whole set's measured KL (search/greedy.py); each proposal is exported and
timed interleaved with the baseline, the table recalibrated on it, until the
least-importance set that meets the target (with the margin) is found.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compressor.data.bundle import DataBundle
from compressor.errors import UnreachableTargetError
from compressor.graph.surgery import remove_units
from compressor.graph.units import Unit
from compressor.latency.predictor import Calibration, Observation, fit_calibration
from compressor.latency.table import LatencyTable
from compressor.models.loaded import LoadedModel
from compressor.search.greedy import GreedyOrder, greedy_proposer
from compressor.search.knapsack import Choice, Proposer, choose_units
from compressor.search.loop import SearchResult, search_under_target
from compressor.search.target import Measured, Target
from compressor.search.uncertain import Z, aiming_past_uncertainty
from compressor.stages.options import PruneOptions
from compressor.stages.plan import Plan
from compressor.stages.reach import Reach, timed_pair
from compressor.stages.state import RunState

GREEDY_IMAGES = 128  # calibration images greedy selection measures each set's KL on


def selection_for(options: PruneOptions, loaded: LoadedModel) -> str:
    """The options' selection, else greedy for a model with its own (ImageNet) weights, whose every
    removal costs held-out fidelity that single-unit scores misjudge in combination, and the
    knapsack for models trained here, where it is cheaper (greedy costs U passes, then a few per step)."""
    if options.selection is None:
        return "greedy" if loaded.pretrained else "knapsack"
    return options.selection


@dataclass
class Chosen:
    """The search's outcome: the units to remove, every measured trial, how sets were proposed."""

    removed: list[Unit]
    search: SearchResult
    selection: str
    calibration: Calibration | None  # the table's calibration on the most-pruned candidate
    floor_units: list[str]  # the most-pruned candidate the calibration was measured on
    floor: Measured
    greedy: GreedyOrder | None = None
    precision: str = "fp32"  # of the artifact delivered: "fp32" or "int8"
    int8: dict | None = None  # the INT8 probe and search, where precision was a dimension (stages/precision.py)
    margin_sets: int = 0  # the latency table's timed sets the search's margin came from, beside the floor


def candidate_measurer(plan: Plan, reach: Reach, table: LatencyTable, work: Path, log: Callable[[str], None],
                       state: RunState) -> Callable[[tuple[str, ...]], Measured]:
    """measure(removed names): export the model without them and time it against the baseline; every
    measurement is saved, and a resumed run takes a saved one instead of measuring again."""
    suffix = plan.deployment.exporter.suffix
    measured = state.load("candidates") or {}

    def measure(removed: tuple[str, ...]) -> Measured:
        key = ",".join(removed)
        if key in measured:
            state.note_reused(f"the measured candidate without {len(removed)} units")
            return Measured(**measured[key])
        chosen = [u for u in plan.candidates if u.name in removed]
        path = plan.deployment.export(remove_units(plan.model, chosen, plan.example), work / f"candidate{suffix}")
        m = timed_pair(plan.deployment, reach.baseline_path, path, plan.deployment.profile.search_policy)
        scale = m.baseline_ms / table.baseline_ms  # the prediction at this measurement's baseline
        log(f"  candidate -{len(removed)} units: predicted {table.predict(removed) * scale:.3f} +- "
            f"{table.sd_new_ms(removed) * scale:.3f} ms, measured {m.candidate_ms:.3f} ms vs {m.baseline_ms:.3f} ms "
            f"({m.speedup:.2f}x)")
        measured[key] = asdict(m)
        state.save("candidates", measured)
        return m

    return measure


@dataclass
class Proposals:
    """How the search proposes sets: `selection`, and for greedy the order and its proposer (None: the
    knapsack over the criterion's scores, the search's default)."""

    selection: str
    proposer: Callable | None = None
    order: GreedyOrder | None = None


def proposals(plan: Plan, importance: dict[str, float], table: LatencyTable, data: DataBundle,
              options: PruneOptions, log: Callable[[str], None], device: torch.device | None = None) -> Proposals:
    """The proposer both precisions' searches use (greedy KL runs on `device`, default the CPU)."""
    selection = selection_for(options, plan.loaded)
    if selection != "greedy":
        return Proposals(selection)
    images = torch.cat([b[0] for b in data.loader("train", batch_size=128, limit=GREEDY_IMAGES, seed=options.seed)])
    images = images.to(device) if device is not None else images
    order = GreedyOrder(plan.model, plan.candidates, table.savings_ms, images, options.min_blocks_per_stage, log)
    log(f"proposing sets greedily by their measured KL on {len(images)} calibration images")
    return Proposals(selection, greedy_proposer(order, importance), order)


def model_proposer(plan: Plan, importance: dict[str, float], table: LatencyTable, proposed: Proposals,
                   options: PruneOptions) -> Proposer:
    """The proposals (the knapsack over the criterion's scores, or greedy), each aimed past the latency
    model's uncertainty of its set (search/uncertain.py)."""
    def knapsack(required_ms: float, below: Collection[str] | None = None,
                 exclude: Collection[Collection[str]] = ()) -> Choice | None:
        return choose_units(plan.candidates, importance, table.savings_ms, required_ms, options.min_blocks_per_stage,
                            below, exclude)

    return aiming_past_uncertainty(proposed.proposer or knapsack, table.saving_ms, table.sd_ms)


def choose(plan: Plan, reach: Reach, importance: dict[str, float], table: LatencyTable, target: Target,
           proposed: Proposals, options: PruneOptions, work: Path, log: Callable[[str], None], state: RunState
           ) -> Chosen:
    """Search under the target; UnreachableTargetError if no measured set comes close."""
    log(f"searching for {target.describe()} (aiming {reach.margin:.0%} under it, and each set's predicted saving "
        f"{Z:g} sd past what it needs)")
    floor_saving = table.saving_ms(reach.floor_units)
    calibration = fit_calibration([Observation.measured(table, reach.floor_units, reach.floor.baseline_ms,
                                                        reach.floor.candidate_ms)])
    result = search_under_target(plan.candidates, importance, table.savings_ms, table.baseline_ms, target,
                                 candidate_measurer(plan, reach, table, work, log, state), reach.margin,
                                 (floor_saving, reach.floor), options.min_blocks_per_stage, options.max_trials,
                                 model_proposer(plan, importance, table, proposed, options))
    trial = result.best or (min(result.trials, key=lambda t: t.measured.candidate_ms) if result.trials else None)
    if trial is None:
        msg = f"no removal set reaches {target.describe()} by the latency table"
        raise UnreachableTargetError(msg)
    removed = [u for u in plan.candidates if u.name in trial.choice.removed]
    return Chosen(removed, result, proposed.selection, calibration, reach.floor_units, reach.floor, proposed.order,
                  margin_sets=reach.margin_sets)
