"""The latency table: a fitted latency model with its design, measurements and provenance (latency_table.json).

Version 2 (compressor/latency/designed.py measures it) holds the units' structure groups, one saving
per group with its standard error (and the interaction terms the measurements showed), the
covariance of those coefficients, every designed removal set with the session it was timed in, and
where it was measured. It predicts any removal set's latency in milliseconds, with an uncertainty,
without calibration. `savings_ms` (each unit's saving removed alone) is kept for what reads per-unit
savings (the knapsack, greedy selection, version-1 readers), and `interactions_ms` lists the
interaction terms as sets of units that save more (or less) together, so that baseline_ms - the sum of
the removed units' savings - the savings of the interactions whose units are all removed is the
model's prediction exactly: what an additive replay of the table needs.

Version 1 (no `version` key: single-unit savings read as differences of medians) still loads; it
predicts the baseline minus the sum of savings, with no uncertainty known.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from compressor.errors import InputError
from compressor.fileio import atomic_write_text
from compressor.latency.model import LatencyModel, UnitInfo, measurements_of
from compressor.latency.timing import ratio_spread

VERSION = 2
MIN_SPREAD_ROUNDS = 4  # fewer rounds give no quartiles worth the name


@dataclass
class LatencyTable:
    """Latency of removal sets (ms) on one profile and machine: a fitted model with provenance."""

    model: str
    input_shape: list[int]
    profile: dict
    machine: dict
    baseline_ms: float
    savings_ms: dict[str, float]
    stats: dict[str, dict] = field(default_factory=dict)
    version: int = 1
    latency_model: dict | None = None  # LatencyModel.to_dict(): units, terms with savings and sd, covariance
    design: dict | None = None  # how sets were chosen, the sessions that timed them, why measuring stopped
    savings_sd_ms: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None  # to measure it, exports included
    interactions_ms: list[dict] = field(default_factory=list)  # sets of units saving more together (ms)
    _fitted: LatencyModel | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_model(cls, name: str, input_shape: Sequence[int], profile: dict, machine: dict, fitted: LatencyModel,
                   design: dict, seconds: float | None = None) -> LatencyTable:
        sessions = design.get("sessions") or []
        stats = {"baseline": {**sessions[0]["stats"][0], "device": sessions[0].get("device")}} if sessions else {}
        table = cls(name, list(input_shape), profile, machine, fitted.baseline_ms, fitted.unit_savings_ms(), stats,
                    VERSION, fitted.to_dict(), design, fitted.unit_sd_ms(), seconds, fitted.interactions_ms())
        table._fitted = fitted
        return table

    @property
    def fitted(self) -> LatencyModel:
        """The model that predicts: the fitted one (v2), or one saving per unit (v1)."""
        if self._fitted is None:
            self._fitted = (LatencyModel.from_dict(self.latency_model) if self.latency_model is not None
                            else LatencyModel.additive(self.baseline_ms, self.savings_ms))
        return self._fitted

    def round_spreads(self, min_rounds: int = MIN_SPREAD_ROUNDS) -> list[float]:
        """The IQR/median of the per-round speedups of every set the design timed with at least `min_rounds`
        rounds (none for a version-1 table): how much one measurement's ratio wanders on this device."""
        sessions = (self.design or {}).get("sessions") or []
        return [ratio_spread(s["round_medians"][0], rounds) for s in sessions for rounds in s["round_medians"][1:]
                if len(rounds) >= min_rounds]

    def predict(self, removed: Iterable[str]) -> float:
        """Predicted latency (ms) with `removed` units gone."""
        return self.fitted.predict_ms(removed)

    def predict_ms(self, removed: Iterable[str]) -> float:
        """Predicted latency (ms) with `removed` units gone (what a replaying device reads)."""
        return self.fitted.predict_ms(removed)

    def sd_ms(self, removed: Iterable[str]) -> float:
        """Standard error (ms) of predict_ms; 0 for a version-1 table, whose uncertainty is unknown."""
        return self.fitted.sd_ms(removed)

    def sd_new_ms(self, removed: Iterable[str]) -> float:
        """Standard deviation (ms) of a new measurement of `removed` about predict_ms (0 for version 1)."""
        return self.fitted.sd_new_ms(removed)

    def saving_ms(self, removed: Iterable[str]) -> float:
        """Predicted saving (ms) of removing `removed`, interactions included."""
        return self.baseline_ms - self.fitted.predict_ms(removed)

    def groups(self) -> list[dict]:
        """The model's terms with their units, saving per unit and its sd (ms), largest group first."""
        if self.latency_model is None:
            return [{"name": u, "kind": "unit", "units": [u], "saving_ms": s, "sd_ms": None}
                    for u, s in self.savings_ms.items()]
        terms = [dict(t) for t in self.latency_model["terms"]]
        return sorted(terms, key=lambda t: (t["kind"] != "group", -len(t["units"])))

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data: dict) -> LatencyTable:
        """A table from its JSON form: version 1, version 2, or a version-2 design whose model is not
        fitted yet (a bundle's results from the device): fitted here from its sessions."""
        if not isinstance(data, dict):
            msg = "a latency table is a JSON object"
            raise TypeError(msg)
        version = data.get("version", 1)
        if version not in (1, VERSION):
            msg = f"latency table version {version} is not known (1 or {VERSION})"
            raise TypeError(msg)
        if version == VERSION and data.get("latency_model") is None:
            return fit_design(data)
        known = {k for k in cls.__dataclass_fields__ if not k.startswith("_")}
        return cls(**{k: v for k, v in data.items() if k in known})

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
        try:
            return cls.from_dict(raw)
        except (TypeError, KeyError, ValueError) as e:  # a version-2 design that cannot be fitted
            msg = f"{path} is not a latency table JSON: its design cannot be fitted ({type(e).__name__}: {e})"
            raise InputError(msg) from e


def _table_problem(raw: object) -> str | None:
    """What keeps `raw` (parsed JSON) from being a latency table, in the file's own terms; None: nothing."""
    if not isinstance(raw, dict):
        return f"it holds a {type(raw).__name__}, not a mapping of a table's fields"
    if raw.get("version") not in (None, 1, VERSION):
        return f"version {raw.get('version')!r} is not known (1 or {VERSION})"
    if raw.get("version") == VERSION and raw.get("latency_model") is None:  # a device's design, fitted on load
        missing = [k for k in ("model", "input_shape", "profile", "machine", "units", "design") if k not in raw]
        return f"missing field(s) {', '.join(missing)} of a version-2 design" if missing else None
    names = [f.name for f in fields(LatencyTable) if not f.name.startswith("_")]
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


def fit_design(data: dict) -> LatencyTable:
    """Fit a version-2 table's model on its design's sessions (its `units` give the groups)."""
    units = [UnitInfo(**u) for u in data["units"]]
    design = data["design"]
    measurements = [m for session in design["sessions"] for m in measurements_of(session)]
    fitted = LatencyModel.fit(units, measurements, min_per_stage=design.get("min_per_stage", 1),
                              interactions=design.get("interactions", True))
    return LatencyTable.from_model(data["model"], data["input_shape"], data["profile"], data["machine"], fitted,
                                   {**design, "fitted_on": "load"}, data.get("seconds"))
