"""A pool of identical devices, and `connect`: a remote profile's device (one host) or pool (several).

An interleaved comparison always runs on one device: `time` takes the first
free device (the primary, in a job that measures one thing at a time).
`time_parts` splits the measurements of the latency table's design (a batch of
removal sets) across the pool, one job per device at a time, each job timing its
sets against the baseline on its own device, so no measured saving mixes figures
from two devices; the model is then fitted on all of them.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from compressor.errors import InputError
from compressor.latency.parallel_probe import probe_artifact
from compressor.latency.records import probe_summary
from compressor.latency.remote.device import RemoteDevice, open_devices
from compressor.latency.remote.transport import call
from compressor.latency.timing import Interleaved, TimingPolicy

IDENTITY_KEYS = ("cpu", "model", "logical_cores", "runtime_version")  # what "identical devices" must share


def chunks(n: int, k: int) -> list[list[int]]:
    """Indices 1..n split into k contiguous runs of near-equal length (index 0, the reference, is in none)."""
    base, extra = divmod(n, k)
    out, start = [], 1
    for i in range(k):
        size = base + (i < extra)
        out.append(list(range(start, start + size)))
        start += size
    return [c for c in out if c]


class DevicePool:
    """Several identical devices behind the Device interface."""

    def __init__(self, devices: list[RemoteDevice]) -> None:
        self.devices = devices
        first = devices[0].static
        for d in devices[1:]:
            differ = [f"{k} {first.get(k)!r} vs {d.static.get(k)!r}" for k in IDENTITY_KEYS
                      if d.static.get(k) != first.get(k)]
            if differ:
                msg = (f"remote.hosts must be identical devices: {devices[0].name} and {d.name} differ "
                       f"({'; '.join(differ)})")
                raise InputError(msg)

    @property
    def name(self) -> str:
        return ", ".join(d.name for d in self.devices)

    def _free(self) -> RemoteDevice:
        return next((d for d in self.devices if not d.lock.locked()), self.devices[0])

    def time(self, artifacts: Sequence[Path], policy: TimingPolicy, x: np.ndarray) -> Interleaved:
        """All of `artifacts` interleaved on one device (the first free one)."""
        return self._free().time(artifacts, policy, x)

    def time_parts(self, artifacts: Sequence[Path], policy: TimingPolicy, x: np.ndarray
                   ) -> list[tuple[list[int], Interleaved, str]]:
        """artifacts[1:] split across the devices in parallel, each part timed with artifacts[0] on one device:
        (indices into `artifacts`, 0 first; the measurement; the device's name) per part."""
        parts = chunks(len(artifacts) - 1, len(self.devices))

        async def measure(staging: Path) -> list[Interleaved]:
            return await asyncio.gather(*(
                d.time_async([artifacts[0], *(artifacts[i] for i in idx)], policy, x, staging / str(n))
                for n, (d, idx) in enumerate(zip(self.devices, parts, strict=False))))

        with tempfile.TemporaryDirectory() as staging:
            for n in range(len(parts)):
                (Path(staging) / str(n)).mkdir()
            results = call(measure(Path(staging)))
        return [([0, *idx], r, d.name) for d, idx, r in zip(self.devices, parts, results, strict=False)]

    def provenance(self) -> dict:
        """The primary device's provenance, with every device's and all their measurements."""
        own = [d.provenance() for d in self.devices]
        measurements = [m for p in own for m in p["measurements"]]
        speed = probe_summary(measurements)
        return {**own[0], "host": self.name, "measurements": measurements,
                **({"parallel_speedup": speed} if speed else {}),
                "pool": [{k: p.get(k) for k in ("host", "hostname", "model", "cpu", "runtime_version", "date")}
                         for p in own],
                "assignment": ("latency table: each batch of designed removal sets split across the pool, each part "
                               "timed against the baseline on the same device (latency_table.json "
                               "design.sessions[].device); every other "
                               f"comparison on one device, the first free one ({self.devices[0].name} when idle)"),
                **{k: any(p[k] for p in own) for k in ("throttled", "changing_conditions", "drifted")},
                "warnings": [w for p in own for w in p["warnings"]]}

    def close(self) -> None:
        for d in self.devices:
            d.close()


def connect(profile, backend, log: Callable[[str], None] | None = None) -> RemoteDevice | DevicePool:
    """Open the remote profile's device (or pool): upload the runner, probe, check the runtime version.
    A profile with `threads: null` gets the device's physical cores (set on `profile`)."""
    spec = profile.remote
    devices = [RemoteDevice(spec, e, profile.runtime, profile.threads, profile.runtime_options,
                            backend.exporter.artifact_files, log, lambda: probe_artifact(backend))
               for e in spec.endpoints]
    open_devices(devices)
    if profile.threads is None:
        profile.threads = devices[0].static["physical_cores"]
    for d in devices:
        d.threads = profile.threads
    if len(devices) == 1:
        return devices[0]
    try:
        return DevicePool(devices)
    except InputError:
        for d in devices:
            d.close()
        raise
