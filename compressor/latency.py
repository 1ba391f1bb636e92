"""Measured latency on a profile's runtime: export, open, time; and per-unit lookup tables.

The saving of unit u = median(model) - median(model without u), both measured
as whole exported models in interleaved rounds, so runtime fusion is included.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from compressor.errors import InputError
from compressor.fileio import atomic_write_text
from compressor.fold import fold_batchnorm
from compressor.machine import machine_info
from compressor.profiles import Profile
from compressor.surgery import remove_units
from compressor.timing import Interleaved, TimingPolicy, measure_interleaved
from compressor.units import Unit
from exporters import get_exporter, get_runtime


class Deployment:
    """Exports models for a profile's runtime and opens them as timed sessions."""

    def __init__(self, profile: Profile, input_shape: tuple[int, ...]) -> None:
        self.profile = profile
        self.runtime = get_runtime(profile.runtime)
        self.exporter = get_exporter(self.runtime.artifact_format, precision=profile.precision)
        self.input_shape = (profile.batch, *(profile.input_shape or input_shape))
        self.example = torch.randn(*self.input_shape, generator=torch.Generator().manual_seed(0))
        self.sessions: list = []

    def export(self, model: nn.Module, path: Path) -> Path:
        """Merge linearised blocks, fold BatchNorm, export, and return the artifact path (`path`
        with the exporter's suffix)."""
        from compressor.merge_units import merge_linearised

        folded, _ = fold_batchnorm(merge_linearised(model))
        return self.exporter.export(folded, self.example, path, self.profile.opset)

    def validate(self, artifact: Path, model: nn.Module, x: torch.Tensor) -> float:
        """Run `artifact` on `x` and compare with torch (linearised blocks merged, as exported);
        returns the largest |difference|."""
        from compressor.merge_units import merge_linearised

        with torch.no_grad():
            expected = merge_linearised(model).eval()(x).numpy()
        batch = self.profile.batch
        usable = len(x) // batch * batch  # the artifact has a static batch size
        if usable == 0:
            msg = f"validation needs at least {batch} inputs for the profile's batch size"
            raise InputError(msg)
        session = self.open(artifact)
        got = np.concatenate([session.run(x[i:i + batch].numpy()) for i in range(0, usable, batch)])
        return self.exporter.check_close(got, expected[:usable], str(artifact))

    def open(self, artifact: Path):
        session = self.runtime.open(artifact, self.profile.resolved_threads, self.profile.runtime_options)
        session.prepare(self.example.numpy())
        return session

    def time(self, artifacts: Sequence[Path], policy: TimingPolicy) -> Interleaved:
        """Interleaved protocol measurement of several artifacts (same input)."""
        sessions = [self.open(a) for a in artifacts]
        return measure_interleaved(sessions, policy)


@dataclass
class LatencyTable:
    """Per-unit latency savings (ms) on one profile and machine, with provenance."""

    model: str
    input_shape: list[int]
    profile: dict
    machine: dict
    baseline_ms: float
    savings_ms: dict[str, float]
    stats: dict[str, dict] = field(default_factory=dict)

    def predict(self, removed: Sequence[str]) -> float:
        """Predicted latency (ms) with `removed` units gone: baseline - sum of savings."""
        return self.baseline_ms - sum(self.savings_ms[u] for u in removed)

    def to_json(self) -> str:
        return json.dumps(vars(self), indent=2)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            msg = f"{path} is not a latency table JSON: {e}"
            raise InputError(msg) from e


def measure_latency_table(model: nn.Module, units: list[Unit], deployment: Deployment,
                          name: str, workdir: Path | None = None) -> LatencyTable:
    """Export the model and each single-unit removal, time all in interleaved rounds."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        suffix = deployment.exporter.suffix
        paths = [deployment.export(model, Path(tmp) / f"baseline{suffix}")]
        for i, unit in enumerate(tqdm(units, desc="export candidates", disable=None, leave=False)):
            paths.append(deployment.export(remove_units(model, [unit]), Path(tmp) / f"unit{i}{suffix}"))
        result = deployment.time(paths, deployment.profile.search_policy)
    base = result.stats[0]
    savings = {u.name: base.median - s.median for u, s in zip(units, result.stats[1:], strict=True)}
    stats = {"baseline": base.to_dict()}
    stats.update({u.name: s.to_dict() for u, s in zip(units, result.stats[1:], strict=True)})
    return LatencyTable(name, list(deployment.input_shape), deployment.profile.to_dict(),
                        machine_info(), base.median, savings, stats)
