"""Stage `table`: each unit's measured latency saving on the profile, or a saved table reused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from compressor.latency.table import LatencyTable, load_fitting_table, measure_latency_table
from compressor.stages.plan import Plan
from compressor.stages.state import RunState


def given_table(plan: Plan, path: str | None, log: Callable[[str], None]) -> LatencyTable | None:
    """The table the user gave (--latency-table), checked to fit the model and profile; run right after
    `plan`, so a table that does not fit is refused before anything is measured."""
    if path is None:
        return None
    table, note = load_fitting_table(path, plan.candidates, plan.deployment)
    log(note)
    return table


def latency_table(plan: Plan, given: LatencyTable | None, work: Path, log: Callable[[str], None],
                  state: RunState) -> LatencyTable:
    """The table the user gave, a resumed run's, or measured now."""
    if given is not None:
        return given
    saved = state.load("latency_table")
    if saved is not None:
        state.note_reused(f"the latency table ({len(saved['savings_ms'])} units, measured {saved['machine']['date']})")
        return LatencyTable(**saved)
    log("measuring the latency table (each unit removed, exported, timed interleaved)")
    table = measure_latency_table(plan.model, plan.candidates, plan.deployment, plan.loaded.arch, work)
    state.save("latency_table", vars(table))
    return table
