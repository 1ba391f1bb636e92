"""The small interface every backend implements.

An Exporter turns an nn.Module (or an ONNX file) into an artifact, runs the
artifact and compares it with the source before it is written (temporary
name, then rename). A Runtime opens an artifact as a Session that runs one
prepared input and can be timed by compressor.timing (MEASURE.md).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from compressor.errors import InputError, ValidationError


class MissingBackendError(InputError):
    """An optional backend package is not installed (exit 2); says how to get it."""


def require(module: str, backend: str, hint: str) -> object:
    """Import `module` for `backend`, or MissingBackendError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # also OSError-free ImportErrors raised by broken native libraries
        msg = f"{backend} needs the '{module}' package, which is not importable here ({e}); {hint}"
        raise MissingBackendError(msg) from e


class Session(ABC):
    """A loaded artifact with one input prepared outside the timed region.

    `settings` records every runtime setting that affects a latency figure.
    """

    settings: dict

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """First output for input `x` (float32, NCHW)."""

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
    """nn.Module -> artifact, validated with this backend's tolerance for its precision.

    `TOLERANCES[precision] = (atol, rtol, range_rtol)` bounds, elementwise,
    |artifact - reference| <= atol + rtol * |reference| + range_rtol * max|reference|,
    where the reference is torch (or ONNX Runtime when exporting an ONNX file).
    The range term is for reduced precision, whose rounding error scales with
    the activations, not with each logit (a logit near 0 gets no rtol slack).
    """

    name: str
    suffix: str
    TOLERANCES: dict[str, tuple[float, float, float]] = {"fp32": (1e-4, 1e-3, 0.0)}

    def __init__(self, precision: str = "fp32") -> None:
        if precision not in self.TOLERANCES:
            msg = (f"export format {self.name!r} does not support precision {precision!r}; "
                   f"supported: {', '.join(self.TOLERANCES)}")
            raise InputError(msg)
        self.precision = precision
        self.atol, self.rtol, self.range_rtol = self.TOLERANCES[precision]

    @abstractmethod
    def export(self, model, example_input, path: Path, opset: int = 17) -> Path:
        """Write the artifact for `model` at `path` (validated under a temporary name, then renamed).

        Returns the artifact's path: `path` with this exporter's suffix.
        """

    def artifact_path(self, path: str | Path) -> Path:
        """`path` with this exporter's suffix (an IR named model.onnx would mislead every reader)."""
        path = Path(path)
        return path if path.suffix == self.suffix else path.with_suffix(self.suffix)

    def artifact_files(self, path: Path) -> list[Path]:
        """Every file that makes up the artifact at `path`."""
        return [Path(path)]

    def check_close(self, got: np.ndarray, expected: np.ndarray, what: str, output: str = "logits") -> float:
        """Largest absolute difference; ValidationError naming the output if out of tolerance."""
        if got.shape != expected.shape:
            msg = f"{what}: output {output!r} has shape {got.shape}, the reference has {expected.shape}"
            raise ValidationError(msg)
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        worst = float(np.nanmax(diff)) if diff.size else 0.0
        if diff.size and not np.all(np.isfinite(got)):
            worst = float("inf")
        scale = float(np.abs(expected).max()) if expected.size else 0.0
        allowed = self.atol + self.rtol * np.abs(expected) + self.range_rtol * scale
        if not np.all(diff <= allowed):
            ranged = f" + {self.range_rtol:g}*max|reference|" if self.range_rtol else ""
            msg = (f"{what}: output {output!r} differs from the reference by up to {worst:.3g} "
                   f"(tolerance {self.atol:g} + {self.rtol:g}*|reference|{ranged}, {self.name} {self.precision})")
            raise ValidationError(msg)
        return worst


def reference_output(model, x: np.ndarray) -> np.ndarray:
    """What the artifact must reproduce: torch's output, or ONNX Runtime's for an ONNX file."""
    if isinstance(model, (str, Path)):
        from exporters.onnxruntime import OnnxRuntimeSession

        return OnnxRuntimeSession(Path(model), 1).run(x)
    import torch

    with torch.no_grad():
        return model.eval()(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


def as_numpy(x) -> np.ndarray:
    """A float32 contiguous array from a tensor or array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, np.float32)


class Staging:
    """A private temporary folder beside `path`: build and validate the artifact there, then
    `commit` moves its files into place, the main file last; the folder is removed either way."""

    def __init__(self, path: Path) -> None:
        import tempfile

        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        except OSError as e:
            msg = f"cannot write to {self.path.parent}: {e.strerror or e}"
            raise InputError(msg) from e

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self, names: list[str]) -> None:
        """Move staged `names` (the main artifact last) beside `path`, each by an atomic rename."""
        import os

        for name in names:
            os.chmod(self.dir / name, 0o644)
            os.replace(self.dir / name, self.path.parent / name)
