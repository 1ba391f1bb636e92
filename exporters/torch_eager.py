"""Torch eager reference runtime: the model as a torch.export program (.pt2), run eagerly.

A .pt2 is a real, re-loadable artifact that needs no pickle execution
(`torch.export.load`) and no TorchScript; its `.module()` runs the exported
ATen graph op by op in eager mode. Reference only (docs/measurement.md):
torch.set_num_threads(threads), inference_mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.errors import InputError, first_line
from exporters.base import Runtime, Session
from exporters.exporter import Exporter


class TorchExporter(Exporter):
    """fp32 torch.export program; the same kernels as torch, so atol 1e-5 + rtol 1e-4
    (only the decomposition of a few ops can change the summation order)."""

    name = "torch"
    suffix = ".pt2"
    TOLERANCES = {"fp32": (1e-5, 1e-4, 0.0)}

    def __init__(self, precision: str = "fp32", dynamic_batch: bool = False) -> None:
        super().__init__(precision)
        self.dynamic_batch = dynamic_batch

    def write(self, model, example_input, staged: Path, opset: int) -> list[str]:
        """`opset` is ignored; an ONNX file is refused (torch cannot import ONNX). With `dynamic_batch`,
        the program takes any batch size (traced on a batch of at least 2: torch.export specialises 1)."""
        import torch

        if isinstance(model, (str, Path)):
            msg = "the torch format exports an nn.Module, not an ONNX file"
            raise InputError(msg)
        shapes = None
        if self.dynamic_batch:
            if len(example_input) < 2:
                example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
            shapes = ({0: torch.export.Dim("batch", min=1)},)
        program = torch.export.export(model.eval(), (example_input,), dynamic_shapes=shapes)
        torch.export.save(program, str(staged))
        return [staged.name]

    def run_staged(self, staged: Path, x: np.ndarray) -> list[np.ndarray]:
        session = TorchSession(staged, 1)
        if self.dynamic_batch:  # the program must take another batch size too
            session.run(np.concatenate([x, x, x]))
        return session.run_all(x)


class TorchSession(Session):
    def __init__(self, artifact: Path, threads: int, options: dict | None = None) -> None:
        import torch

        try:
            self.module = torch.export.load(str(artifact)).module()
        except Exception as e:  # zipfile.BadZipFile, RuntimeError, FileNotFoundError, ...
            msg = f"torch cannot load {artifact} as a torch.export program: {first_line(e)}"
            raise InputError(msg) from e
        self.threads = threads
        self.settings = {"runtime": "torch", "version": torch.__version__, "mode": "eager (torch.export program)",
                         "num_threads": threads, "inference_mode": True}
        self._input = None

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_all(x)[0]

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        from exporters.reference import flat_outputs

        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            value = self.module(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        return [t.numpy() for _, t in flat_outputs(value)]

    def prepare(self, x: np.ndarray) -> None:
        import torch

        torch.set_num_threads(self.threads)
        self._input = torch.from_numpy(np.ascontiguousarray(x, np.float32))

    def __call__(self) -> object:
        import torch

        with torch.inference_mode():
            return self.module(self._input)


class TorchRuntime(Runtime):
    name = "torch"
    artifact_format = "torch"

    def open(self, artifact: Path, threads: int, options: dict | None = None) -> Session:
        return TorchSession(artifact, threads, options)
