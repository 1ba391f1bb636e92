"""Per-unit lookup tables of measured latency savings.

The saving of unit u = median(model) - median(model without u), both measured
as whole exported models in interleaved rounds, so runtime fusion is included.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from compressor.errors import InputError
from compressor.fileio import atomic_write_text
from compressor.graph.surgery import remove_units
from compressor.graph.units import Unit
from compressor.latency.deploy import Deployment
from compressor.latency.device import time_parts
from compressor.latency.machine import machine_differences


@dataclass
class LatencyTable:
    """Per-unit latency savings (ms) on one profile and machine, with provenance."""

    model: str
    input_shape: list[int]
    profile: dict
    machine: dict
    baseline_ms: float
    savings_ms: dict[str, float]
    stats: dict[str, dict] = field(default_factory=dict)

    def predict(self, removed: Sequence[str]) -> float:
        """Predicted latency (ms) with `removed` units gone: baseline - sum of savings."""
        return self.baseline_ms - sum(self.savings_ms[u] for u in removed)

    def to_json(self) -> str:
        return json.dumps(vars(self), indent=2)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        """The table in the JSON file `path`; InputError saying what is wrong with the file."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            msg = f"{path} is not a latency table JSON: {e}"
            raise InputError(msg) from e
        problem = _table_problem(raw)
        if problem:
            msg = f"{path} is not a latency table JSON: {problem}"
            raise InputError(msg)
        return cls(**raw)


def _table_problem(raw: object) -> str | None:
    """What keeps `raw` (parsed JSON) from being a latency table, in the file's own terms; None: nothing."""
    if not isinstance(raw, dict):
        return f"it holds a {type(raw).__name__}, not a mapping of a table's fields"
    names = [f.name for f in fields(LatencyTable)]
    required = [f.name for f in fields(LatencyTable) if f.default is MISSING and f.default_factory is MISSING]
    unknown, missing = sorted(set(raw) - set(names)), [n for n in required if n not in raw]
    if unknown or missing:
        parts = ([f"unknown field(s) {', '.join(unknown)}"] if unknown else []) + (
            [f"missing field(s) {', '.join(missing)}"] if missing else [])
        return f"{'; '.join(parts)} (a latency table has {', '.join(names)})"
    savings = raw["savings_ms"]
    if not isinstance(savings, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in savings.values()):
        return "savings_ms must map unit names to savings in ms"
    if isinstance(raw["baseline_ms"], bool) or not isinstance(raw["baseline_ms"], (int, float)) \
            or not raw["baseline_ms"] > 0:
        return f"baseline_ms must be a positive latency in ms, got {raw['baseline_ms']!r}"
    for key in ("profile", "machine", "stats"):
        if key in raw and not isinstance(raw[key], dict):
            return f"{key} must be a mapping, got {type(raw[key]).__name__}"
    if not isinstance(raw["input_shape"], list):
        return f"input_shape must be a list of dimensions, got {raw['input_shape']!r}"
    return None


def export_candidates(model: nn.Module, units: list[Unit], deployment: Deployment, folder: Path) -> list[Path]:
    """The model (baseline first) and each single-unit removal, exported into `folder`."""
    suffix = deployment.exporter.suffix
    paths = [deployment.export(model, folder / f"baseline{suffix}")]
    for i, unit in enumerate(tqdm(units, desc="export candidates", disable=None, leave=False)):
        paths.append(deployment.export(remove_units(model, [unit]), folder / f"unit{i}{suffix}"))
    return paths


def measure_latency_table(model: nn.Module, units: list[Unit], deployment: Deployment,
                          name: str, workdir: Path | None = None) -> LatencyTable:
    """Export the model and each single-unit removal, time all in interleaved rounds. On a device pool
    the units are split across the devices, each unit's saving taken against the baseline timed with it
    on the same device (its stats name the device and that baseline)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        paths = export_candidates(model, units, deployment, Path(tmp))
        parts = time_parts(deployment.device, paths, deployment.profile.search_policy, deployment.example.numpy())
    base = parts[0].result.stats[0]
    savings, stats = {}, {"baseline": base.to_dict() if parts[0].device is None
                          else {**base.to_dict(), "device": parts[0].device}}
    for part in parts:
        part_base = part.result.stats[0]
        for i, s in zip(part.indices[1:], part.result.stats[1:], strict=True):
            savings[units[i - 1].name] = part_base.median - s.median
            stats[units[i - 1].name] = s.to_dict() if part.device is None else {
                **s.to_dict(), "device": part.device, "baseline_ms": part_base.median}
    savings = {u.name: savings[u.name] for u in units}
    stats = {"baseline": stats["baseline"], **{u.name: stats[u.name] for u in units}}
    return LatencyTable(name, list(deployment.input_shape), deployment.profile.to_dict(),
                        deployment.device.provenance(), base.median, savings, stats)


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
    note = f"reusing latency table {path} (measured {table.machine.get('date')})"
    if machine_differences(table.machine, here):
        note = (f"warning: latency table {path} was measured on {table.machine.get('cpu')}, this device is "
                f"{here['cpu']}; candidates are still measured here. " + note)
    return table, note
