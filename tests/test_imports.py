"""`import compressor` needs only torch: runtimes and exporters load when used."""

from __future__ import annotations

import subprocess
import sys

OPTIONAL = ("onnx", "onnxruntime", "openvino", "tensorrt", "matplotlib", "sklearn", "torchvision")


def test_core_imports_without_optional_backends():
    code = ("import sys, compressor, compressor.units, compressor.surgery, compressor.criteria, "
            "compressor.timing; print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))  # a printed list of module names
    assert not loaded & set(OPTIONAL), loaded & set(OPTIONAL)
