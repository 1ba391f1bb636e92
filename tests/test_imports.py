"""`import compressor` needs only torch: runtimes and exporters load when used."""

from __future__ import annotations

import ast
import subprocess
import sys

OPTIONAL = ("onnx", "onnxruntime", "openvino", "tensorrt", "matplotlib", "sklearn", "torchvision", "scipy")


def test_core_imports_without_optional_backends():
    code = ("import sys, compressor, compressor.graph.units, compressor.graph.surgery, compressor.criteria, "
            "compressor.latency.timing; print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(ast.literal_eval(out))
    assert not loaded & set(OPTIONAL), loaded & set(OPTIONAL)
