"""A device that predicts latency instead of timing it: a latency table measured on the target, replayed.

A profile with `runtime: table` names the table in its runtime options
(`runtime_options: {table: results.json}`, a path relative to the profile file):
`latency_table.json` from `compressor profile` or a prune, or the `results.json`
that a device bundle's measure.py wrote on the target. Every artifact of that
runtime names the units its model lacks (exporters/table.py), and TableDevice
gives its latency as the table predicts it: the baseline less each removed unit's
saving, less the saving of each interaction term (a set of units whose removal
together saves that much more than their savings add up to) whose units are all
removed. So the same artifacts always get the same figures: the search's outcome
can be asserted exactly (tests), and a prune runs on a workstation against the
target's table, to be verified on the target afterwards (the bundle's `compressor
bench`). Every figure it gives is a prediction, and the reports say so.

The table file: the v1 fields of compressor.latency.table.LatencyTable (model,
input_shape, profile, machine, baseline_ms, savings_ms, stats), plus optionally
`interactions_ms`: [{"units": [names], "saving_ms": ms}, ...]. A table format
whose `version` is another registers how it is read in FORMATS.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor.errors import InputError
from compressor.latency.timing import Interleaved, LatencyStats, TimingPolicy

TABLE_OPTION = "table"  # the runtime option naming the table file
ROUND = 5  # runs per round, as the interleaved protocol's burst: round_medians has min_runs / ROUND rounds


@dataclass(frozen=True)
class Interaction:
    """What removing all of `units` together saves beyond their own savings (ms; negative: less)."""

    units: frozenset[str]
    saving_ms: float


@dataclass
class ReplayTable:
    """A measured latency table as a function of the removed units: the additive model plus interactions."""

    path: str
    sha256: str
    baseline_ms: float
    savings_ms: dict[str, float]
    interactions: list[Interaction] = field(default_factory=list)
    measured: dict = field(default_factory=dict)  # what the file says of its measurement: model, input_shape,
    # profile, machine (compressor.latency.table.LatencyTable's fields)

    @property
    def model(self) -> str:
        return str(self.measured.get("model", "?"))

    @property
    def input_shape(self) -> list[int]:
        return self.measured["input_shape"]

    @property
    def machine(self) -> dict:
        return self.measured.get("machine") or {}

    @property
    def profile(self) -> dict:
        return self.measured.get("profile") or {}

    def predict_ms(self, removed: Collection[str]) -> float:
        """Latency (ms) of the model without `removed`; InputError for a unit the table has no saving for."""
        removed = set(removed)
        unknown = sorted(removed - set(self.savings_ms))
        if unknown:
            msg = (f"latency table {self.path} has no saving for unit(s) {', '.join(unknown)} (it was measured for "
                   f"{self.model}, units {', '.join(self.savings_ms)}): replay a table of this model")
            raise InputError(msg)
        ms = self.baseline_ms - sum(self.savings_ms[n] for n in removed)
        ms -= sum(i.saving_ms for i in self.interactions if i.units <= removed)
        if not ms > 0:
            msg = (f"latency table {self.path} predicts {ms:.4f} ms without {len(removed)} units: its savings "
                   f"exceed its baseline ({self.baseline_ms:.4f} ms), so it cannot be replayed")
            raise InputError(msg)
        return ms


def _number(value: object, what: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        msg = f"latency table {path}: {what} must be a finite number of ms, got {value!r}"
        raise InputError(msg)
    return float(value)


def _interactions(raw: object, savings: dict[str, float], path: Path) -> list[Interaction]:
    if not isinstance(raw, list):
        msg = f"latency table {path}: interactions_ms must be a list of {{units, saving_ms}}"
        raise InputError(msg)
    terms = []
    for i, term in enumerate(raw):
        units = term.get("units") if isinstance(term, dict) else None
        if not (isinstance(units, list) and len(units) >= 2 and all(isinstance(u, str) and u in savings
                                                                         for u in units)):
            msg = (f"latency table {path}: interactions_ms[{i}] needs 'units', a list of two or more names of units "
                   f"in savings_ms, got {units!r}")
            raise InputError(msg)
        terms.append(Interaction(frozenset(units), _number(term.get("saving_ms"), f"interactions_ms[{i}].saving_ms",
                                                            path)))
    return terms


def _version1(data: dict, path: Path, digest: str) -> ReplayTable:
    """The v1 latency table (compressor profile, a prune's latency_table.json, a table bundle's results.json)."""
    missing = [k for k in ("baseline_ms", "savings_ms", "input_shape") if k not in data]
    if missing:
        msg = f"latency table {path} lacks {', '.join(missing)}: it is not a latency table"
        raise InputError(msg)
    savings = data["savings_ms"]
    if not isinstance(savings, dict) or not savings:
        msg = f"latency table {path}: savings_ms must map unit names to savings (ms)"
        raise InputError(msg)
    shape = data["input_shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        msg = f"latency table {path}: input_shape must be a list of integers, got {shape!r}"
        raise InputError(msg)
    savings = {str(k): _number(v, f"savings_ms[{k!r}]", path) for k, v in savings.items()}
    baseline = _number(data["baseline_ms"], "baseline_ms", path)
    if baseline <= 0:
        msg = f"latency table {path}: baseline_ms must be positive, got {baseline}"
        raise InputError(msg)
    measured = {k: data[k] for k in ("model", "input_shape", "profile", "machine") if k in data}
    if not all(isinstance(measured.get(k) or {}, dict) for k in ("profile", "machine")):
        msg = f"latency table {path}: profile and machine must be mappings"
        raise InputError(msg)
    return ReplayTable(str(path), digest, baseline, savings, _interactions(data.get("interactions_ms", []), savings,
                                                                            path), measured)


# how each table version is read: a table of another version (a fitted latency model) registers its reader
def _version2(data: dict, path: Path, digest: str) -> ReplayTable:
    """The v2 table (a fitted latency model): its per-unit savings and measured interaction terms replay the
    model exactly; a device bundle's v2 results hold only the design's measurements and are fitted first."""
    if not data.get("savings_ms"):
        from compressor.latency.table import LatencyTable

        try:
            data = {**data, **LatencyTable.from_dict(data).to_dict()}
        except (KeyError, TypeError, ValueError) as e:
            msg = f"latency table {path} is a version-2 table whose design cannot be fitted: {e}"
            raise InputError(msg) from e
    return _version1(data, path, digest)


FORMATS: dict[int, Callable[[dict, Path, str], ReplayTable]] = {1: _version1, 2: _version2}


def load_replay_table(path: str | Path) -> ReplayTable:
    """Read and check a table to replay; InputError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"latency table {path} cannot be read as JSON: {getattr(e, 'strerror', None) or e}"
        raise InputError(msg) from e
    if not isinstance(data, dict):
        msg = f"latency table {path} must be a JSON object, got {type(data).__name__}"
        raise InputError(msg)
    if data.get("kind") == "compressor-bundle-results":
        msg = (f"{path} holds a bench bundle's figures, not a latency table: replay the results.json of a "
               "table bundle (`compressor profile --bundle DIR`) or a latency_table.json")
        raise InputError(msg)
    version = data.get("version", 1)
    if version not in FORMATS:
        msg = f"latency table {path} has version {version!r}; this compressor reads version(s) {sorted(FORMATS)}"
        raise InputError(msg)
    return FORMATS[version](data, path, hashlib.sha256(raw).hexdigest())


def _constant(ms: float, policy: TimingPolicy) -> LatencyStats:
    n = max(1, policy.min_runs)
    return LatencyStats(ms, ms, ms, ms, 0.0, n, ms, samples=[ms] * n)


class TableDevice:
    """Predicts each table artifact's latency from `table`; times nothing (module docstring)."""

    def __init__(self, table: ReplayTable) -> None:
        self.table = table

    def time(self, artifacts: Sequence[Path], policy: TimingPolicy, x: np.ndarray) -> Interleaved:
        """Every artifact's predicted latency as a measurement with no spread: `policy.min_runs` equal samples."""
        from exporters.table import read_artifact

        if list(np.shape(x)) != list(self.table.input_shape):
            msg = (f"latency table {self.table.path} was measured on input {self.table.input_shape}, this model "
                   f"takes {list(np.shape(x))}: replay a table measured for this input")
            raise InputError(msg)
        stats = [_constant(self.table.predict_ms(read_artifact(a)), policy) for a in artifacts]
        rounds = max(1, policy.min_runs // ROUND)
        return Interleaved(stats, [[s.median] * rounds for s in stats])

    def provenance(self) -> dict:
        """The machine the table was measured on, with `predicted` naming the table: no figure is measured."""
        t = self.table
        measured_on = {k: t.machine.get(k) for k in ("cpu", "logical_cores", "physical_cores", "hostname")
                       if k in t.machine}
        return {**measured_on, "predicted": {"table": t.path, "sha256": t.sha256, "model": t.model,
                                             "measured_at": t.machine.get("date"), "runtime": t.profile.get("runtime"),
                                             "profile": t.profile.get("name"), "interactions": len(t.interactions)},
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    def close(self) -> None:
        """Nothing to release."""


def table_device(profile) -> TableDevice:
    """The device of a `runtime: table` profile: its `runtime_options.table` replayed."""
    path = profile.runtime_options.get(TABLE_OPTION)
    if not isinstance(path, str) or not path:
        msg = f"profile {profile.name} (runtime table) must name the table in runtime_options: {{table: FILE}}"
        raise InputError(msg)
    return TableDevice(load_replay_table(path))
