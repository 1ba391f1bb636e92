"""What an exported artifact must reproduce: torch's outputs, or ONNX Runtime's for an ONNX file.

A model may return one tensor or any structure of them (a detector's tuple of maps, a dict):
its outputs are the tensors of that structure in torch's pytree order, named "logits" for a
lone tensor (the name every artifact has always given it), "output0", "output1" ... by position
in a tuple, and by key in a dict ("0.boxes" nested).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporters.onnxruntime import OnnxRuntimeSession

SINGLE = "logits"


def _key_name(entry: object) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flat_outputs(value: object) -> list[tuple[str, object]]:
    """(name, tensor) for every tensor in a model's output, in pytree order."""
    import torch
    from torch.utils import _pytree as pytree

    if isinstance(value, torch.Tensor):
        return [(SINGLE, value)]
    leaves, _ = pytree.tree_flatten_with_path(value)
    found = []
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            name = ".".join(_key_name(p) for p in path)
            found.append((f"output{name}" if name.isdigit() else name, leaf))
    return found


def reference_outputs(model, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(name, value) of each of `model`'s outputs on `x`: an nn.Module in eval mode, or an ONNX file run in
    ONNX Runtime (named as the file names them)."""
    if isinstance(model, (str, Path)):
        session = OnnxRuntimeSession(Path(model), 1)
        return list(zip(session.output_names(), session.run_all(x), strict=True))
    import torch

    with torch.no_grad():
        value = model.eval()(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    return [(name, t.numpy()) for name, t in flat_outputs(value)]


def reference_output(model, x: np.ndarray) -> np.ndarray:
    """`model`'s first output on `x` (reference_outputs)."""
    return reference_outputs(model, x)[0][1]
