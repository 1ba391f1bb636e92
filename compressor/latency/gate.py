"""Latency regression gate: asv's rule on timing samples, and baselines with provenance.

Regression verdict (docs/measurement.md, asv's rule): a candidate regresses only if
median(candidate) / median(reference) exceeds the threshold (default 1.10)
AND a one-sided Mann-Whitney U test (candidate slower) gives p < alpha
(0.002). It is "faster" by the mirror rule: ratio < 1/threshold and the
opposite one-sided test p < alpha. Both numbers are always reported.

Free of torch on purpose, like timing.py. The `compressor bench` job is jobs/bench.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from compressor.errors import InputError
from compressor.fileio import atomic_write_text, refuse_existing_file
from compressor.latency.machine import MACHINE_KEYS, machine_differences

BASELINE_KIND = "compressor-bench-baseline"
DEFAULT_THRESHOLD = 1.10
DEFAULT_ALPHA = 0.002
PROFILE_KEYS = ("name", "runtime", "threads", "batch")


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


# ---------------------------------------------------------------- baselines


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
    reasons += [f"machine {difference}" for difference in machine_differences(baseline["machine"], machine)]
    return reasons


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
