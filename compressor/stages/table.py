"""Stage `table`: the latency model, fitted on designed removal sets timed on the profile, or a saved table reused.

The sets are timed a session at a time, and the sessions timed so far are kept in the run's state
(`latency_design`) as they come, so a run whose device dropped in the middle resumes with them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from compressor.errors import InputError
from compressor.graph.units import Unit
from compressor.latency.deploy import Deployment
from compressor.latency.design import query_sets
from compressor.latency.designed import DesignOptions, Progress, Queries, measure_latency_table
from compressor.latency.machine import machine_differences
from compressor.latency.model import LatencyModel
from compressor.latency.table import LatencyTable
from compressor.search.knapsack import choose_units
from compressor.search.target import Target, required_fraction
from compressor.stages.options import PruneOptions
from compressor.stages.plan import Plan
from compressor.stages.reach import Reach
from compressor.stages.state import RunState

QUERY_STEPS = (0.9, 1.0, 1.1)  # the required saving, and 10% either side: what the search asks for first


def given_table(plan: Plan, path: str | None, log: Callable[[str], None]) -> LatencyTable | None:
    """The table the user gave (--latency-table), checked to fit the model and profile; run right after
    `plan`, so a table that does not fit is refused before anything is measured."""
    if path is None:
        return None
    table, note = load_fitting_table(path, plan.candidates, plan.deployment)
    log(note)
    return table


def search_queries(plan: Plan, importance: Mapping[str, float], target: Target, reach: Reach,
                   min_per_stage: int) -> Queries:
    """The sets the search will ask about first: the knapsack's choices over `importance` for the saving
    the target needs (and 10% either side), by the model fitted so far."""
    def queries(model: LatencyModel) -> list[tuple[str, ...]]:
        savings = model.unit_savings_ms()
        need = required_fraction(target, reach.floor.baseline_ms, reach.margin) * model.baseline_ms
        choices = [choose_units(plan.candidates, dict(importance), savings, need * f, min_per_stage)
                   for f in QUERY_STEPS]
        return query_sets([c.removed for c in choices if c is not None])

    return queries


def table_design(plan: Plan, reach: Reach, importance: Mapping[str, float], target: Target, options: PruneOptions
                 ) -> tuple[Queries | None, DesignOptions]:
    """How a prune designs its table: the sets the search will ask about as queries (where removal alone
    can reach the target), measured until they are predicted within the search's margin."""
    queries = search_queries(plan, importance, target, reach, options.min_blocks_per_stage) if reach.reaches else None
    return queries, DesignOptions(min_per_stage=options.min_blocks_per_stage, target_sd=reach.margin, seed=options.seed)


def latency_table(plan: Plan, given: LatencyTable | None, work: Path, log: Callable[[str], None],
                  state: RunState, queries: Queries | None = None, options: DesignOptions | None = None
                  ) -> LatencyTable:
    """The table the user gave, a resumed run's, or measured now (continuing the sessions a resumed run
    already timed)."""
    if given is not None:
        return given
    saved = state.load("latency_table")
    if saved is not None:
        table = LatencyTable.from_dict(saved)
        state.note_reused(f"the latency table ({len(table.savings_ms)} units, measured {table.machine['date']})")
        return table
    partial = state.load("latency_design")
    progress = Progress.from_dict(partial) if partial is not None else None
    if progress is not None and progress.sessions:
        timed = sum(len(s["sets"]) - 1 for s in progress.sessions)
        state.note_reused(f"the latency table's {timed} removal sets already timed")
    log("measuring the latency table (designed removal sets, each session timed with the baseline round-robin)")
    table = measure_latency_table(plan.model, plan.candidates, plan.deployment, plan.loaded.arch, work, options,
                                  queries, progress, lambda p: state.save("latency_design", p.to_dict()), log)
    state.save("latency_table", table.to_dict())
    return table


def load_fitting_table(path: str | Path, units: Sequence[Unit], deployment: Deployment) -> tuple[LatencyTable, str]:
    """A saved table, refused unless it was measured for these units, this profile and input shape;
    with a note on where it was measured (a warning if that is another machine)."""
    table = LatencyTable.load(path)
    profile = deployment.profile
    problems = []
    if set(table.savings_ms) != {u.name for u in units}:
        problems.append("its units differ from the model's")
    if table.profile.get("name") != profile.name or table.profile.get("runtime") != profile.runtime:
        problems.append(f"it was measured on profile {table.profile.get('name')!r}, not {profile.name!r}")
    if list(table.input_shape) != list(deployment.input_shape):
        problems.append(f"its input shape {table.input_shape} is not {list(deployment.input_shape)}")
    if problems:
        msg = f"latency table {path} does not fit this run: {'; '.join(problems)}"
        raise InputError(msg)
    here = deployment.device.provenance()
    note = f"reusing latency table {path} (version {table.version}, measured {table.machine.get('date')})"
    if machine_differences(table.machine, here):
        note = (f"warning: latency table {path} was measured on {table.machine.get('cpu')}, this device is "
                f"{here['cpu']}; candidates are still measured here. " + note)
    return table, note
