"""The table runtime: artifacts that name the units their model lacks, for a device that predicts latency.

A profile with `runtime: table` times nothing: its device (compressor/latency/replay.py) predicts each
artifact's latency from a latency table measured on the target, by the units the artifact's model lacks.
So the artifact is a small JSON file naming them (compressor.graph.surgery.remove_units records them on
the pruned module, attribute REMOVED_ATTRIBUTE), beside the model exported to ONNX (`<name>.onnx`), which
ONNX Runtime runs wherever outputs are needed: the export's own check, the checks on held-out images.
Timing a session of this runtime on this machine would time ONNX Runtime; only the predicting device
gives its figures.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from compressor.errors import InputError
from exporters.base import Runtime, Session
from exporters.exporter import Exporter
from exporters.onnx import OnnxExporter
from exporters.onnxruntime import OnnxRuntimeSession

KIND = "compressor-table-artifact"
# set on a pruned module by compressor.graph.surgery.remove_units (this package may import nothing of
# compressor but its errors, so the name is repeated there; tests/test_table_device.py checks they agree)
REMOVED_ATTRIBUTE = "compressor_removed"


def outputs_path(artifact: Path) -> Path:
    """The ONNX file beside a table artifact that computes its outputs."""
    return Path(artifact).with_suffix(OnnxExporter.suffix)


def read_artifact(path: str | Path) -> tuple[str, ...]:
    """The unit names a table artifact's model lacks; InputError for a file that is not one."""
    path = Path(path)
    data = None
    with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = json.loads(path.read_text())
    removed = data.get("removed") if isinstance(data, dict) and data.get("kind") == KIND else None
    if not isinstance(removed, list) or not all(isinstance(n, str) for n in removed):
        what = "does not exist" if not path.exists() else "is not a table artifact"
        msg = f"{path} {what}: the table exporter writes a JSON file of kind {KIND!r} naming the units a model lacks"
        raise InputError(msg)
    return tuple(removed)


class TableExporter(Exporter):
    """A JSON file naming the units the model lacks, and the model as ONNX beside it, checked in ONNX
    Runtime against torch with the ONNX exporter's tolerance (atol 1e-4 + rtol 1e-3, see exporters/onnx.py)."""

    name = "table"
    suffix = ".table"
    TOLERANCES = OnnxExporter.TOLERANCES

    def write(self, model, example_input, staged: Path, opset: int) -> list[str]:
        if isinstance(model, (str, Path)):
            msg = "the table format exports an nn.Module (it records the units the module lacks), not a file"
            raise InputError(msg)
        names = OnnxExporter().write(model, example_input, outputs_path(staged), opset)
        removed = [str(n) for n in getattr(model, REMOVED_ATTRIBUTE, ())]
        staged.write_text(json.dumps({"kind": KIND, "version": 1, "removed": removed,
                                      "outputs": outputs_path(staged).name}, indent=2) + "\n")
        return [*names, staged.name]

    def run_staged(self, staged: Path, x: np.ndarray):
        return OnnxExporter().run_staged(outputs_path(staged), x)

    def artifact_files(self, path: Path) -> list[Path]:
        return [*OnnxExporter().artifact_files(outputs_path(path)), Path(path)]


class TableSession(OnnxRuntimeSession):
    """The artifact's removed units (`removed`); its outputs are the ONNX file's beside it, in ONNX Runtime."""

    def __init__(self, artifact: Path, threads: int, options: dict | None = None) -> None:
        self.removed = read_artifact(artifact)
        super().__init__(outputs_path(artifact), threads, options)
        self.settings = {"runtime": "table", "removed": list(self.removed),
                         "outputs": {**self.settings, "file": outputs_path(artifact).name}}


class TableRuntime(Runtime):
    name = "table"
    artifact_format = "table"

    def open(self, artifact: Path, threads: int, options: dict | None = None) -> Session:
        return TableSession(artifact, threads, options)
