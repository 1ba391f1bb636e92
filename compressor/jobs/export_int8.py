"""`compressor export --precision int8`: each format quantized by its runtime's own quantizer, calibrated on
the data's calibration split, judged on its held-out split against the fp32 model, refused below the floor.

onnx -> ONNX Runtime `quantize_static` (QDQ S8S8), openvino -> `nncf.quantize` (compressor.quantize);
tensorrt -> the engine or device bundle built with TensorRT's INT8 flag by its exporter, calibrated by
TensorRT's entropy calibrator on the same calibration images (in the bundle: calibration.npz, and the
calibration cache build_engine.py writes on the device) and judged by the same floor on the same held-out
images (in the bundle: heldout.npz, judged by build_engine.py on the device).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from compressor.errors import InputError
from compressor.quantize import QuantizationImages, quantize_checked

INT8_RUNTIMES = {"onnx": "onnxruntime", "openvino": "openvino"}  # format -> the runtime whose quantizer runs
INT8_BY_EXPORTER = ("tensorrt",)  # formats whose exporter takes precision="int8" itself (builder flags)


def check_int8_formats(formats: Sequence[str], has_images: bool) -> None:
    """InputError, before any model loads, for a format INT8 is not available in, or for no images to
    calibrate on."""
    refused = [f for f in formats if f not in INT8_RUNTIMES and f not in INT8_BY_EXPORTER]
    if refused:
        known = ", ".join([*INT8_RUNTIMES, *INT8_BY_EXPORTER])
        msg = f"--precision int8 is available for {known}, not {', '.join(refused)}"
        raise InputError(msg)
    if not has_images:
        msg = ("--precision int8 needs --data: INT8 is calibrated on its calibration split and checked on its "
               "held-out split")
        raise InputError(msg)


def int8_options(args, formats: Sequence[str]) -> dict:
    """export()'s INT8 keywords from the CLI's arguments (--calibrate, --min-agreement, --min-sqnr), checked
    before the model loads; the images are added once the data is loaded."""
    from compressor.metrics.lossy import Floor
    from exporters.quantizer import QuantizeSettings

    check_int8_formats(formats, bool(getattr(args, "data", None)))
    defaults = Floor()
    floor = Floor(defaults.min_top1_agreement if args.min_agreement is None else args.min_agreement,
                  defaults.min_sqnr_db if args.min_sqnr is None else args.min_sqnr)
    return {"quantize_settings": QuantizeSettings(method=args.calibrate), "floor": floor}


def export_int8(folded: nn.Module, example_input: torch.Tensor, out: Path, format_name: str, name: str,
                images: QuantizationImages, settings=None, floor=None, opset: int = 17,
                log: Callable[[str], None] = print) -> dict:
    """Quantize the folded model for `format_name`'s runtime into `out`/`name` (refused if it exists);
    returns what export() reports per format, with the quantizer, its settings and the fidelity."""
    from exporters import get_quantizer

    runtime = INT8_RUNTIMES[format_name]
    target = get_quantizer(runtime, settings).artifact_path(out / name)
    clash = [p for p in (target, target.with_suffix(".bin")) if p.exists()]
    if clash:
        msg = f"{clash[0]} already exists; choose a new --out or --name"
        raise InputError(msg)
    result = quantize_checked(folded, example_input, runtime, target, images, settings, floor, opset=opset, log=log)
    f = result.fidelity
    outcome = (f"wrote {result.path}, INT8 by {result.quantizer['quantizer']}, top-1 agreement "
               f"{f.top1_agreement:.1f}% and SQNR {f.sqnr_db:.1f} dB against fp32 on {f.images} held-out images"
               + (f", {len(result.excluded)} layers kept in fp32" if result.excluded else ""))
    return {"path": str(result.path), "precision": "int8", "outcome": outcome,
            "files": [str(p) for p in result.files], **{k: v for k, v in result.to_dict().items()
                                                          if k not in ("path", "files", "precision")}}
