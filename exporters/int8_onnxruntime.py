"""INT8 for ONNX Runtime with its own quantizer: `quant_pre_process`, then `quantize_static` to QDQ.

Settings (the ones ONNX Runtime recommends for x86 CPUs): QDQ format (QuantizeLinear / DequantizeLinear
pairs around fp32 operators, which ONNX Runtime fuses into its int8 kernels), signed int8 activations and
weights (S8S8), symmetric per-channel weights, MinMax calibration by default (Entropy and Percentile as
options). Never the QOperator format: S8S8 QOperator runs through slow paths on x86 (a blog's
EfficientNetV2-S: fp32 58 ms, QDQ 101 ms, QOperator 667 ms), and every written file is checked to hold
no QOperator node.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.errors import ExportError
from exporters.base import require
from exporters.quantizer import Quantizer

HINT = "it comes with onnxruntime (`pip install onnxruntime`)"
# operators of the QOperator format (and integer ops it lowers to): never in what this quantizer writes
QOPERATOR_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                           "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
                           "ConvInteger", "MatMulInteger", "QGemm"})


def _quantization():
    return require("onnxruntime.quantization", "INT8 quantization for ONNX Runtime", HINT)


# ONNX Runtime's histogram calibrators (Entropy, Percentile) keep every intermediate tensor of every image in
# memory before binning (efficientnet_lite0 at 224 px, 300 images: over 18 GB), so they collect strides of
# CHUNK images (its CalibStridedMinMax, with a reader that takes a range), merging histograms as they go.
# MinMax keeps two numbers per tensor and image and runs in one pass. (CalibMaxIntermediateOutputs is not
# used: in onnxruntime 1.32 MinMax drops every full chunk's outputs without merging their ranges.)
CHUNK = 16


def _stride(n: int) -> int:
    """The largest divisor of `n` up to CHUNK (ONNX Runtime's strided calibration needs one)."""
    return max(d for d in range(1, min(n, CHUNK) + 1) if n % d == 0)


class _Reader:
    """ONNX Runtime's CalibrationDataReader over prepared batches, with the range interface of its strided
    calibration (built lazily: the base class lives in onnxruntime.quantization, imported when quantizing)."""

    @staticmethod
    def create(input_name: str, calibration: list[np.ndarray]):
        quantization = _quantization()

        class Reader(quantization.CalibrationDataReader):
            def __init__(self) -> None:
                self.set_range(0, len(calibration))

            def __len__(self) -> int:
                return len(calibration)

            def set_range(self, start_index: int, end_index: int) -> None:
                self.batches = iter(calibration[start_index:end_index])

            def get_next(self) -> dict | None:
                batch = next(self.batches, None)
                return None if batch is None else {input_name: np.ascontiguousarray(batch, np.float32)}

        return Reader()


def check_qdq(path: Path) -> None:
    """ExportError if the file at `path` holds an operator of the QOperator format."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    found = sorted(ops & QOPERATOR_OPS)
    if found:
        msg = f"{path.name} holds QOperator nodes ({', '.join(found)}); only QDQ is written"
        raise ExportError(msg)


class OnnxRuntimeQuantizer(Quantizer):
    """QDQ S8S8 ONNX for ONNX Runtime's CPU provider."""

    name = "onnxruntime.quantize_static"
    runtime = "onnxruntime"
    suffix = ".onnx"

    def describe(self) -> dict:
        s = self.settings
        return {**super().describe(), "format": "QDQ", "activation_type": "QInt8", "weight_type": "QInt8",
                "calibrate_method": {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}[s.method],
                "pre_process": "quant_pre_process", "preset": None, "fast_bias_correction": None,
                "percentile": s.percentile if s.method == "percentile" else None}

    def write(self, fp32: Path, calibration: list[np.ndarray], staged: Path) -> list[str]:
        prepared = self.prepare(fp32, staged.with_name(f"{staged.stem}-pre.onnx"))
        self.quantize_prepared(prepared, calibration, staged)
        prepared.unlink()
        return [staged.name]

    def prepare(self, fp32: Path, prepared: Path) -> Path:
        """`quant_pre_process`: shape inference and ONNX Runtime's basic graph optimisations, as its docs
        ask before quantize_static; writes and returns `prepared`."""
        _quantization().quant_pre_process(str(fp32), str(prepared))
        return prepared

    def quantize_prepared(self, prepared: Path, calibration: list[np.ndarray], staged: Path) -> None:
        """`quantize_static` of the prepared fp32 file into `staged`: QDQ, S8S8, these settings."""
        import onnx

        quantization = _quantization()
        input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
        method = {"minmax": quantization.CalibrationMethod.MinMax, "entropy": quantization.CalibrationMethod.Entropy,
                  "percentile": quantization.CalibrationMethod.Percentile}[self.settings.method]
        if self.settings.method == "minmax":
            extra = {}
        else:
            extra = {"CalibStridedMinMax": _stride(len(calibration)), "CalibPercentile": self.settings.percentile}
        quantization.quantize_static(
            str(prepared), str(staged), _Reader.create(input_name, calibration),
            quant_format=quantization.QuantFormat.QDQ, activation_type=quantization.QuantType.QInt8,
            weight_type=quantization.QuantType.QInt8, per_channel=self.settings.per_channel,
            calibrate_method=method, nodes_to_exclude=list(self.settings.exclude), extra_options=extra)
        check_qdq(staged)

    def open_staged(self, staged: Path):
        from exporters.onnxruntime import OnnxRuntimeSession

        return OnnxRuntimeSession(staged, 1).run
