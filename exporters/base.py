"""The small interface every backend implements.

An Exporter turns an nn.Module into an artifact file and checks the artifact
against torch before it is written. A Runtime opens an artifact as a Session
that runs one prepared input and can be timed by compressor.timing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from compressor.errors import ValidationError


class Session(ABC):
    """A loaded artifact with one input prepared outside the timed region."""

    settings: dict

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs for input `x` (float32, NCHW)."""

    @abstractmethod
    def prepare(self, x: np.ndarray) -> None:
        """Bind `x` so that `__call__` runs inference only."""

    @abstractmethod
    def __call__(self) -> object:
        """One timed inference on the prepared input."""


class Runtime(ABC):
    """Opens artifacts of `artifact_format` with a profile's session settings."""

    name: str
    artifact_format: str

    @abstractmethod
    def open(self, artifact: Path, threads: int, options: dict | None = None) -> Session:
        """Load `artifact` with `threads` intra-op threads and runtime-specific `options`."""


class Exporter(ABC):
    """nn.Module -> artifact, validated against torch with this backend's tolerance.

    `atol`/`rtol` bound |artifact - torch| <= atol + rtol * |torch| elementwise.
    """

    name: str
    suffix: str
    atol: float
    rtol: float

    @abstractmethod
    def export(self, model, example_input, path: Path, opset: int) -> Path:
        """Write the artifact for `model` at `path` (a temporary file, then renamed)."""

    def check_close(self, got: np.ndarray, expected: np.ndarray, what: str) -> float:
        """Largest absolute difference; ValidationError naming the output if out of tolerance."""
        if got.shape != expected.shape:
            msg = f"{what}: output shape {got.shape} differs from torch's {expected.shape}"
            raise ValidationError(msg)
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        worst = float(diff.max()) if diff.size else 0.0
        allowed = self.atol + self.rtol * np.abs(expected)
        if not np.all(diff <= allowed):
            msg = (f"{what}: output 'logits' differs from torch by up to {worst:.3g} "
                   f"(tolerance {self.atol:g} + {self.rtol:g}*|torch|)")
            raise ValidationError(msg)
        return worst
