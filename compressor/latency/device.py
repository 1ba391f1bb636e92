"""Where artifacts are timed: the one way to time several artifacts interleaved.

A Device opens artifacts with a backend's session settings and times them in
interleaved rounds by the protocol of timing.py. Everything that measures (the
prune job, the latency table, the regression gate, the benchmarks) goes
through `Device.time`, so a device that is not this machine can take its place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from compressor.latency.machine import machine_info
from compressor.latency.parallel_probe import open_probe, spread_warnings
from compressor.latency.records import probe_frame, probe_summary
from compressor.latency.timing import Interleaved, TimingPolicy, measure_interleaved


class Device(Protocol):
    """Times artifacts; `provenance()` describes the machine that measured."""

    def time(self, artifacts: Sequence[Path], policy: TimingPolicy, x: np.ndarray) -> Interleaved:
        """Interleaved protocol measurement of `artifacts`, each run on input `x`."""

    def provenance(self) -> dict:
        """CPU, cores, OS, runtime versions and date of the machine that measures."""


class LocalDevice:
    """This machine: sessions opened by `backend` (an exporters.Backend) in this process. With several
    threads and `policy.parallel_probe`, each measurement is framed by the parallel probe
    (parallel_probe.py), and `provenance()` carries what it saw."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.measurements: list[dict] = []
        self.warnings: list[str] = []
        self._probe: object | None = None
        self._probe_opened = False

    def time(self, artifacts: Sequence[Path], policy: TimingPolicy, x: np.ndarray) -> Interleaved:
        sessions = [self.backend.open(a, x) for a in artifacts]
        probe = self._parallel_probe() if policy.parallel_probe else None
        if probe is None:
            return measure_interleaved(sessions, policy)
        t0, before = time.perf_counter(), probe.measure()
        result = measure_interleaved(sessions, policy)
        self.measurements.append(probe_frame(before, probe.measure(), time.perf_counter() - t0))
        return result

    def _parallel_probe(self):
        """The probe, opened at the first measurement that asks for it (None where it cannot run)."""
        if not self._probe_opened:
            self._probe_opened = True
            self._probe, why_not = open_probe(self.backend)
            self.warnings += [why_not] if why_not else []
        return self._probe

    def provenance(self) -> dict:
        """machine_info(), with every probed measurement so far, a summary of their probes, whether any was
        taken under changing conditions, and warnings where the probes spread beyond their tolerances."""
        info = machine_info()
        if not self.measurements and not self.warnings:
            return info
        speed = probe_summary(self.measurements)
        warnings = [*self.warnings, *spread_warnings(speed)]
        return {**info, "parallel_speedup": speed, "measurements": list(self.measurements),
                "changing_conditions": any(m["changing"] for m in self.measurements), "warnings": warnings}

    def close(self) -> None:
        """Nothing to release on this machine."""


@dataclass
class Part:
    """One device's interleaved measurement of some artifacts: `indices` into the list timed, the
    reference (index 0) first; `device` names the device (None: this machine)."""

    indices: list[int]
    result: Interleaved
    device: str | None = None


def time_parts(device: Device, artifacts: Sequence[Path], policy: TimingPolicy, x: np.ndarray) -> list[Part]:
    """artifacts[1:] each timed against artifacts[0]: one interleaved measurement on one device, or, on a
    pool (a device with `time_parts`), one part per device in parallel, each with artifacts[0] (the
    latency table's designed sets are split so: a pool splits a design's measurements, not its units)."""
    split = getattr(device, "time_parts", None)
    if split is None:
        return [Part(list(range(len(artifacts))), device.time(artifacts, policy, x), getattr(device, "name", None))]
    return [Part(indices, result, name) for indices, result, name in split(artifacts, policy, x)]


def device_for(profile, backend=None, log: Callable[[str], None] | None = None) -> Device:
    """The profile's device: its remote host (or pool of hosts) over SSH when it has a `remote:` section
    (compressor/latency/remote/), a latency table replayed for `runtime: table` (replay.py: predicted, not
    timed), else this machine; `backend` (an exporters.Backend) is the profile's unless given."""
    if profile.runtime == "table":
        from compressor.latency.replay import table_device

        return table_device(profile)
    if backend is None:
        from exporters import Backend

        backend = Backend(profile.runtime, profile.precision, profile.resolved_threads, profile.runtime_options,
                          profile.opset)
    if getattr(profile, "remote", None) is not None:
        from compressor.latency.remote.pool import connect

        return connect(profile, backend, log)
    return LocalDevice(backend)


def close_device(device: object) -> None:
    """Release what a device holds (a remote session's folder and connection); any object may be passed."""
    close = getattr(device, "close", None)
    if close is not None:
        close()
