"""INT8 for OpenVINO with its own quantizer: `nncf.quantize` on the `ov.Model`, saved as IR.

The fp32 IR is converted from the ONNX graph (as exporters/openvino.py does), then NNCF inserts
FakeQuantize operations calibrated on the images: PERFORMANCE preset (symmetric int8 activations
and weights), CPU target device, per-channel weights, fast bias correction, every calibration batch
used (subset_size). The saved IR keeps int8 weights; the CPU plugin runs the quantized layers with
its int8 kernels. NNCF is an extra dependency (`pip install compressor[int8]`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from compressor.errors import InputError
from exporters.base import require
from exporters.quantizer import Quantizer

HINT = "install it with `pip install nncf` (or `pip install compressor[int8]`)"
# OpenVINO operations NNCF quantizes that an ONNX Conv / Gemm / MatMul becomes
OV_QUANTIZED = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData")


def _nncf():
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" as NNCF loads
    nncf = require("nncf", "INT8 quantization for OpenVINO", HINT)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    return nncf


def ov_names(model, layers: list[str]) -> list[str]:
    """The OpenVINO operations that the ONNX nodes `layers` became in `model` (an ov.Model converted
    from that ONNX graph): a Conv with a bias becomes "<name>/WithoutBiases" plus an Add."""
    ops = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in OV_QUANTIZED]
    names = []
    for layer in layers:
        found = [op for op in ops if op == layer or op.startswith(f"{layer}/")]
        if not found:
            msg = f"layer {layer!r} is not a quantized operation of the OpenVINO model"
            raise InputError(msg)
        names += found
    return names


class OpenVinoQuantizer(Quantizer):
    """INT8 OpenVINO IR (.xml + .bin) through nncf.quantize."""

    name = "nncf.quantize"
    runtime = "openvino"
    suffix = ".xml"

    def describe(self) -> dict:
        nncf = _nncf()
        return {**super().describe(), "nncf_version": nncf.__version__, "target_device": "CPU",
                "preset": self.settings.preset.upper(), "method": "NNCF default range estimators",
                "percentile": None}

    def _advanced(self, nncf):
        if self.settings.per_channel:
            return None
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

        return AdvancedQuantizationParameters(weights_quantization_params=QuantizationParameters(per_channel=False))

    def write(self, fp32: Path, calibration: list[np.ndarray], staged: Path) -> list[str]:
        nncf = _nncf()
        ov = require("openvino", "INT8 quantization for OpenVINO", "install it with `pip install openvino`")
        model = ov.convert_model(str(fp32))
        ignored = nncf.IgnoredScope(names=ov_names(model, list(self.settings.exclude)), validate=False)
        preset = {"performance": nncf.QuantizationPreset.PERFORMANCE,
                  "mixed": nncf.QuantizationPreset.MIXED}[self.settings.preset]
        quantized = nncf.quantize(model, nncf.Dataset(calibration), preset=preset,
                                  target_device=nncf.TargetDevice.CPU, subset_size=len(calibration),
                                  fast_bias_correction=self.settings.fast_bias_correction,
                                  ignored_scope=ignored, advanced_parameters=self._advanced(nncf))
        ov.save_model(quantized, str(staged), compress_to_fp16=False)
        return [staged.with_suffix(".bin").name, staged.name]

    def open_staged(self, staged: Path):
        from exporters.openvino import OpenVinoSession

        return OpenVinoSession(staged, 1).run
