"""`compressor export`: a model folded (BatchNorm into its neighbours) and exported to each format asked for,
every artifact validated against torch before it is written."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from compressor.errors import InputError
from compressor.fileio import check_output_dir, make_output_dir
from compressor.rewrite.fold import fold_batchnorm


def parse_formats(text: str | Sequence[str]) -> list[str]:
    """Export formats from "onnx,openvino" (or a list); InputError naming an unknown one and the known ones."""
    from exporters import EXPORTERS

    formats = [f.strip() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()]
    unknown = [f for f in formats if f not in EXPORTERS]
    if not formats or unknown:
        msg = f"unknown export format {', '.join(unknown) or repr(text)}; known: {', '.join(sorted(EXPORTERS))}"
        raise InputError(msg)
    return formats


def _exporters(formats: list[str], precision: str, dynamic_batch: bool, simplify: bool, workspace_mb: int,
               images=None, floor=None) -> list:
    """The exporters for `formats`; TensorRT INT8 calibrates on `images`' calibration split and is judged on its
    held-out split against `floor` (compressor.metrics.lossy.Floor, default the documented one)."""
    from compressor.metrics.lossy import Floor
    from exporters import get_exporter

    int8 = precision == "int8" and images is not None
    options = {"onnx": {"dynamic_batch": dynamic_batch, "simplify": simplify},
               "tensorrt": {"workspace_mb": workspace_mb, "dynamic_batch": dynamic_batch,
                            "calibration": images.calibration if int8 else None,
                            "held_out": images.held_out if int8 else None,
                            "floor": (floor or Floor()).to_dict() if int8 else None}}
    own = ("tensorrt",) if precision == "int8" else ("openvino", "tensorrt")  # int8 onnx/openvino: quantizers
    return [get_exporter(f, precision=precision if f in own else "fp32", **options.get(f, {})) for f in formats]


def _refuse_clash(exporter, target: Path) -> None:
    candidates = exporter.artifact_files(target)
    if exporter.name == "tensorrt":
        candidates.append(exporter.bundle_path(target))
    clash = [p for p in candidates if p.exists()]
    if clash:
        msg = f"{clash[0]} already exists; choose a new --out or --name"
        raise InputError(msg)


def export(model: nn.Module, example_input: torch.Tensor, out: str | Path, formats: str | Sequence[str] = "onnx",
           name: str = "model", precision: str = "fp32", opset: int = 17, dynamic_batch: bool = False,
           simplify: bool = False, workspace_mb: int = 1024, log: Callable[[str], None] = print,
           images=None, quantize_settings=None, floor=None) -> dict:
    """Fold `model`'s BatchNorm layers and export it to every format (onnx, openvino, tensorrt, torch)
    into the folder `out` as `name`.<suffix>; returns {format: {path, precision, outcome, files}}.
    Existing artifacts are refused, never overwritten. precision "int8": onnx and openvino through
    compressor.jobs.export_int8, calibrated and judged on `images` (compressor.quantize.QuantizationImages)
    with `quantize_settings` and the fidelity `floor`; tensorrt by TensorRT's calibrator on the same
    calibration images, judged by the same floor on the same held-out images (here where TensorRT runs,
    else by the bundle's build_engine.py on the device)."""
    formats = parse_formats(formats)
    if precision == "int8":
        from compressor.jobs.export_int8 import check_int8_formats

        check_int8_formats(formats, images is not None)
    exporters = _exporters(formats, precision, dynamic_batch, simplify, workspace_mb, images, floor)
    out = make_output_dir(check_output_dir(out, must_be_empty=False))
    for exporter in exporters:
        _refuse_clash(exporter, exporter.artifact_path(out / name))
    from compressor.models.program import ProgramModule

    if isinstance(model, ProgramModule):  # a torch.export program: already in inference form
        folded = model
        log(f"a torch.export program, exported as it is; input {list(example_input.shape)}")
    else:
        folded, folds = fold_batchnorm(model.eval(), example_input)
        log(f"{folds} BatchNorm layers folded; input {list(example_input.shape)}")
    written = {}
    for exporter in exporters:
        target = exporter.artifact_path(out / name)
        if precision == "int8" and exporter.name != "tensorrt":
            from compressor.jobs.export_int8 import export_int8

            written[exporter.name] = export_int8(folded, example_input, out, exporter.name, name, images,
                                                 quantize_settings, floor, opset, log)
            continue
        try:
            path = exporter.export(folded, example_input, target, opset)
        except OSError as e:
            msg = f"cannot write {target}: {e.strerror or e}"
            raise InputError(msg) from e
        outcome = exporter.outcome or (f"wrote {path}, validated against torch (atol {exporter.atol:g} + rtol "
                                       f"{exporter.rtol:g})")
        log(f"{exporter.name} ({exporter.precision}): {outcome}")
        written[exporter.name] = {"path": str(path), "precision": exporter.precision, "outcome": outcome,
                                  "files": [str(p) for p in exporter.artifact_files(path)] if path.is_file()
                                  else sorted(str(p) for p in path.iterdir())}
    return written
