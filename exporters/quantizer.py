"""The Quantizer interface and its one path: quantize, run on held-out images, accept, commit.

A quantized artifact cannot match its fp32 model to 1e-4, so it is not checked
with an exporter's tolerance: the staged artifact is run on held-out images and
the caller's `accept` decides from its logits (compressor.quantize judges them
against the fp32 model: top-1 agreement, SQNR, KL, accuracy). Only when
`accept` returns are the files renamed into place, the main file last; when it
raises, the staging folder is removed and nothing is written. This package
computes no fidelity metric itself: it imports nothing from compressor but the
errors, so what "good enough" means is passed in.
"""

from __future__ import annotations

import contextlib
import io
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from compressor.errors import FidelityFloorError, InputError
from exporters.base import Staging, as_numpy, boundary

METHODS = ("minmax", "entropy", "percentile")  # ONNX Runtime's calibration methods
PRESETS = ("performance", "mixed")  # NNCF: symmetric activations (fastest) or asymmetric


@dataclass(frozen=True)
class QuantizeSettings:
    """What a quantizer is asked for; each quantizer reports the settings it actually used (`describe`).

    method: ONNX Runtime's calibration (minmax, entropy, percentile); per_channel: one weight scale per
    output channel (False: one per tensor, which collapses depthwise models); preset: NNCF's
    (performance: symmetric activations); fast_bias_correction: NNCF's; exclude: layers kept in fp32,
    by ONNX node name (the fallback's); percentile: ONNX Runtime's CalibPercentile for method percentile.
    """

    method: str = "minmax"
    per_channel: bool = True
    preset: str = "performance"
    fast_bias_correction: bool = True
    exclude: tuple[str, ...] = ()
    percentile: float = 99.999

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            msg = f"unknown calibration method {self.method!r}; known: {', '.join(METHODS)}"
            raise InputError(msg)
        if self.preset not in PRESETS:
            msg = f"unknown quantization preset {self.preset!r}; known: {', '.join(PRESETS)}"
            raise InputError(msg)
        if not 0 < self.percentile <= 100:
            msg = f"percentile must be in (0, 100], got {self.percentile}"
            raise InputError(msg)

    def excluding(self, layers: Sequence[str]) -> QuantizeSettings:
        """These settings with `layers` kept in fp32 as well."""
        merged = tuple(dict.fromkeys([*self.exclude, *layers]))
        return QuantizeSettings(self.method, self.per_channel, self.preset, self.fast_bias_correction, merged,
                                self.percentile)


@dataclass
class QuantizedArtifact:
    """A written INT8 artifact: its files (main last), the quantizer and settings used, `accepted`
    (what the caller's `accept` returned), and the held-out logits it was judged on."""

    path: Path
    files: list[Path]
    quantizer: dict
    accepted: object = None
    logits: np.ndarray | None = field(default=None, repr=False)


def batches(x: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """`x` (N x C x H x W) in consecutive chunks of `batch` (an artifact's static batch); a partial
    last chunk is left out."""
    x = as_numpy(x)
    for i in range(0, len(x) // batch * batch, batch):
        yield x[i:i + batch]


def run_batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int) -> np.ndarray:
    """Logits of `run` over `x` in chunks of `batch`; InputError when `x` holds less than one chunk."""
    chunks = [run(b) for b in batches(x, batch)]
    if not chunks:
        msg = f"need at least {batch} images for the artifact's batch size {batch}, got {len(x)}"
        raise InputError(msg)
    return np.concatenate(chunks)


class Quantizer(ABC):
    """fp32 model (an nn.Module, or its ONNX file) -> INT8 artifact for one runtime."""

    name: str  # the quantizer, e.g. "onnxruntime.quantize_static"
    runtime: str  # the runtime the artifact is for (the QUANTIZERS registry key)
    suffix: str

    def __init__(self, settings: QuantizeSettings | None = None) -> None:
        self.settings = settings or QuantizeSettings()

    def quantize(self, source, example_input, calibration: np.ndarray, path: str | Path, held_out: np.ndarray,
                 accept: Callable[[np.ndarray], object], opset: int = 17) -> QuantizedArtifact:
        """Quantize `source` calibrated on `calibration` (N x C x H x W float32, preprocessed as at inference,
        run `example_input`'s batch at a time), run the staged artifact on `held_out`, and commit it at `path`
        (this suffix) only if `accept(held-out logits)` returns; whatever it raises propagates, nothing written."""
        path = self.artifact_path(path)
        x = as_numpy(example_input)
        batch = int(x.shape[0])
        with Staging(path) as stage:
            fp32 = self.fp32_onnx(source, example_input, stage.dir, opset)
            self.check_exclude(fp32)
            staged = stage.dir / path.name
            # the quantizers print progress to stdout, which is the CLI's --json
            chunks = list(batches(calibration, batch))
            if not chunks:
                msg = f"calibration needs at least {batch} images for the batch size {batch}, got {len(calibration)}"
                raise InputError(msg)
            with boundary(f"{self.name} quantization of {path.name}"), contextlib.redirect_stdout(io.StringIO()):
                names = self.write(fp32, chunks, staged)
            with boundary(f"running the staged {self.name} artifact {path.name}"):
                run = self.open_staged(staged)
                logits = run_batched(run, held_out, batch)
            if not np.all(np.isfinite(logits)):  # refused like any artifact below the floor: the search skips it
                msg = f"{self.name} INT8 gives NaN or Inf logits on the held-out images; {path} not written"
                raise FidelityFloorError(msg)
            accepted = accept(logits)
            stage.commit(names)
        return QuantizedArtifact(path, [path.parent / n for n in names], self.describe(), accepted, logits)

    def fp32_onnx(self, source, example_input, folder: Path, opset: int) -> Path:
        """`source` as an fp32 ONNX file: itself, or an nn.Module exported into `folder` and checked in
        ONNX Runtime against torch on `example_input` (OnnxExporter's tolerance)."""
        from exporters.onnx import OnnxExporter
        from exporters.onnxruntime import OnnxRuntimeSession
        from exporters.reference import reference_output

        if isinstance(source, (str, Path)):
            if Path(source).suffix != ".onnx" or not Path(source).is_file():
                msg = f"{source}: a quantizer takes an nn.Module or an existing .onnx file"
                raise InputError(msg)
            return Path(source)
        exporter, target = OnnxExporter(), folder / "fp32-source.onnx"
        with boundary(f"ONNX export of the fp32 model for {self.name}"):
            exporter.write(source, example_input, target, opset)
        x = as_numpy(example_input)
        exporter.check_close(OnnxRuntimeSession(target, 1).run(x), reference_output(source, x), str(target))
        return target

    def check_exclude(self, fp32: Path) -> None:
        """InputError naming an excluded layer that is not one of `layers(fp32)` (ONNX Runtime would
        ignore it silently)."""
        known = set(self.layers(fp32))
        unknown = [n for n in self.settings.exclude if n not in known]
        if unknown:
            msg = f"cannot keep {', '.join(unknown[:3])} in fp32: not a quantized layer (Conv, Gemm, MatMul)"
            raise InputError(msg)

    def artifact_path(self, path: str | Path) -> Path:
        path = Path(path)
        return path if path.suffix == self.suffix else path.with_suffix(self.suffix)

    def describe(self) -> dict:
        """The quantizer and the settings it used, for the report."""
        return {"quantizer": self.name, "runtime": self.runtime, **asdict(self.settings),
                "exclude": list(self.settings.exclude)}

    @abstractmethod
    def write(self, fp32: Path, calibration: list[np.ndarray], staged: Path) -> list[str]:
        """Write the INT8 artifact at `staged` from the fp32 ONNX file, calibrated on `calibration` (a list
        of batches); returns the file names written in the staging folder, main last."""

    @abstractmethod
    def open_staged(self, staged: Path) -> Callable[[np.ndarray], np.ndarray]:
        """A function running the staged artifact on one batch (one thread), returning its logits."""

    def layers(self, fp32: Path) -> list[str]:
        """The layers this quantizer quantizes and can keep in fp32, by ONNX node name (the
        fallback's candidates): every Conv, Gemm and MatMul of the fp32 graph, in graph order."""
        import onnx

        model = onnx.load(str(fp32), load_external_data=False)
        return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]


QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
