"""Device profiles: YAML files naming the runtime, its settings and the timing policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from compressor.errors import InputError
from compressor.latency.machine import physical_cores
from compressor.latency.remote.spec import RemoteSpec, parse_remote
from compressor.latency.timing import TimingPolicy

REQUIRED = ("name", "runtime")
KNOWN_KEYS = ("name", "runtime", "device", "precision", "threads", "batch", "input_shape", "opset", "description",
              "runtime_options", "timing", "remote")
TIMING_LEVELS = ("search", "report")


@dataclass
class Profile:
    """Where and how latency is measured. `threads=None` means this machine's physical cores."""

    name: str
    runtime: str
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    batch: int = 1
    input_shape: tuple[int, int, int] | None = None
    opset: int = 17
    description: str = ""
    runtime_options: dict = field(default_factory=dict)
    search_policy: TimingPolicy = field(default_factory=TimingPolicy)
    report_policy: TimingPolicy = field(default_factory=lambda: TimingPolicy(200, 5.0))
    source: str = ""
    remote: RemoteSpec | None = None  # measured on this device (or pool) over SSH; None: this machine

    @property
    def resolved_threads(self) -> int:
        return self.threads or physical_cores()

    def to_dict(self) -> dict:
        return {
            "name": self.name, "runtime": self.runtime, "device": self.device,
            "precision": self.precision, "threads": self.resolved_threads, "batch": self.batch,
            "input_shape": list(self.input_shape) if self.input_shape else None, "opset": self.opset,
            "search_policy": vars(self.search_policy), "report_policy": vars(self.report_policy),
            "runtime_options": self.runtime_options, "source": self.source,
            **({"remote": self.remote.to_dict()} if self.remote else {}),
        }


def builtin_profiles() -> list[str]:
    folder = resources.files("compressor.builtin_profiles")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _positive_int(raw: dict, key: str, default: int | None) -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        msg = f"profile field {key!r} must be a positive integer, got {value!r}"
        raise InputError(msg)
    return value


def _policy(raw: dict, level: str, default: TimingPolicy) -> TimingPolicy:
    timing = raw.get("timing") or {}
    floors = timing.get(level) or {} if isinstance(timing, dict) else None
    if not isinstance(timing, dict) or not isinstance(floors, dict):
        msg = f"profile field 'timing' and 'timing.{level}' must be mappings"
        raise InputError(msg)
    shared = {k: v for k, v in timing.items() if not isinstance(v, dict)}
    merged = {**vars(default), **shared, **floors}
    for key, value in merged.items():
        expected = int if key in ("min_runs", "warmup_runs", "max_repeats") else (int, float)
        if key == "parallel_probe":
            if not isinstance(value, bool):
                msg = f"profile timing value 'parallel_probe' must be true or false, got {value!r}"
                raise InputError(msg)
        elif key in TimingPolicy.__dataclass_fields__ and (
                isinstance(value, bool) or not isinstance(value, expected) or value < 0):
            msg = f"profile timing value {key!r} must be a non-negative number, got {value!r}"
            raise InputError(msg)
    policy = TimingPolicy.from_dict(merged)
    if policy.min_runs < 1:
        msg = f"profile timing.{level}.min_runs must be at least 1"
        raise InputError(msg)
    return policy


def _name(raw: dict, key: str, source: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        msg = f"profile {source}: field {key!r} must be a non-empty string, got {value!r}"
        raise InputError(msg)
    return value


def _check_keys(raw: dict, source: str) -> None:
    """Unknown keys are refused by name (a typo would otherwise silently keep a default)."""
    unknown = [str(k) for k in raw if k not in KNOWN_KEYS]
    timing = raw.get("timing")
    if isinstance(timing, dict):
        policy_keys = set(TimingPolicy.__dataclass_fields__)
        unknown += [f"timing.{k}" for k in timing if k not in policy_keys and k not in TIMING_LEVELS]
        unknown += [f"timing.{level}.{k}" for level in TIMING_LEVELS if isinstance(timing.get(level), dict)
                    for k in timing[level] if k not in policy_keys]
    if unknown:
        msg = f"profile {source} has unknown field(s): {', '.join(unknown)}; known: {', '.join(KNOWN_KEYS)}"
        raise InputError(msg)


def _check_runtime(raw: dict, source: str) -> None:
    from exporters.registry import RUNTIMES

    if raw["runtime"] not in RUNTIMES:
        msg = f"profile {source}: unknown runtime {raw['runtime']!r}; known: {', '.join(sorted(RUNTIMES))}"
        raise InputError(msg)


def _table_options(options: dict, raw: dict, source: str) -> dict:
    """A `runtime: table` profile's options, its table's path resolved against the profile file's folder
    (the table is read when the device is made: compressor/latency/replay.py)."""
    table = options.get("table")
    if not isinstance(table, str) or not table.strip():
        msg = (f"profile {source}: runtime table replays a measured latency table: name it in "
               "runtime_options: {table: FILE}")
        raise InputError(msg)
    if raw.get("remote") is not None:
        msg = f"profile {source}: runtime table predicts latency from a table here; it takes no remote: section"
        raise InputError(msg)
    path = Path(table).expanduser()
    if not path.is_absolute() and not source.startswith("builtin:"):
        path = Path(source).parent / path
    return {**options, "table": str(path)}


def parse_profile(text: str, source: str) -> Profile:
    """Parse and check profile YAML; every problem is an InputError naming the field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        msg = f"malformed profile YAML in {source}{where}: {getattr(e, 'problem', e)}"
        raise InputError(msg) from e
    # these refusals have the shape of criteria/agreement.py's (one message per problem): alike by form only
    if not isinstance(raw, dict):
        msg = f"profile {source} must be a YAML mapping, got {type(raw).__name__}"
        raise InputError(msg)
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        msg = f"profile {source} lacks required field(s): {', '.join(missing)}"
        raise InputError(msg)
    _check_keys(raw, source)
    _check_runtime(raw, source)
    shape = raw.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 3
                              or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        msg = f"profile field 'input_shape' must be [C, H, W] of positive integers, got {shape!r}"
        raise InputError(msg)
    options = raw.get("runtime_options") or {}
    if not isinstance(options, dict):
        msg = "profile field 'runtime_options' must be a mapping"
        raise InputError(msg)
    if raw["runtime"] == "table":
        options = _table_options(options, raw, source)
    return Profile(
        name=_name(raw, "name", source), runtime=_name(raw, "runtime", source), device=str(raw.get("device", "cpu")),
        precision=str(raw.get("precision", "fp32")), threads=_positive_int(raw, "threads", None),
        batch=_positive_int(raw, "batch", 1), input_shape=tuple(shape) if shape else None,
        opset=_positive_int(raw, "opset", 17), description=str(raw.get("description", "")),
        runtime_options=options,
        search_policy=_policy(raw, "search", TimingPolicy()),
        report_policy=_policy(raw, "report", TimingPolicy(200, 5.0)), source=source,
        remote=parse_remote(raw.get("remote"), source),
    )


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name ("ort-cpu") or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            msg = f"profile file not found: {path}"
            raise InputError(msg)
        return parse_profile(path.read_text(), str(path))
    resource = resources.files("compressor.builtin_profiles") / f"{name_or_path}.yaml"
    if not resource.is_file():
        msg = f"unknown profile {name_or_path!r}; built in: {', '.join(builtin_profiles())}"
        raise InputError(msg)
    return parse_profile(resource.read_text(), f"builtin:{name_or_path}")
