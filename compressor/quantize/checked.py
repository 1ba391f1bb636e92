"""Quantize, validate against the fp32 model, fall back to keeping the worst layers in fp32, or refuse.

`quantize_checked` is what the search and `compressor export --precision int8` call: the runtime's own
quantizer (exporters.get_quantizer) writes the INT8 artifact in a staging folder, runs it on held-out
images, and it is committed only if its fidelity to the fp32 model clears the floor
(compressor.metrics.lossy.Floor). Below the floor, the layers whose fp32 computation raises the logits'
SQNR most (compressor.quantize.fallback, ranked on selection images disjoint from the held-out ones) are
kept in fp32, 1, 2, then 4 of them, each try quantized and measured again on the held-out images; when
none clears the floor, FidelityFloorError, and nothing is written.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor.errors import FidelityFloorError, InputError
from compressor.metrics.lossy import Floor, LossyFidelity, lossy_fidelity
from compressor.quantize.images import QuantizationImages

FALLBACK_STEPS = (1, 2, 4)  # layers kept in fp32 on the successive fallback tries
RANK_IMAGES = 64  # selection images (never held-out ones) each ranking variant runs on


@dataclass
class QuantizedModel:
    """A written INT8 artifact that cleared the floor: `fidelity` on the held-out images, `quantizer` (name and
    settings), the layers kept in fp32, every try (`attempts`) and the fallback's ranking (dB gained per layer)."""

    path: Path
    files: list[Path]
    runtime: str
    quantizer: dict
    fidelity: LossyFidelity
    floor: Floor
    excluded: list[str] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)
    ranking: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return {"path": str(self.path), "files": [str(f) for f in self.files], "runtime": self.runtime,
                "precision": "int8", "quantizer": self.quantizer, "fidelity": self.fidelity.to_dict(),
                "floor": self.floor.to_dict(), "excluded": self.excluded, "attempts": self.attempts,
                "ranking": self.ranking}


def reference_logits(fp32: Path, x: np.ndarray, batch: int) -> np.ndarray:
    """The fp32 ONNX file's logits on `x` in ONNX Runtime (what every quantized try is compared with)."""
    from exporters.onnxruntime import OnnxRuntimeSession
    from exporters.quantizer import run_batched

    return run_batched(OnnxRuntimeSession(fp32, 1).run, x, batch)


class _Judge:
    """The `accept` a quantizer calls on the staged artifact's held-out logits: measures, records the
    try, raises FidelityFloorError below the floor (the quantizer then writes nothing)."""

    def __init__(self, reference: np.ndarray, labels: np.ndarray | None, floor: Floor, attempts: list[dict]) -> None:
        self.reference, self.labels, self.floor, self.attempts = reference, labels, floor, attempts

    def __call__(self, quantizer: dict, logits: np.ndarray) -> LossyFidelity:
        n = len(logits)
        fidelity = lossy_fidelity(self.reference[:n], logits, None if self.labels is None else self.labels[:n])
        reasons = self.floor.shortfalls(fidelity)
        self.attempts.append({"excluded": list(quantizer["exclude"]), "fidelity": fidelity.to_dict(),
                              "accepted": not reasons, "below_floor": reasons})
        if reasons:
            kept = f" with {len(quantizer['exclude'])} layers in fp32" if quantizer["exclude"] else ""
            msg = (f"{quantizer['quantizer']} INT8{kept} is below the fidelity floor on {n} held-out images: "
                   f"{'; '.join(reasons)}; not written")
            raise FidelityFloorError(msg, self.attempts)
        return fidelity


def _try(runtime: str, settings, fp32: Path, example_input, images: QuantizationImages, path: Path,
         judge: _Judge, log: Callable[[str], None]):
    from exporters import get_quantizer

    quantizer = get_quantizer(runtime, settings)
    described = quantizer.describe()
    before = len(judge.attempts)
    try:
        artifact = quantizer.quantize(fp32, example_input, images.calibration, path, images.held_out,
                                      lambda logits: judge(described, logits))
    except FidelityFloorError as e:
        if len(judge.attempts) == before:  # refused before the judge saw it (NaN or Inf logits)
            judge.attempts.append({"excluded": list(described["exclude"]), "fidelity": None, "accepted": False,
                                   "below_floor": [str(e)]})
        log(str(e))
        return None
    f = artifact.accepted
    log(f"{quantizer.name}: top-1 agreement {f.top1_agreement:.1f}%, SQNR {f.sqnr_db:.1f} dB, KL "
        f"{f.kl_divergence:.4f} nats on {f.images} held-out images; wrote {artifact.path}")
    return artifact


def quantize_checked(model, example_input, runtime: str, path: str | Path, images: QuantizationImages,
                     settings=None, floor: Floor | None = None, fallback: Sequence[int] = FALLBACK_STEPS,
                     rank_images: int = RANK_IMAGES, opset: int = 17,
                     log: Callable[[str], None] = lambda _: None) -> QuantizedModel:
    """INT8 artifact of `model` (a folded nn.Module, or its fp32 ONNX file) for `runtime` ("onnxruntime",
    "openvino") at `path` (the runtime's suffix), calibrated on `images.calibration` and judged on
    `images.held_out` against the fp32 model, `example_input`'s batch at a time (the artifact's static
    shape). `settings`: exporters.quantizer.QuantizeSettings (default: MinMax, per-channel, PERFORMANCE);
    `floor`: compressor.metrics.lossy.Floor (default: the documented one); `fallback`: how many of the
    most harmful layers to keep in fp32 on each further try (() = no fallback).
    Returns a QuantizedModel; FidelityFloorError (exit 3, `.attempts`) when no try clears the floor,
    with nothing written at `path`. InputError for an unknown runtime or bad images."""
    from exporters import get_quantizer
    from exporters.quantizer import QuantizeSettings, as_numpy

    floor = floor or Floor()
    quantizer = get_quantizer(runtime, settings)
    settings = settings or QuantizeSettings()
    path = quantizer.artifact_path(path)
    batch = int(as_numpy(example_input).shape[0])
    attempts: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="compressor-int8-") as folder:
        fp32 = quantizer.fp32_onnx(model, example_input, Path(folder), opset)
        reference = reference_logits(fp32, images.held_out, batch)
        judge = _Judge(reference, images.labels, floor, attempts)
        artifact = _try(runtime, settings, fp32, example_input, images, path, judge, log)
        ranking = None
        if artifact is None and fallback:
            from compressor.quantize.fallback import MIN_GAIN_DB, rank_layers

            ranking = rank_layers(fp32, images, batch, lambda x: reference_logits(fp32, x, batch), settings,
                                  rank_images)
            log("fallback: layers by SQNR gained in fp32: " +
                (", ".join(f"{n} +{g:.1f} dB" for n, g in list(ranking.items())[:max(fallback)])
                 or f"none gains {MIN_GAIN_DB} dB or more; no fallback try"))
            for k in sorted(set(fallback)):
                worst = list(ranking)[:k]
                if len(worst) < k:
                    break
                artifact = _try(runtime, settings.excluding(worst), fp32, example_input, images, path, judge, log)
                if artifact is not None:
                    break
    if artifact is None:
        last = attempts[-1]["below_floor"] if attempts else []
        tries = f"{len(attempts)} {'try' if len(attempts) == 1 else 'tries'}"
        msg = (f"INT8 for {runtime} refused after {tries} (fallback {list(fallback)}): "
               f"{'; '.join(last)}; nothing written at {path}")
        raise FidelityFloorError(msg, attempts)
    return QuantizedModel(artifact.path, artifact.files, runtime, artifact.quantizer, artifact.accepted, floor,
                          list(artifact.quantizer["exclude"]), attempts, ranking)


def int8_available(runtime: str) -> bool:
    """Whether `runtime` has its own INT8 quantizer here (exporters.registry.QUANTIZERS)."""
    from exporters.registry import QUANTIZERS

    return runtime in QUANTIZERS


def check_runtime(runtime: str, profile: str | None = None) -> None:
    """InputError naming the runtimes INT8 is available for, before anything slow happens (`profile`: the
    profile's name, for the message)."""
    from exporters.registry import QUANTIZERS

    if not int8_available(runtime):
        where = f"profile {profile} runs {runtime}" if profile else f"not {runtime!r}"
        msg = (f"--precision int8: INT8 is available on profiles that run {' or '.join(sorted(QUANTIZERS))}; "
               f"{where}")
        raise InputError(msg)
