"""The registries: exporters (nn.Module -> artifact) and runtimes (artifact -> timed session), by name.

Registries map a name to "module:Class" so a backend is imported only when
used: `import compressor` needs only torch.
"""

from __future__ import annotations

import importlib

from compressor.errors import InputError
from exporters.base import Runtime
from exporters.exporter import Exporter

EXPORTERS: dict[str, str] = {
    "onnx": "exporters.onnx:OnnxExporter",
    "openvino": "exporters.openvino:OpenVinoExporter",
    "tensorrt": "exporters.tensorrt:TensorRTExporter",
    "torch": "exporters.torch_eager:TorchExporter",
    "table": "exporters.table:TableExporter",  # names the units a model lacks: latency predicted, not timed
}
RUNTIMES: dict[str, str] = {
    "onnxruntime": "exporters.onnxruntime:OnnxRuntime",
    "openvino": "exporters.openvino:OpenVinoRuntime",
    "tensorrt": "exporters.tensorrt:TensorRTRuntime",
    "torch": "exporters.torch_eager:TorchRuntime",
    "table": "exporters.table:TableRuntime",  # predicted by a measured latency table (compressor/latency/replay.py)
}

# INT8 for a runtime, through that runtime's own quantizer (exporters/quantizer.py's interface)
QUANTIZERS: dict[str, str] = {
    "onnxruntime": "exporters.int8_onnxruntime:OnnxRuntimeQuantizer",
    "openvino": "exporters.int8_openvino:OpenVinoQuantizer",
}


def _resolve(registry: dict[str, str], name: str, what: str) -> type:
    if name not in registry:
        msg = f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}"
        raise InputError(msg)
    module, _, cls = registry[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def get_exporter(name: str, **options: object) -> Exporter:
    """An exporter by format name; `options` (precision, ...) go to its constructor."""
    return _resolve(EXPORTERS, name, "export format")(**options)


def get_runtime(name: str) -> Runtime:
    return _resolve(RUNTIMES, name, "runtime")()


def get_quantizer(runtime: str, settings=None):
    """The INT8 quantizer for `runtime` ("onnxruntime", "openvino") with `settings` (QuantizeSettings)."""
    return _resolve(QUANTIZERS, runtime, "INT8 runtime")(settings)
