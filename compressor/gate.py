"""Latency regression gate: asv's rule on timing samples, baselines with provenance, `compressor bench`.

Regression verdict (MEASURE.md, asv's rule): a candidate regresses only if
median(candidate) / median(reference) exceeds the threshold (default 1.10)
AND a one-sided Mann-Whitney U test (candidate slower) gives p < alpha
(0.002). It is "faster" by the mirror rule: ratio < 1/threshold and the
opposite one-sided test p < alpha. Both numbers are always reported.

Free of torch on purpose, like compressor.timing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from compressor.errors import InputError
from compressor.fileio import atomic_write_text, refuse_existing_file
from compressor.machine import machine_info
from compressor.profiles import Profile
from compressor.timing import LatencyStats, TimingPolicy, measure, measure_interleaved

BASELINE_KIND = "compressor-bench-baseline"
DEFAULT_THRESHOLD = 1.10
DEFAULT_ALPHA = 0.002
SUFFIXES = {"onnxruntime": ".onnx", "openvino": ".xml"}
PROFILE_KEYS = ("name", "runtime", "threads", "batch")
MACHINE_KEYS = ("cpu", "logical_cores")


# ---------------------------------------------------------------- statistics


@dataclass
class Side:
    """Summary of one side's samples (ms)."""

    median: float
    p90: float
    iqr: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Side:
        a = np.asarray(samples, dtype=float)
        q25, q50, q75, q90 = np.percentile(a, [25, 50, 75, 90])
        return cls(float(q50), float(q90), float(q75 - q25), len(a))


@dataclass
class Verdict:
    """asv's rule applied to candidate vs reference samples."""

    verdict: str  # "regression" | "no regression" | "faster"
    ratio: float  # median(candidate) / median(reference)
    p_value: float  # Mann-Whitney U, alternative="greater" (candidate slower)
    p_faster: float  # Mann-Whitney U, alternative="less" (candidate faster)
    threshold: float
    alpha: float
    candidate: Side
    reference: Side

    @property
    def regression(self) -> bool:
        return self.verdict == "regression"

    def to_dict(self) -> dict:
        return asdict(self)


def check_threshold(threshold: float) -> float:
    if not math.isfinite(threshold) or threshold <= 1:
        msg = f"--threshold must be a ratio greater than 1 (e.g. 1.10), got {threshold:g}"
        raise InputError(msg)
    return threshold


def verdict(candidate_samples: Sequence[float], reference_samples: Sequence[float],
            threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA) -> Verdict:
    """Regression only if median ratio > threshold AND Mann-Whitney U p (candidate > reference) < alpha."""
    from scipy.stats import mannwhitneyu

    check_threshold(threshold)
    c = np.asarray(candidate_samples, dtype=float)
    r = np.asarray(reference_samples, dtype=float)
    if len(c) == 0 or len(r) == 0:
        msg = "the gate needs at least one sample on each side"
        raise InputError(msg)
    cs, rs = Side.of(c), Side.of(r)
    ratio = cs.median / rs.median if rs.median > 0 else math.inf
    p_slower = float(mannwhitneyu(c, r, alternative="greater").pvalue)
    p_faster = float(mannwhitneyu(c, r, alternative="less").pvalue)
    if ratio > threshold and p_slower < alpha:
        outcome = "regression"
    elif ratio < 1 / threshold and p_faster < alpha:
        outcome = "faster"
    else:
        outcome = "no regression"
    return Verdict(outcome, ratio, p_slower, p_faster, threshold, alpha, cs, rs)


def _p(p: float) -> str:
    return "< 1e-300" if p == 0 else f"{p:.3g}"  # float underflow with thousands of samples


def format_table(v: Verdict, candidate: str = "candidate", reference: str = "reference",
                 notes: Sequence[str] = ()) -> str:
    """A plain-text verdict table; `notes` (warnings) come first so nobody misses them."""
    w = max(len(candidate), len(reference), 12)
    lines = [*notes]
    lines.append(f"{'':<14}{'candidate':>{w}}  {'reference':>{w}}")
    lines.append(f"{'':<14}{candidate:>{w}}  {reference:>{w}}")
    for label, key, fmt in (("median (ms)", "median", ".4f"), ("p90 (ms)", "p90", ".4f"),
                            ("IQR (ms)", "iqr", ".4f"), ("n", "n", "d")):
        a, b = getattr(v.candidate, key), getattr(v.reference, key)
        lines.append(f"{label:<14}{a:>{w}{fmt}}  {b:>{w}{fmt}}")
    lines.append(f"ratio (candidate / reference median) = {v.ratio:.3f}   threshold {v.threshold:.3f}")
    lines.append(f"Mann-Whitney U p (candidate slower) = {_p(v.p_value)}   alpha {v.alpha:g}"
                 f"   (p candidate faster = {_p(v.p_faster)})")
    lines.append(f"verdict: {v.verdict.upper() if v.regression else v.verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------- artifacts


def artifact_files(path: Path, runtime: str) -> list[Path]:
    return [path, path.with_suffix(".bin")] if runtime == "openvino" else [path]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_artifact(path: str | Path, profile: Profile) -> Path:
    path = Path(path)
    if profile.runtime not in SUFFIXES:
        msg = (f"bench times onnxruntime (.onnx) and openvino (.xml) artifacts; profile {profile.name!r} "
               f"uses runtime {profile.runtime!r}")
        raise InputError(msg)
    want = SUFFIXES[profile.runtime]
    if path.suffix != want:
        msg = f"artifact {path} is not a {want} file, which runtime {profile.runtime} of profile {profile.name} needs"
        raise InputError(msg)
    if not path.is_file():
        msg = f"artifact not found: {path}"
        raise InputError(msg)
    return path


def _input_shape(session, profile: Profile) -> tuple[int, ...]:
    """The first input's shape as stored in the artifact; a symbolic batch becomes the profile's batch."""
    if profile.runtime == "onnxruntime":
        dims = list(session.session.get_inputs()[0].shape)
    else:
        partial = session.compiled.input(0).get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in partial]
    shape = [d if isinstance(d, int) and d > 0 else None for d in dims]
    if shape and shape[0] is None:
        shape[0] = profile.batch
    if profile.input_shape and len(shape) == 4:
        shape[1:] = [s if s is not None else p for s, p in zip(shape[1:], profile.input_shape, strict=True)]
    if not shape or any(d is None for d in shape):
        msg = f"the artifact's input shape {dims} is not static; give the profile an input_shape"
        raise InputError(msg)
    return tuple(shape)


@dataclass
class OpenedArtifact:
    path: Path
    session: object
    input_shape: tuple[int, ...]
    files: dict[str, str]  # file -> sha256

    @property
    def batch(self) -> int:
        return self.input_shape[0]


def open_artifact(path: str | Path, profile: Profile) -> OpenedArtifact:
    """Open `path` on the profile's runtime and session settings, prepared with a fixed random input."""
    from exporters import get_runtime

    path = check_artifact(path, profile)
    session = get_runtime(profile.runtime).open(path, profile.resolved_threads, profile.runtime_options)
    shape = _input_shape(session, profile)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    try:
        session.prepare(x)
        session()
    except InputError:
        raise
    except Exception as e:  # a runtime's own error type for an artifact that loads but does not run
        msg = f"cannot run {path} on {profile.runtime}: {str(e).strip().splitlines()[0][:200]}"
        raise InputError(msg) from e
    files = {str(f): sha256(f) for f in artifact_files(path, profile.runtime) if f.is_file()}
    return OpenedArtifact(path, session, shape, files)


def bench_profile(profile: Profile, batch: int) -> Profile:
    """The profile as measured: the batch is the artifact's."""
    return dataclasses.replace(profile, batch=batch)


# ---------------------------------------------------------------- baselines


def measurement(opened: OpenedArtifact, stats: LatencyStats, profile: Profile, policy: TimingPolicy,
                mode: str) -> dict:
    """One artifact's measurement with provenance: what a baseline file holds."""
    return {
        "kind": BASELINE_KIND, "version": 1,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "artifact": {"path": str(opened.path.resolve()), "sha256": opened.files.get(str(opened.path)),
                     "files": opened.files, "input_shape": list(opened.input_shape)},
        "profile": bench_profile(profile, opened.batch).to_dict(),
        "session": getattr(opened.session, "settings", {}),
        "machine": machine_info(), "policy": vars(policy), "mode": mode,
        "stats": stats.to_dict(), "samples": stats.samples,
    }


def save_baseline(path: str | Path, record: dict) -> Path:
    refuse_existing_file(path)
    return atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def load_baseline(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        msg = f"baseline not found: {path}"
        raise InputError(msg) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"baseline {path} is not valid JSON: {e}"
        raise InputError(msg) from e
    if not isinstance(data, dict) or data.get("kind") != BASELINE_KIND:
        msg = f"baseline {path} is not a `compressor bench --save-baseline` file"
        raise InputError(msg)
    samples = data.get("samples")
    if (not isinstance(samples, list) or not samples
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
                       for s in samples)):
        msg = f"baseline {path}: 'samples' must be a non-empty list of positive latencies (ms)"
        raise InputError(msg)
    for key, needed in (("profile", PROFILE_KEYS), ("machine", MACHINE_KEYS)):
        if not isinstance(data.get(key), dict) or any(k not in data[key] for k in needed):
            msg = f"baseline {path}: {key!r} must be a mapping with {', '.join(needed)}"
            raise InputError(msg)
    return data


def foreign_reasons(baseline: dict, profile: dict, machine: dict) -> list[str]:
    """Why the baseline was not measured under the same profile on the same kind of machine (empty: it was)."""
    reasons = [f"profile {k} {baseline['profile'][k]!r} != {profile[k]!r}"
               for k in PROFILE_KEYS if baseline["profile"][k] != profile[k]]
    reasons += [f"machine {k} {baseline['machine'][k]!r} != {machine[k]!r}"
                for k in MACHINE_KEYS if baseline["machine"][k] != machine[k]]
    return reasons


# ---------------------------------------------------------------- the command


@dataclass
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


def run_bench(config: BenchConfig) -> BenchResult:
    """Measure the artifact (alone, or interleaved with --against) and judge it against the reference."""
    check_threshold(config.threshold)
    if config.baseline and config.against:
        msg = "give either --baseline or --against, not both"
        raise InputError(msg)
    _check_outputs(config)
    baseline = load_baseline(config.baseline) if config.baseline else None
    policy = policy_for(config)
    profile = config.profile
    opened = open_artifact(config.artifact, profile)
    measured_profile = bench_profile(profile, opened.batch).to_dict()
    machine = machine_info()
    notes: list[str] = []
    foreign: list[str] = []
    if baseline is not None:
        foreign = foreign_reasons(baseline, measured_profile, machine)
        if foreign and not config.allow_foreign_baseline:
            msg = (f"baseline {config.baseline} is foreign ({'; '.join(foreign)}); "
                   "re-measure it here or pass --allow-foreign-baseline")
            raise InputError(msg)
        if foreign:
            notes.append(f"!!! FOREIGN BASELINE (allowed by --allow-foreign-baseline): {'; '.join(foreign)}. "
                         "The verdict compares different setups and is NOT a like-for-like regression check.")

    reference_name = None
    other = None
    if config.against:
        other = open_artifact(config.against, profile)
        if other.input_shape != opened.input_shape:
            msg = f"--against {other.path} takes input {list(other.input_shape)}, {opened.path} takes " \
                  f"{list(opened.input_shape)}"
            raise InputError(msg)
        result = measure_interleaved([opened.session, other.session], policy)
        stats, ref_stats = result.stats
        reference_samples = ref_stats.samples
        reference_name = other.path.name
        mode = "interleaved"
    else:
        stats = measure(opened.session, policy)
        mode = "separate"
        ref_stats = None
        if baseline is not None:
            reference_samples = baseline["samples"]
            reference_name = f"baseline {Path(config.baseline).name}"
            notes.append("note: the baseline was measured in another run (not interleaved); drift between runs on "
                         "a shared machine moves medians by 10% or more (MEASURE.md), so prefer --against in CI.")
            if baseline.get("artifact", {}).get("sha256") == opened.files.get(str(opened.path)):
                notes.append("note: the baseline was measured on this very artifact (same sha256).")

    for s in (stats, ref_stats):
        if s is not None and s.noisy:
            notes.append(f"warning: noisy measurement, IQR/median {s.relative_iqr:.0%} "
                         f"> {policy.remeasure_iqr:.0%} after {policy.max_repeats} attempts")

    record = measurement(opened, stats, profile, policy, mode)
    report: dict = {"candidate": record, "threshold": config.threshold, "alpha": config.alpha, "notes": notes,
                    "foreign_baseline": foreign, "mode": mode}
    v = None
    if reference_name is not None:
        v = verdict(stats.samples, reference_samples, config.threshold, config.alpha)
        report["verdict"] = v.to_dict()
        if other is not None:
            report["reference"] = measurement(other, ref_stats, profile, policy, mode)
        else:
            report["reference"] = {k: baseline.get(k) for k in ("artifact", "profile", "machine", "date", "stats")}
            report["reference"]["baseline_file"] = str(config.baseline)
        text = format_table(v, opened.path.name, reference_name, notes)
    else:
        text = "\n".join([*notes, f"{opened.path.name}: {_stats_row(stats)}"])
    header = (f"{profile.name} ({profile.runtime}, {measured_profile['threads']} threads, batch {opened.batch}), "
              f"input {list(opened.input_shape)}, floors {policy.min_runs} runs / {policy.min_time_s:g} s, {mode}")
    text = header + "\n" + text
    if config.save_baseline:
        report["saved_baseline"] = str(save_baseline(config.save_baseline, record))
    if config.out:
        report["out"] = str(atomic_write_text(config.out, json.dumps(report, indent=2) + "\n"))
    return BenchResult(report, text, v, notes)
