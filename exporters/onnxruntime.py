"""ONNX Runtime sessions with the settings of docs/measurement.md: explicit threads, sequential, ORT_ENABLE_ALL."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.errors import InputError, first_line
from exporters.base import Runtime, Session


class OnnxRuntimeSession(Session):
    """Spinning of the intra-op pool is off by default: with several sessions timed in
    interleaved rounds, an idle session's spinning threads steal the cores of the one
    being timed (measured here: IQR/median 75% with spinning, 10% without)."""

    def __init__(self, artifact: Path, threads: int, options: dict | None = None) -> None:
        import onnxruntime as ort

        spinning = bool((options or {}).get("allow_spinning", False))
        # compressor/latency/remote/runner.py repeats these lines on purpose (the device has no compressor)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(str(artifact), so,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            msg = f"ONNX Runtime cannot load {artifact}: {first_line(e)}"
            raise InputError(msg) from e
        self.input_name = self.session.get_inputs()[0].name
        self.settings = {"runtime": "onnxruntime", "version": ort.__version__,
                         "provider": "CPUExecutionProvider", "intra_op_num_threads": threads,
                         "execution_mode": "sequential", "graph_optimization": "ORT_ENABLE_ALL",
                         "allow_spinning": spinning}
        self._feed: dict[str, np.ndarray] = {}

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]

    def input_shape(self) -> list[int | None]:
        return [d if isinstance(d, int) and d > 0 else None for d in self.session.get_inputs()[0].shape]

    def prepare(self, x: np.ndarray) -> None:
        self._feed = {self.input_name: np.ascontiguousarray(x, np.float32)}

    def __call__(self) -> object:
        return self.session.run(None, self._feed)


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    artifact_format = "onnx"

    def open(self, artifact: Path, threads: int, options: dict | None = None) -> Session:
        return OnnxRuntimeSession(artifact, threads, options)
