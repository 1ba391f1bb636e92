"""ONNX export with torch.onnx (TorchScript exporter: fast), onnx.checker, optional onnxslim,
external data for large models; validated in ONNX Runtime before it is written."""

from __future__ import annotations

import warnings
from pathlib import Path

from exporters.base import require
from exporters.exporter import Exporter

# protobuf refuses messages over 2 GiB; store weights beside the graph well before that
EXTERNAL_DATA_BYTES = 1 << 30


class OnnxExporter(Exporter):
    """fp32 ONNX; validated in ONNX Runtime against torch.

    Tolerance atol 1e-4 + rtol 1e-3 on the logits: ONNX Runtime sums in a
    different order than torch (fused BatchNorm, its own conv kernels), which
    moves fp32 results by ~1e-6 relative per layer over ~50 layers; a wrong
    graph differs by O(1).

    `dynamic_batch` makes axis 0 of input and output symbolic ("batch");
    `simplify` runs onnxslim; a model whose weights exceed `external_data_bytes`
    keeps them in `<name>.data` beside the graph.
    """

    name = "onnx"
    suffix = ".onnx"
    TOLERANCES = {"fp32": (1e-4, 1e-3, 0.0)}

    def __init__(self, precision: str = "fp32", dynamic_batch: bool = False, simplify: bool = False,
                 external_data_bytes: int = EXTERNAL_DATA_BYTES) -> None:
        super().__init__(precision)
        self.dynamic_batch = dynamic_batch
        self.simplify = simplify
        self.external_data_bytes = external_data_bytes

    def artifact_files(self, path: Path) -> list[Path]:
        data = Path(f"{path}.data")
        return [data, Path(path)] if data.exists() else [Path(path)]

    def run_staged(self, staged: Path, x):
        from exporters.onnxruntime import OnnxRuntimeSession

        return OnnxRuntimeSession(staged, 1).run_all(x)

    def write(self, model, example_input, staged: Path, opset: int) -> list[str]:
        """Write and check the ONNX file at `staged`; returns the file names written (graph last)."""
        import onnx
        import torch

        proto = None
        if isinstance(model, (str, Path)):
            proto = onnx.load(str(model))  # with its external data, if any
        else:
            from exporters.reference import flat_outputs

            with torch.no_grad():
                outputs = [name for name, _ in flat_outputs(model.eval()(example_input))]
            axes = {name: {0: "batch"} for name in ["input", *outputs]} if self.dynamic_batch else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model.eval(), (example_input,), str(staged), dynamo=False,
                                  opset_version=opset, input_names=["input"], output_names=outputs,
                                  dynamic_axes=axes, do_constant_folding=True)
            if self.simplify or sum(p.stat().st_size for p in staged.parent.iterdir()) > self.external_data_bytes:
                proto = onnx.load(str(staged))
        names = [staged.name]
        if proto is not None:
            if self.simplify:
                onnxslim = require("onnxslim", "ONNX simplification", "install it with `pip install onnxslim`")
                proto = onnxslim.slim(proto)
            for leftover in staged.parent.iterdir():  # per-tensor files torch may have written
                leftover.unlink()
            if _weight_bytes(proto) > self.external_data_bytes:
                data = f"{staged.name}.data"
                onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data, size_threshold=1024)
                names = [data, staged.name]
            else:
                onnx.save_model(proto, str(staged))
        onnx.checker.check_model(str(staged), full_check=True)
        return names


def _weight_bytes(proto) -> int:
    """Bytes of the graph's initializers (what external data would hold)."""
    import numpy as np
    from onnx import helper

    total = 0
    for t in proto.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            total += int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total
