"""ONNX Runtime sessions as users deploy them (docs/measurement.md): explicit threads, sequential,
ORT_ENABLE_ALL, the runtime's own thread spinning unless the profile sets `allow_spinning`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.errors import InputError, first_line
from exporters.base import Runtime, Session


def spinning_setting(options: dict | None) -> bool | None:
    """The profile's `allow_spinning` (True, False), or None: ONNX Runtime's default (spinning on)."""
    value = (options or {}).get("allow_spinning")
    return None if value is None else bool(value)


class OnnxRuntimeSession(Session):
    """The intra-op pool keeps ONNX Runtime's default, spinning (its workers busy-wait ~40 ms after a run,
    ready for the next), unless the profile's `allow_spinning` says otherwise: users deploy the
    default, and it reads 1.7x faster per inference than spinning off. Interleaved timing keeps it fair
    by a cool-down between models (compressor/latency/timing.py), not by turning it off."""

    def __init__(self, artifact: Path, threads: int, options: dict | None = None) -> None:
        import onnxruntime as ort

        spinning = spinning_setting(options)
        # compressor/latency/remote/runner.py repeats these lines on purpose (the device has no compressor)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if spinning is not None:
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
                         "allow_spinning": "default (on)" if spinning is None else spinning}
        self._feed: dict[str, np.ndarray] = {}

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_all(x)[0]

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)}))

    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

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
