"""The figures a bench bundle's measure.py wrote on the device, as a Device (`compressor bench --results`).

`time` does not time anything: it returns the device's figures for the artifacts
asked for, found by the sha256 of their files, so the bench's verdict and
baseline are computed from the device's samples exactly as from a live device.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from compressor.errors import InputError
from compressor.latency.profiles import Profile
from compressor.latency.remote.bundle import RESULTS_KIND
from compressor.latency.remote.device import files_key
from compressor.latency.timing import Interleaved, LatencyStats, TimingPolicy


class ResultsDevice:
    """Figures measured on a device from a bench bundle, served by artifact sha256."""

    def __init__(self, data: dict, path: Path, artifact_files) -> None:
        self.data, self.path, self.artifact_files = data, path, artifact_files
        self.by_key = {a["sha256"]: i for i, a in enumerate(data["artifacts"])}
        self.notes: list[str] = []

    @classmethod
    def load(cls, path: str | Path, profile: Profile, backend) -> ResultsDevice:
        """Read and check a results file: its kind, and that it was measured for this profile."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            msg = f"--results {path} is not readable JSON: {e}"
            raise InputError(msg) from e
        if not isinstance(data, dict) or data.get("kind") != RESULTS_KIND or data.get("version") != 1:
            msg = f"--results {path} is not a bench bundle's results (from measure.py of `compressor bench --bundle`)"
            raise InputError(msg)
        measured = data.get("profile") or {}
        if (measured.get("name"), measured.get("runtime")) != (profile.name, profile.runtime):
            msg = (f"--results {path} was measured on profile {measured.get('name')!r} ({measured.get('runtime')}), "
                   f"not {profile.name!r} ({profile.runtime})")
            raise InputError(msg)
        if measured.get("threads") is not None and profile.threads is None:
            profile.threads = measured["threads"]  # threads: null meant the device's cores
        return cls(data, path, backend.exporter.artifact_files)

    @property
    def name(self) -> str:
        return self.data["machine"].get("hostname", str(self.path))

    def time(self, artifacts: Sequence[Path], policy: TimingPolicy, x: np.ndarray) -> Interleaved:
        """The device's figures for `artifacts`, in their order; InputError for one it did not measure."""
        indices = []
        for artifact in artifacts:
            key = files_key(self.artifact_files(Path(artifact)))
            if key not in self.by_key:
                msg = (f"--results {self.path} has no figures for {artifact} (sha256 {key[:12]}...): it was not in "
                       "the bundle, or it changed since")
                raise InputError(msg)
            indices.append(self.by_key[key])
        floors = {k: self.data["policy"].get(k) for k in ("min_runs", "min_time_s")}
        if floors != {"min_runs": policy.min_runs, "min_time_s": policy.min_time_s}:
            self.notes.append(f"note: the device timed at {floors['min_runs']} runs / {floors['min_time_s']:g} s, "
                              f"not the {policy.min_runs} runs / {policy.min_time_s:g} s asked for here")
        stats = [LatencyStats(**self.data["artifacts"][i]["stats"]) for i in indices]
        return Interleaved(stats, [self.data["round_medians"][i] for i in indices])

    def provenance(self) -> dict:
        return {**self.data["machine"], "results_file": str(self.path), "warnings": [
            *self.data["machine"].get("warnings", []), *self.notes]}

    def close(self) -> None:
        """Nothing to release."""
