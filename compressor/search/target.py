"""Latency targets: a speedup over the unpruned model or a latency in ms, and when a measured
candidate meets one.

A speedup target is judged on interleaved rounds of baseline and candidate, a
latency target on the candidate's protocol median (docs/measurement.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compressor.errors import InputError

MIN_MARGIN, MAX_MARGIN = 0.01, 0.05
OVERSHOOT_BAND = 0.06  # a pass more than this fraction under the aimed latency is refined


@dataclass(frozen=True)
class Target:
    """Either a latency in ms or a speedup over the unpruned model."""

    ms: float | None = None
    speedup: float | None = None

    def __post_init__(self) -> None:
        if (self.ms is None) == (self.speedup is None):
            msg = "give exactly one of --target-ms and --target-speedup"
            raise InputError(msg)
        if self.ms is not None and not (isinstance(self.ms, (int, float)) and 0 < self.ms < math.inf):
            msg = f"--target-ms must be a positive number of milliseconds (finite), got {self.ms}"
            raise InputError(msg)
        if self.speedup is not None and not (isinstance(self.speedup, (int, float)) and 1 < self.speedup < math.inf):
            msg = f"--target-speedup must be greater than 1 (finite), got {self.speedup}"
            raise InputError(msg)

    def describe(self) -> str:
        return f"{self.ms} ms" if self.ms is not None else f"{self.speedup}x speedup"

    def goal_ms(self, baseline_ms: float) -> float:
        """The candidate latency (ms) that meets the target, in the frame of `baseline_ms`."""
        return self.ms if self.ms is not None else baseline_ms / self.speedup


# Speedup and Latency are the two spellings of Target, alike on purpose: one constructor argument each
@dataclass(frozen=True, init=False, repr=False)
class Speedup(Target):
    """Target: the pruned model `x` times faster than the unpruned one, measured interleaved."""

    def __init__(self, x: float) -> None:
        super().__init__(speedup=x)

    def __repr__(self) -> str:
        return f"Speedup({self.speedup})"


@dataclass(frozen=True, init=False, repr=False)
class Latency(Target):
    """Target: the pruned model's median latency at most `ms` milliseconds on the profile."""

    def __init__(self, ms: float) -> None:
        super().__init__(ms=ms)

    def __repr__(self) -> str:
        return f"Latency(ms={self.ms})"


@dataclass
class Measured:
    """One candidate measured against the baseline in interleaved rounds (ms)."""

    baseline_ms: float
    candidate_ms: float
    spread: float  # IQR/median of the per-round speedups
    noisy: bool = False
    refused: bool = False  # the candidate was not timed (its INT8 fell below the fidelity floor)

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.candidate_ms


def margin_from(spread: float) -> float:
    """Aim under the target by half the per-round spread, within [1%, 5%]."""
    return min(MAX_MARGIN, max(MIN_MARGIN, spread / 2))


def meets(target: Target, m: Measured, margin: float) -> bool:
    if target.speedup is not None:
        return m.speedup >= target.speedup * (1 + margin)
    return m.candidate_ms <= target.ms * (1 - margin)


def required_fraction(target: Target, baseline_ms: float, margin: float) -> float:
    """The fraction of the baseline latency that must go to meet `target` with `margin`."""
    return 1.0 - target.goal_ms(baseline_ms) * (1 - margin) / baseline_ms
