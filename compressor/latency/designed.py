"""Measuring a latency table by designed experiments: export designed removal sets, time them with the
baseline round-robin, fit the model, measure more where it is not yet precise enough.

A session times the baseline and up to `sets_per_session` sets (per device: a pool splits a batch of
sets across its devices, each part timed with the baseline on its own device) in one interleaved
measurement, so every set's saving is a ratio to a baseline timed in the same rounds and no set brings
its own baseline. After each session the measurements so far go to `save_progress` (a prune keeps them
in its run state, so a run whose device dropped resumes from them). After each batch the model is
fitted, and measuring stops once the sets the search will ask about (`queries`) are predicted with a
relative standard error at most `target_sd` (root mean square over them), or once `max_sets` sets were
measured.

A session is not re-measured when its runs spread beyond the noise gate (as a search candidate's is):
each set's saving carries the standard error of its paired per-round ratios, the fit weighs it by that,
and where the sets asked about are not yet precise enough the design measures further sets. A
re-measure would throw the session's rounds away; further sets keep them and add their own.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from torch import nn

from compressor.graph.signature import unit_signatures
from compressor.graph.surgery import remove_units
from compressor.graph.units import Unit
from compressor.latency.deploy import Deployment
from compressor.latency.design import informative_sets, initial_design, query_sd, random_sets, unit_infos
from compressor.latency.device import time_parts
from compressor.latency.model import LatencyModel, UnitInfo, measurements_of, priors_of
from compressor.latency.table import LatencyTable

Sets = list[tuple[str, ...]]
Queries = Callable[[LatencyModel], Sets]
POOL = 64  # random candidates each further batch is chosen from
QUERIES = 32  # random sets a table measured without a search in view is judged on


@dataclass
class DesignOptions:
    """How a table is designed and when measuring stops.

    target_sd: stop once the query sets' predicted latencies have a relative standard error (root mean square)
    at most this;
    max_sets: the budget (None: twice the initial design); batch: sets added per further round;
    sets_per_session: sets timed with one baseline in one interleaved session (per device)."""

    min_per_stage: int = 1
    target_sd: float = 0.02
    max_sets: int | None = None
    batch: int = 4
    sets_per_session: int = 6
    seed: int = 0
    interactions: bool = True


@dataclass
class Progress:
    """A table being measured: the sessions timed so far and the sets chosen but not yet timed."""

    sessions: list[dict]
    planned: list[list[str]]

    def to_dict(self) -> dict:
        return {"sessions": self.sessions, "planned": self.planned}

    @classmethod
    def from_dict(cls, d: dict) -> Progress:
        return cls(list(d["sessions"]), [list(s) for s in d["planned"]])


def random_queries(units: Sequence[Unit], seed: int, min_per_stage: int) -> Queries:
    """QUERIES random sets (as the search could ask about any): the default when no target is in view."""
    sets = random_sets(units, QUERIES, random.Random(f"queries:{seed}"), min_per_stage)
    return lambda _model: sets


def _session(index: int, sets: Sets, part, policy_floors: dict) -> dict:
    """One timed session's record: its sets (the baseline, [], first), statistics and per-round medians."""
    result = part.result
    return {"id": index, "device": part.device, "sets": [list(sets[i - 1]) if i else [] for i in part.indices],
            "stats": [s.to_dict() for s in result.stats], "round_medians": result.round_medians,
            "burst": result.burst, "cooldown_s": result.cooldown_s, "policy": policy_floors}


class DesignRun:
    """The state of one table's measurement: what is exported, timed and fitted so far."""

    def __init__(self, model: nn.Module, units: Sequence[Unit], deployment: Deployment, options: DesignOptions,
                 work: Path, log: Callable[[str], None]) -> None:
        self.model, self.units, self.deployment, self.options, self.work, self.log = (
            model, list(units), deployment, options, work, log)
        self.by_name = {u.name: u for u in self.units}
        self.baseline = deployment.export(model, work / f"baseline{deployment.exporter.suffix}")
        self.exported = 0

    def export(self, removed: tuple[str, ...]) -> Path:
        """The model without `removed`, exported (and so validated against its torch model); the shape check
        of surgery is left out here, as for every single-unit removal before: a table exports many sets."""
        chosen = [self.by_name[n] for n in removed]
        self.exported += 1
        path = self.work / f"set{self.exported}{self.deployment.exporter.suffix}"
        return self.deployment.export(remove_units(self.model, chosen), path)

    def time_batch(self, progress: Progress, save: Callable[[Progress], None]) -> None:
        """Export and time the planned sets, a session (per device) at a time, saving after each."""
        devices = len(getattr(self.deployment.device, "devices", [None]))
        policy = replace(self.deployment.profile.search_policy, max_repeats=1)  # the design is the re-measure
        floors = {"min_runs": policy.min_runs, "min_time_s": policy.min_time_s}
        most = self.options.sets_per_session * devices
        size = -(-len(progress.planned) // -(-len(progress.planned) // most)) if progress.planned else 0  # balanced
        while progress.planned:
            chunk = [tuple(s) for s in progress.planned[:size]]
            paths = [self.export(s) for s in chunk]
            parts = time_parts(self.deployment.device, [self.baseline, *paths], policy, self.deployment.example.numpy())
            for part in parts:
                progress.sessions.append(_session(len(progress.sessions), chunk, part, floors))
            progress.planned = progress.planned[len(chunk):]
            save(progress)
            for path in paths:
                for f in self.deployment.exporter.artifact_files(path):
                    f.unlink(missing_ok=True)
            where = ", ".join(str(p.device) for p in parts if p.device) or "this machine"
            self.log(f"  timed {len(chunk)} removal sets with the baseline ({where}; "
                     f"{sum(len(s['sets']) - 1 for s in progress.sessions)} so far)")


def _fit(infos: Sequence[UnitInfo], progress: Progress, options: DesignOptions) -> LatencyModel:
    measurements = [m for s in progress.sessions for m in measurements_of(s)]
    return LatencyModel.fit(infos, measurements, min_per_stage=options.min_per_stage,
                            interactions=options.interactions)


def measure_latency_table(model: nn.Module, units: Sequence[Unit], deployment: Deployment, name: str,
                          workdir: Path | None = None, options: DesignOptions | None = None,
                          queries: Queries | None = None, progress: Progress | None = None,
                          save_progress: Callable[[Progress], None] | None = None,
                          log: Callable[[str], None] | None = None) -> LatencyTable:
    """Measure and fit the latency table of `units` (see the module docstring); `progress` continues an
    interrupted measurement (its timed sessions are reused), `save_progress` receives it after each
    session. The measured sets are the same for the same seed (resumed runs may choose later ones anew)."""
    t0 = time.perf_counter()
    options = options or DesignOptions()
    log = log or (lambda _: None)
    save = save_progress or (lambda _: None)
    infos = unit_infos(units, unit_signatures(model, units, deployment.example))
    rng = random.Random(options.seed)
    initial = initial_design(units, infos, rng, options.min_per_stage)
    budget = options.max_sets or 2 * len(initial)
    progress = progress or Progress([], [list(s) for s in initial])
    fallback = random_queries(units, options.seed, options.min_per_stage)
    groups = len({i.group for i in infos})
    priors = len(priors_of(infos))
    log(f"latency model: {len(units)} units in {groups} structure groups; {len(progress.planned)} designed "
        f"removal sets to time" + (f" ({len(progress.sessions)} sessions already timed)" if progress.sessions else "")
        + (f"; {priors} width groups start from the share of their block their channel counts were timed to save"
           if priors else ""))
    stopped = ""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run = DesignRun(model, units, deployment, options, Path(tmp), log)
        while True:
            run.time_batch(progress, save)
            fitted = _fit(infos, progress, options)
            measured = {tuple(s) for session in progress.sessions for s in session["sets"][1:]}
            asked = (queries(fitted) if queries is not None else []) or fallback(fitted)
            uncertainty = query_sd(fitted, asked)
            log(f"  fitted on {len(measured)} sets: the sets the search may ask about are predicted within "
                f"{uncertainty:.1%} (1 sd, root mean square; wanted {options.target_sd:.1%})")
            if uncertainty <= options.target_sd:
                stopped = f"uncertainty {uncertainty:.2%} <= {options.target_sd:.2%} after {len(measured)} sets"
                break
            if len(measured) >= budget:
                stopped = f"budget of {budget} sets spent (uncertainty {uncertainty:.2%} > {options.target_sd:.2%})"
                break
            pool = random_sets(units, POOL, rng, options.min_per_stage, sorted(measured))
            noise = float(np.hypot(np.median([m.se for s in progress.sessions for m in measurements_of(s)]),
                                   fitted.tau))
            picks = informative_sets(fitted, pool, asked, min(options.batch, budget - len(measured)), noise)
            if not picks:
                stopped = "no further allowed set to measure"
                break
            progress.planned = [list(p) for p in picks]
            save(progress)
    design = {"seed": options.seed, "min_per_stage": options.min_per_stage, "target_sd": options.target_sd,
              "max_sets": budget, "interactions": options.interactions, "stopped": stopped,
              "sets": len(measured), "sessions": progress.sessions}
    return LatencyTable.from_model(name, deployment.input_shape, deployment.profile.to_dict(),
                                   deployment.device.provenance(), fitted, design, time.perf_counter() - t0)


def bundle_design(model: nn.Module, units: Sequence[Unit], deployment: Deployment, folder: Path,
                  options: DesignOptions | None = None) -> tuple[dict, list[tuple[list[str] | None, Path]]]:
    """For a device timed offline (remote/bundle.py): the initial design and one further batch of random
    sets, exported into `folder` with the baseline first; and the design's description for the manifest
    (its units with their groups, the options). The device times them all in one session."""
    options = options or DesignOptions()
    infos = unit_infos(units, unit_signatures(model, units, deployment.example))
    rng = random.Random(options.seed)
    sets = initial_design(units, infos, rng, options.min_per_stage)
    sets += random_sets(units, options.batch, rng, options.min_per_stage, sets)
    folder.mkdir(parents=True, exist_ok=True)
    run = DesignRun(model, units, deployment, options, folder, lambda _: None)
    exported: list[tuple[list[str] | None, Path]] = [(None, run.baseline)]
    exported += [(list(s), run.export(s)) for s in sets]
    design = {"units": [asdict(i) for i in infos], "seed": options.seed, "min_per_stage": options.min_per_stage,
              "interactions": options.interactions, "target_sd": None, "max_sets": len(sets), "sets": len(sets),
              "stopped": "offline bundle: the initial design and one further batch, timed in one session"}
    return design, exported
