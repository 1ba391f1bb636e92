"""Where artifacts are timed: the one way to time several artifacts interleaved.

A Device opens artifacts with a backend's session settings and times them in
interleaved rounds by the protocol of timing.py. Everything that measures (the
prune job, the latency table, the regression gate, the benchmarks) goes
through `Device.time`, so a device that is not this machine can take its place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from compressor.latency.machine import machine_info
from compressor.latency.timing import Interleaved, TimingPolicy, measure_interleaved


class Device(Protocol):
    """Times artifacts; `provenance()` describes the machine that measured."""

    def time(self, artifacts: Sequence[Path], policy: TimingPolicy, x: np.ndarray) -> Interleaved:
        """Interleaved protocol measurement of `artifacts`, each run on input `x`."""

    def provenance(self) -> dict:
        """CPU, cores, OS, runtime versions and date of the machine that measures."""


class LocalDevice:
    """This machine: sessions opened by `backend` (an exporters.Backend) in this process."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def time(self, artifacts: Sequence[Path], policy: TimingPolicy, x: np.ndarray) -> Interleaved:
        sessions = [self.backend.open(a, x) for a in artifacts]
        return measure_interleaved(sessions, policy)

    def provenance(self) -> dict:
        return machine_info()
