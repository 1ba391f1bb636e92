"""`compressor bench`: time an exported artifact on a profile and gate it against a reference.

The artifact is timed alone (against a saved baseline) or interleaved with
another artifact (`against`), always through the profile's device
(latency/device.py); the verdict is asv's rule (latency/gate.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor.errors import InputError, first_line
from compressor.fileio import atomic_write_text, refuse_existing_file
from compressor.latency.device import close_device, device_for
from compressor.latency.gate import (
    BASELINE_KIND,
    DEFAULT_ALPHA,
    DEFAULT_THRESHOLD,
    Verdict,
    check_threshold,
    foreign_reasons,
    format_table,
    load_baseline,
    save_baseline,
    sha256,
    verdict,
)
from compressor.latency.parallel_probe import comparison_note
from compressor.latency.profiles import Profile
from compressor.latency.timing import LatencyStats, TimingPolicy


@dataclass
class OpenedArtifact:
    path: Path
    session: object
    input_shape: tuple[int, ...]
    files: dict[str, str]  # file -> sha256

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    def example(self) -> np.ndarray:
        """The fixed random input every measurement of this artifact runs on."""
        return np.random.default_rng(0).standard_normal(self.input_shape, dtype=np.float32)


def check_artifact(path: str | Path, backend) -> Path:
    """`path` exists and has the artifact suffix of the backend's runtime."""
    path = Path(path)
    if path.suffix != backend.suffix:
        msg = (f"artifact {path} is not a {backend.suffix} file, which runtime {backend.runtime.name} "
               "of this profile needs")
        raise InputError(msg)
    if not path.is_file():
        msg = f"artifact not found: {path}"
        raise InputError(msg)
    return path


def _input_shape(session, profile: Profile) -> tuple[int, ...]:
    """The first input's shape as stored in the artifact; a symbolic batch becomes the profile's batch."""
    dims = session.input_shape()
    shape = list(dims)
    if shape and shape[0] is None:
        shape[0] = profile.batch
    if profile.input_shape and len(shape) == 4:
        shape[1:] = [s if s is not None else p for s, p in zip(shape[1:], profile.input_shape, strict=True)]
    if not shape or any(d is None for d in shape):
        msg = f"the artifact's input shape {dims} is not static; give the profile an input_shape"
        raise InputError(msg)
    return tuple(shape)


def backend_for(profile: Profile):
    """The profile's exporters.Backend."""
    from exporters import Backend

    return Backend(profile.runtime, profile.precision, profile.resolved_threads, profile.runtime_options,
                   profile.opset)


def open_artifact(path: str | Path, profile: Profile) -> OpenedArtifact:
    """Open `path` on the profile's runtime and session settings, prepared with a fixed random input."""
    backend = backend_for(profile)
    path = check_artifact(path, backend)
    session = backend.open(path)
    shape = _input_shape(session, profile)
    opened = OpenedArtifact(path, session, shape, {})
    try:
        session.prepare(opened.example())
        session()
    except InputError:
        raise
    except Exception as e:  # a runtime's own error type for an artifact that loads but does not run
        msg = f"cannot run {path} on {profile.runtime}: {first_line(e)}"
        raise InputError(msg) from e
    opened.files = {str(f): sha256(f) for f in backend.exporter.artifact_files(path) if f.is_file()}
    return opened


def bench_profile(profile: Profile, batch: int) -> Profile:
    """The profile as measured: the batch is the artifact's."""
    return dataclasses.replace(profile, batch=batch)


def measurement(opened: OpenedArtifact, stats: LatencyStats, profile: Profile, policy: TimingPolicy,
                mode: str, machine: dict) -> dict:
    """One artifact's measurement with provenance: what a baseline file holds."""
    return {
        "kind": BASELINE_KIND, "version": 1,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "artifact": {"path": str(opened.path.resolve()), "sha256": opened.files.get(str(opened.path)),
                     "files": opened.files, "input_shape": list(opened.input_shape)},
        "profile": bench_profile(profile, opened.batch).to_dict(),
        "session": getattr(opened.session, "settings", {}),
        "machine": machine, "policy": vars(policy), "mode": mode,
        "stats": stats.to_dict(), "samples": stats.samples,
    }


@dataclass  # like _Timed below only in the shape of its fields
class BenchConfig:
    artifact: str
    profile: Profile
    baseline: str | None = None
    against: str | None = None
    threshold: float = DEFAULT_THRESHOLD
    alpha: float = DEFAULT_ALPHA
    save_baseline: str | None = None
    allow_foreign_baseline: bool = False
    runs: int | None = None
    min_time_s: float | None = None
    out: str | None = None
    bundle: str | None = None  # write an offline bundle to time on the device instead of timing here
    results: str | None = None  # the figures a bundle's measure.py wrote on the device, instead of timing here


@dataclass
class BenchResult:
    report: dict
    text: str
    verdict: Verdict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.verdict is not None and self.verdict.regression else 0


def policy_for(config: BenchConfig) -> TimingPolicy:
    """The profile's report floors, with --runs / --min-time overriding (a CI gate sets its own)."""
    policy = config.profile.report_policy
    if config.runs is not None:
        policy = dataclasses.replace(policy, min_runs=config.runs)
    if config.min_time_s is not None:
        if not math.isfinite(config.min_time_s) or config.min_time_s < 0:
            msg = f"--min-time must be zero or a positive number of seconds, got {config.min_time_s:g}"
            raise InputError(msg)
        policy = dataclasses.replace(policy, min_time_s=config.min_time_s)
    return policy


def _check_outputs(config: BenchConfig) -> None:
    outputs = [refuse_existing_file(p).resolve() for p in (config.save_baseline, config.out) if p]
    if len(set(outputs)) < len(outputs):
        msg = "--save-baseline and --out name the same file"
        raise InputError(msg)


def _stats_row(stats: LatencyStats) -> str:
    flag = f"  [{stats.warning}{', noisy' if stats.noisy else ''}]" if stats.warning or stats.noisy else ""
    return (f"median {stats.median:.4f} ms, p90 {stats.p90:.4f}, IQR {stats.iqr:.4f}, n {stats.n}, "
            f"cold {stats.cold_ms:.3f} ms{flag}")


def _foreign_notes(config: BenchConfig, baseline: dict | None, measured_profile: dict, machine: dict
                   ) -> tuple[list[str], list[str]]:
    """(reasons the baseline is foreign, notes); InputError for a foreign baseline not allowed."""
    if baseline is None:
        return [], []
    foreign = foreign_reasons(baseline, measured_profile, machine)
    if foreign and not config.allow_foreign_baseline:
        msg = (f"baseline {config.baseline} is foreign ({'; '.join(foreign)}); "
               "re-measure it here or pass --allow-foreign-baseline")
        raise InputError(msg)
    notes = [f"!!! FOREIGN BASELINE (allowed by --allow-foreign-baseline): {'; '.join(foreign)}. "
             "The verdict compares different setups and is NOT a like-for-like regression check."] if foreign else []
    return foreign, notes


@dataclass
class _Timed:
    """The artifact's statistics, and the reference's where one was timed with it."""

    stats: LatencyStats
    mode: str
    other: OpenedArtifact | None = None
    other_stats: LatencyStats | None = None


def _open_against(config: BenchConfig, opened: OpenedArtifact) -> OpenedArtifact:
    """The --against artifact, opened; InputError if it takes another input than the artifact."""
    other = open_artifact(config.against, config.profile)
    if other.input_shape != opened.input_shape:
        msg = (f"--against {other.path} takes input {list(other.input_shape)}, {opened.path} takes "
               f"{list(opened.input_shape)}")
        raise InputError(msg)
    return other


def _time(config: BenchConfig, opened: OpenedArtifact, policy: TimingPolicy, device) -> _Timed:
    """Time the artifact alone, or interleaved with --against on the same device."""
    if not config.against:
        return _Timed(device.time([opened.path], policy, opened.example()).stats[0], "separate")
    other = _open_against(config, opened)
    stats, other_stats = device.time([opened.path, other.path], policy, opened.example()).stats
    return _Timed(stats, "interleaved", other, other_stats)


def _reference(config: BenchConfig, opened: OpenedArtifact, timed: _Timed, baseline: dict | None,
               policy: TimingPolicy, machine: dict) -> tuple[str, list[float], dict, list[str]] | None:
    """(name, samples, report entry, notes) of what the artifact is judged against; None: nothing."""
    if timed.other is not None:
        entry = measurement(timed.other, timed.other_stats, config.profile, policy, timed.mode, machine)
        return timed.other.path.name, timed.other_stats.samples, entry, []
    if baseline is None:
        return None
    notes = ["note: the baseline was measured in another run (not interleaved); drift between runs on "
             "a shared machine moves medians by 10% or more, so prefer --against in CI."]
    if baseline.get("artifact", {}).get("sha256") == opened.files.get(str(opened.path)):
        notes.append("note: the baseline was measured on this very artifact (same sha256).")
    entry = {k: baseline.get(k) for k in ("artifact", "profile", "machine", "date", "stats")}
    entry["baseline_file"] = str(config.baseline)
    return f"baseline {Path(config.baseline).name}", baseline["samples"], entry, notes


def bench_device(config: BenchConfig, profile: Profile):
    """Where the artifact is timed: the figures of a bundle's results file (--results), else the profile's
    device (this machine, or its remote host over SSH)."""
    if config.results:
        from compressor.latency.remote.results import ResultsDevice

        return ResultsDevice.load(config.results, profile, backend_for(profile))
    return device_for(profile, backend_for(profile))


def _write_bundle(config: BenchConfig, opened: OpenedArtifact, policy: TimingPolicy) -> BenchResult:
    """--bundle: the artifact (and --against) with the runner and a manifest, to time on the device."""
    from compressor.latency.remote.bundle import write_bench_bundle

    artifacts = [opened.path] + ([_open_against(config, opened).path] if config.against else [])
    folder, text = write_bench_bundle(config.bundle, artifacts, backend_for(config.profile),
                                      bench_profile(config.profile, opened.batch), policy, opened.example())
    return BenchResult({"bundle": str(folder), "artifacts": [str(a) for a in artifacts]}, text)


def run_bench(config: BenchConfig) -> BenchResult:
    """Measure the artifact (alone, or interleaved with --against) and judge it against the reference."""
    check_threshold(config.threshold)
    if config.baseline and config.against:
        msg = "give either --baseline or --against, not both"
        raise InputError(msg)
    if config.bundle and (config.results or config.baseline or config.save_baseline or config.out):
        msg = "--bundle only writes the bundle: give --results, --baseline, --save-baseline and --out in the next step"
        raise InputError(msg)
    _check_outputs(config)
    baseline = load_baseline(config.baseline) if config.baseline else None
    policy, profile = policy_for(config), config.profile
    opened = open_artifact(config.artifact, profile)
    if config.bundle:
        return _write_bundle(config, opened, policy)
    device = bench_device(config, profile)
    try:
        measured_profile, machine = bench_profile(profile, opened.batch).to_dict(), device.provenance()
        foreign, notes = _foreign_notes(config, baseline, measured_profile, machine)
        timed = _time(config, opened, policy, device)
        machine = device.provenance()  # with the conditions of this measurement, on a remote device
    finally:
        close_device(device)
    reference = _reference(config, opened, timed, baseline, policy, machine)
    notes += reference[3] if reference else []
    if baseline is not None:
        state = comparison_note(baseline["machine"], machine, f"baseline {Path(config.baseline).name}")
        notes += [state] if state else []
    if machine.get("predicted"):  # runtime: table (compressor/latency/replay.py)
        notes.append(f"note: every figure is PREDICTED by the latency table {machine['predicted']['table']}, "
                     "not measured")
    notes += [f"warning: noisy measurement, IQR/median {s.relative_iqr:.0%} > {policy.remeasure_iqr:.0%} "
              f"after {policy.max_repeats} attempts" for s in (timed.stats, timed.other_stats) if s and s.noisy]
    record = measurement(opened, timed.stats, profile, policy, timed.mode, machine)
    report: dict = {"candidate": record, "threshold": config.threshold, "alpha": config.alpha, "notes": notes,
                    "foreign_baseline": foreign, "mode": timed.mode}
    v = None
    if reference is not None:
        v = verdict(timed.stats.samples, reference[1], config.threshold, config.alpha)
        report["verdict"], report["reference"] = v.to_dict(), reference[2]
        text = format_table(v, opened.path.name, reference[0], notes)
    else:
        text = "\n".join([*notes, f"{opened.path.name}: {_stats_row(timed.stats)}"])
    header = (f"{profile.name} ({profile.runtime}, {measured_profile['threads']} threads, batch {opened.batch}), "
              f"input {list(opened.input_shape)}, floors {policy.min_runs} runs / {policy.min_time_s:g} s, "
              f"{timed.mode}")
    if config.save_baseline:
        report["saved_baseline"] = str(save_baseline(config.save_baseline, record))
    if config.out:
        report["out"] = str(atomic_write_text(config.out, json.dumps(report, indent=2) + "\n"))
    return BenchResult(report, header + "\n" + text, v, notes)
