"""The timing protocol of docs/measurement.md: cold start, warm-up, run/time floors, robust statistics, noise gate.

Free of torch on purpose, so a profiling bundle can take it to a device that
has only onnxruntime or openvino.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class TimingPolicy:
    """Floors for one measurement: run at least `min_runs` AND `min_time_s` seconds."""

    min_runs: int = 50
    min_time_s: float = 1.0
    warmup_runs: int = 10
    warmup_s: float = 0.5
    warn_iqr: float = 0.10  # IQR/median above this: warn
    remeasure_iqr: float = 0.25  # above this: measure again, up to `max_repeats` times
    max_repeats: int = 3

    @classmethod
    def from_dict(cls, d: dict) -> TimingPolicy:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass
class LatencyStats:
    """Latency statistics in milliseconds over `n` timed runs."""

    median: float
    min: float
    p90: float
    p99: float
    iqr: float
    n: int
    cold_ms: float | None = None
    noisy: bool = False
    warning: str | None = None
    samples: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], cold_ms: float | None = None,
                     policy: TimingPolicy | None = None) -> LatencyStats:
        a = np.asarray(samples_ms, dtype=float)
        q25, q50, q75, q90, q99 = np.percentile(a, [25, 50, 75, 90, 99])
        stats = cls(float(q50), float(a.min()), float(q90), float(q99), float(q75 - q25), len(a),
                    cold_ms, samples=[float(v) for v in a])
        policy = policy or TimingPolicy()
        if stats.relative_iqr > policy.warn_iqr:
            stats.warning = f"IQR/median = {stats.relative_iqr:.0%} > {policy.warn_iqr:.0%}"
        return stats

    @property
    def relative_iqr(self) -> float:
        return self.iqr / self.median if self.median > 0 else float("inf")

    def to_dict(self, with_samples: bool = False) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


def _timed(run: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - t0) / 1e6


def warm_up(run: Callable[[], object], policy: TimingPolicy) -> float:
    """Time the first run as the cold start (ms), then run untimed to the warm-up floors."""
    cold = _timed(run)
    t_end = time.perf_counter() + policy.warmup_s
    n = 0
    while n < policy.warmup_runs or time.perf_counter() < t_end:
        run()
        n += 1
    return cold


def _sample(run: Callable[[], object], policy: TimingPolicy) -> list[float]:
    samples: list[float] = []
    t_end = time.perf_counter() + policy.min_time_s
    while len(samples) < policy.min_runs or time.perf_counter() < t_end:
        samples.append(_timed(run))
    return samples


def measure(run: Callable[[], object], policy: TimingPolicy) -> LatencyStats:
    """One protocol measurement of `run`, re-measured while IQR/median stays above the gate."""
    cold = warm_up(run, policy)
    stats = LatencyStats.from_samples(_sample(run, policy), cold, policy)
    repeats = 1
    while stats.relative_iqr > policy.remeasure_iqr and repeats < policy.max_repeats:
        stats = LatencyStats.from_samples(_sample(run, policy), cold, policy)
        repeats += 1
    stats.noisy = stats.relative_iqr > policy.remeasure_iqr
    return stats


@dataclass
class Interleaved:
    """Per-model statistics from interleaved rounds, with per-round medians (ms)."""

    stats: list[LatencyStats]
    round_medians: list[list[float]]  # [model][round]

    def speedup(self, base: int = 0, other: int = 1) -> float:
        """median(base) / median(other) over the paired rounds."""
        return self.stats[base].median / self.stats[other].median

    def speedup_spread(self, base: int = 0, other: int = 1) -> float:
        """IQR/median of the per-round speedups: how much one round's ratio wanders."""
        r = np.asarray(self.round_medians[base]) / np.asarray(self.round_medians[other])
        q25, q50, q75 = np.percentile(r, [25, 50, 75])
        return float((q75 - q25) / q50)


def measure_interleaved(runs: Sequence[Callable[[], object]], policy: TimingPolicy,
                        burst: int = 5) -> Interleaved:
    """Measure several models in rounds A, B, C, A, B, C ... so drift hits all alike.

    Each round runs every model `burst` times back to back; rounds continue until
    every model has `min_runs` samples and the rounds took `min_time_s` x models.
    While any model's IQR/median exceeds the re-measure gate, all are measured
    again (up to `max_repeats` times); those still above it are flagged noisy.
    """
    colds = [warm_up(run, policy) for run in runs]
    for _ in range(max(1, policy.max_repeats)):
        samples: list[list[float]] = [[] for _ in runs]
        rounds: list[list[float]] = [[] for _ in runs]
        t_end = time.perf_counter() + policy.min_time_s * len(runs)
        while len(samples[0]) < policy.min_runs or time.perf_counter() < t_end:
            for i, run in enumerate(runs):
                chunk = [_timed(run) for _ in range(burst)]
                samples[i] += chunk
                rounds[i].append(float(np.median(chunk)))
        stats = [LatencyStats.from_samples(s, c, policy) for s, c in zip(samples, colds, strict=True)]
        if all(s.relative_iqr <= policy.remeasure_iqr for s in stats):
            break
    for s in stats:
        s.noisy = s.relative_iqr > policy.remeasure_iqr
    return Interleaved(stats, rounds)
