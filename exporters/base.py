"""The small interfaces every backend implements, and the helpers they share.

A Runtime opens an artifact as a Session that runs one prepared input and can
be timed (compressor.latency.timing). The Exporter, which turns an nn.Module
into an artifact, lives in exporter.py beside its export-validate-commit path.
"""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from compressor.errors import CompressorError, ExportError, InputError, MissingBackendError, first_line
from compressor.fileio import Staging  # the one staged write (the package's only import besides its errors)

__all__ = ["MissingBackendError", "Runtime", "Session", "Staging", "as_numpy", "boundary", "require"]


def require(module: str, backend: str, hint: str) -> object:
    """Import `module` for `backend`, or MissingBackendError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # also OSError-free ImportErrors raised by broken native libraries
        msg = f"{backend} needs the '{module}' package, which is not importable here ({e}); {hint}"
        raise MissingBackendError(msg) from e


@contextlib.contextmanager
def boundary(what: str, error: type[CompressorError] = ExportError) -> Iterator[None]:
    """Turn a library's own exception inside the block into `error` with one line naming `what`
    (torch.onnx, onnx.checker, torch.export, OpenVINO and TensorRT each raise their own types)."""
    try:
        yield
    except (CompressorError, OSError):  # ours already say what is wrong; a full disk is not a library failure
        raise
    except Exception as e:
        msg = f"{what} failed: {type(e).__name__}: {first_line(e)}"
        raise error(msg) from e


class Session(ABC):
    """A loaded artifact with one input prepared outside the timed region.

    `settings` records every runtime setting that affects a latency figure.
    """

    settings: dict

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """First output for input `x` (float32, NCHW)."""

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output for input `x`, in the artifact's order (a runtime that gives only one: that one)."""
        return [self.run(x)]

    @abstractmethod
    def prepare(self, x: np.ndarray) -> None:
        """Bind `x` so that `__call__` runs inference only."""

    @abstractmethod
    def __call__(self) -> object:
        """One timed inference on the prepared input."""

    def input_shape(self) -> list[int | None]:
        """The first input's shape as the artifact stores it (None: a symbolic dimension)."""
        msg = f"{type(self).__name__} does not report its input shape"
        raise InputError(msg)


class Runtime(ABC):
    """Opens artifacts of `artifact_format` with a profile's session settings."""

    name: str
    artifact_format: str

    @abstractmethod
    def open(self, artifact: Path, threads: int, options: dict | None = None) -> Session:
        """Load `artifact` with `threads` intra-op threads and runtime-specific `options`."""


def as_numpy(x) -> np.ndarray:
    """A float32 contiguous array from a tensor or array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, np.float32)
