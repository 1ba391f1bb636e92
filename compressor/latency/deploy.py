"""A profile made concrete for one model's input: export for its runtime, validate, time.

`Deployment.export` exports what is deployed (linearised blocks merged into one
conv, BatchNorm folded) through the profile's backend (exporters.Backend), and
`Deployment.time` measures through the profile's device (device.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from compressor.latency.device import Device, device_for
from compressor.latency.profiles import Profile
from compressor.latency.timing import Interleaved, TimingPolicy
from compressor.rewrite.fold import fold_batchnorm
from compressor.rewrite.linearised import merge_linearised


def deployable(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """What is exported: linearised blocks merged into one conv, then BatchNorm folded (the model captured on
    `example_input`, and the fold checked on it)."""
    return fold_batchnorm(merge_linearised(model), example_input)[0]


class Deployment:
    """Exports models for a profile's runtime and times them on its device."""

    def __init__(self, profile: Profile, input_shape: tuple[int, ...], device: Device | None = None) -> None:
        from exporters import Backend

        self.profile = profile
        self.backend = Backend(profile.runtime, profile.precision, profile.resolved_threads,
                               profile.runtime_options, profile.opset)
        self.exporter = self.backend.exporter
        self.runtime = self.backend.runtime
        self.input_shape = (profile.batch, *(profile.input_shape or input_shape))
        self.example = torch.randn(*self.input_shape, generator=torch.Generator().manual_seed(0))
        self.device: Device = device or device_for(profile, self.backend)

    def export(self, model: nn.Module, path: Path) -> Path:
        """Export `deployable(model)`; returns the artifact path (`path` with the exporter's suffix)."""
        return self.backend.export(deployable(model, self.example), self.example, path)

    def validate(self, artifact: Path, model: nn.Module, x: torch.Tensor) -> float:
        """Run `artifact` on `x` and compare every output with torch's (linearised blocks merged, as
        exported); returns the largest |difference|."""
        from exporters.reference import reference_outputs

        expected = reference_outputs(merge_linearised(model), x.numpy())
        return self.backend.check_outputs(artifact, x, expected, self.profile.batch)

    def open(self, artifact: Path):
        return self.backend.open(artifact, self.example)

    def time(self, artifacts: Sequence[Path], policy: TimingPolicy) -> Interleaved:
        """Interleaved protocol measurement of several artifacts on the example input."""
        return self.device.time(artifacts, policy, self.example.numpy())
