"""The Exporter interface and its one export path: write, run, compare, commit.

Every backend writes its artifact into a private staging folder (`write`), runs
the staged artifact on its own runtime (`run_staged`), and only when the result
matches the reference within the backend's tolerance are the files renamed into
place, the main file last. Backends implement those two steps; nothing else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from compressor.errors import InputError, ValidationError
from exporters.base import Staging, as_numpy, boundary
from exporters.reference import reference_outputs


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
        self.outcome = ""  # what the last export did, in one sentence, where it is not the usual

    def export(self, model, example_input, path: Path, opset: int = 17) -> Path:
        """Write the artifact for `model` (an nn.Module, or an ONNX file where the backend takes one)
        at `path`, validated under a temporary name, then renamed. Returns `path` with this suffix."""
        path = self.artifact_path(path)
        with Staging(path) as stage:
            staged = stage.dir / path.name
            with boundary(f"{self.name} export of {path.name}"):
                names = self.write(model, example_input, staged, opset)
            x = as_numpy(example_input)
            with boundary(f"running the staged {self.name} artifact {path.name}"):
                got = self.run_staged(staged, x)
            got = got if isinstance(got, list) else [got]
            expected = reference_outputs(model, x)
            if len(got) != len(expected):
                msg = f"{path}: the artifact gives {len(got)} outputs, the model {len(expected)}"
                raise ValidationError(msg)
            for value, (name, reference) in zip(got, expected, strict=True):
                self.check_close(value, reference, str(path), name)
            stage.commit(names)
        return path

    @abstractmethod
    def write(self, model, example_input, staged: Path, opset: int) -> list[str]:
        """Write the artifact at `staged` (in a private folder); returns the file names written, main last."""

    @abstractmethod
    def run_staged(self, staged: Path, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Run the staged artifact on `x` with this backend's runtime (one thread): every output, in order
        (or its only output)."""

    def artifact_path(self, path: str | Path) -> Path:
        """`path` with this exporter's suffix (an IR named model.onnx would mislead every reader)."""
        path = Path(path)
        return path if path.suffix == self.suffix else path.with_suffix(self.suffix)

    def artifact_files(self, path: Path) -> list[Path]:
        """Every file that makes up the artifact at `path`."""
        return [Path(path)]

    def check_close(self, got: np.ndarray, expected: np.ndarray, what: str, output: str = "logits") -> float:
        """Largest absolute difference; ValidationError naming the output if out of tolerance (the check
        itself is trt_build.compare's, which the TensorRT bundle's build script runs on the device)."""
        from exporters.trt_build import MismatchError, compare

        try:
            return compare(got, expected, output, self.atol, self.rtol, self.range_rtol)
        except MismatchError as e:
            msg = f"{what}: {e} ({self.name} {self.precision})"
            raise ValidationError(msg) from e
