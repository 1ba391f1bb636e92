"""OpenVINO IR (.xml + .bin) through OpenVINO's own converter, run on the CPU device.

The IR is converted from the ONNX graph (`openvino.convert_model` on the file
OnnxExporter writes and validates): its PyTorch frontend gives the same graph
here but takes ~5 s per ResNet-56 against ~1 s, and the latency table exports
every candidate. Sessions follow docs/measurement.md: PERFORMANCE_HINT=LATENCY, one
synchronous infer request, INFERENCE_NUM_THREADS = the profile's threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.errors import InputError
from exporters.base import Runtime, Session, boundary, require
from exporters.exporter import Exporter

HINT = "install it with `pip install openvino` (or `pip install compressor[openvino]`)"


def _openvino():
    return require("openvino", "the OpenVINO backend", HINT)


class OpenVinoExporter(Exporter):
    """IR with FP32 weights, or FP16-compressed weights (`precision="fp16"`).

    Inference runs in fp32 on the CPU either way (INFERENCE_PRECISION_HINT=f32;
    OpenVINO would otherwise pick bf16 on CPUs that have it, an error of O(1)
    on unnormalised logits). FP32: same tolerance as ONNX (atol 1e-4 + rtol 1e-3; another summation order).
    FP16 weights are rounded to an 11-bit mantissa (up to 4.9e-4 relative per
    weight); the error this leaves in the output scales with the activations:
    measured on every zoo model (random BatchNorm statistics) it stays under
    8e-4 of max|logits|, so atol 1e-4 + rtol 1e-2 + 4e-3 * max|logits| (5x
    margin); a wrong graph differs by O(1) of the range.
    """

    name = "openvino"
    suffix = ".xml"
    TOLERANCES = {"fp32": (1e-4, 1e-3, 0.0), "fp16": (1e-4, 1e-2, 4e-3)}

    def artifact_files(self, path: Path) -> list[Path]:
        return [Path(path).with_suffix(".bin"), Path(path)]

    def write(self, model, example_input, staged: Path, opset: int) -> list[str]:
        """`model` is an nn.Module (exported to ONNX first) or an ONNX file; writes `<stem>.xml` and
        `<stem>.bin`, committed .bin first, so a finished .xml always has its own .bin."""
        from exporters.onnx import OnnxExporter

        ov = _openvino()
        source = model
        if not isinstance(model, (str, Path)):
            source = staged.with_name("source.onnx")
            OnnxExporter().write(model, example_input, source, opset)
        with boundary(f"OpenVINO conversion of {Path(source).name}"):
            converted = ov.convert_model(str(source))
        ov.save_model(converted, str(staged), compress_to_fp16=self.precision == "fp16")
        return [staged.with_suffix(".bin").name, staged.name]

    def run_staged(self, staged: Path, x: np.ndarray) -> list[np.ndarray]:
        return OpenVinoSession(staged, 1).run_all(x)


class OpenVinoSession(Session):
    """One compiled model on the CPU device with one synchronous infer request."""

    def __init__(self, artifact: Path, threads: int, options: dict | None = None) -> None:
        ov = _openvino()
        artifact = Path(artifact)
        weights = artifact.with_suffix(".bin")
        if not artifact.is_file() or not weights.is_file():
            msg = f"OpenVINO IR {artifact} needs both {artifact.name} and {weights.name}; not found"
            raise InputError(msg)
        with artifact.open("rb") as f:
            head = f.read(256).lstrip()
        if not head.startswith((b"<?xml", b"<net")):
            msg = f"OpenVINO cannot load {artifact}: not an IR .xml file"
            raise InputError(msg)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads),
                  "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}
        config.update({str(k).upper(): v for k, v in (options or {}).items()})
        core = ov.Core()
        try:
            self.compiled = core.compile_model(core.read_model(str(artifact), str(weights)), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError for a bad .xml or a short .bin
            lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith(("Exception", "Check"))]
            detail = (lines[-1] if lines else str(e).strip().splitlines()[0])[:200]
            msg = f"OpenVINO cannot load {artifact}: {detail}"
            raise InputError(msg) from e
        self.request = self.compiled.create_infer_request()
        self.settings = {"runtime": "openvino", "version": ov.get_version(), "device": "CPU",
                         "inference": "synchronous, one infer request"}
        for key in ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS", "INFERENCE_PRECISION_HINT",
                    "ENABLE_CPU_PINNING", *(str(k).upper() for k in (options or {}))):
            try:
                value = self.compiled.get_property(key)
                self.settings[key.lower()] = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
            except Exception:  # a property this plugin version does not report
                self.settings[key.lower()] = str(config.get(key))

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_all(x)[0]

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        out = self.request.infer({0: np.ascontiguousarray(x, np.float32)}, share_inputs=False)
        return [np.array(out[port]) for port in self.compiled.outputs]

    def input_shape(self) -> list[int | None]:
        partial = self.compiled.input(0).get_partial_shape()
        return [d.get_length() if d.is_static else None for d in partial]

    def prepare(self, x: np.ndarray) -> None:
        ov = _openvino()
        self._input = np.ascontiguousarray(x, np.float32)
        self.request.set_input_tensor(ov.Tensor(self._input, shared_memory=True))

    def __call__(self) -> object:
        self.request.infer()
        return self.request.get_output_tensor(0)


class OpenVinoRuntime(Runtime):
    name = "openvino"
    artifact_format = "openvino"

    def open(self, artifact: Path, threads: int, options: dict | None = None) -> Session:
        return OpenVinoSession(artifact, threads, options)
