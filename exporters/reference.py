"""What an exported artifact must reproduce: torch's output, or ONNX Runtime's for an ONNX file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporters.onnxruntime import OnnxRuntimeSession


def reference_output(model, x: np.ndarray) -> np.ndarray:
    """`model`'s first output on `x`: an nn.Module in eval mode, or an ONNX file run in ONNX Runtime."""
    if isinstance(model, (str, Path)):
        return OnnxRuntimeSession(Path(model), 1).run(x)
    import torch

    with torch.no_grad():
        return model.eval()(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()
