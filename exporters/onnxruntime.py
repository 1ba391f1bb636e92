"""ONNX Runtime sessions with the MEASURE.md settings: explicit threads, sequential, ORT_ENABLE_ALL."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.errors import InputError
from exporters.base import Runtime, Session


class OnnxRuntimeSession(Session):
    def __init__(self, artifact: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(artifact), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            msg = f"ONNX Runtime cannot load {artifact}: {str(e).splitlines()[0][:200]}"
            raise InputError(msg) from e
        self.input_name = self.session.get_inputs()[0].name
        self.settings = {"runtime": "onnxruntime", "version": ort.__version__,
                         "provider": "CPUExecutionProvider", "intra_op_num_threads": threads,
                         "execution_mode": "sequential", "graph_optimization": "ORT_ENABLE_ALL"}
        self._feed: dict[str, np.ndarray] = {}

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]

    def prepare(self, x: np.ndarray) -> None:
        self._feed = {self.input_name: np.ascontiguousarray(x, np.float32)}

    def __call__(self) -> object:
        return self.session.run(None, self._feed)


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    artifact_format = "onnx"

    def open(self, artifact: Path, threads: int) -> Session:
        return OnnxRuntimeSession(artifact, threads)
