"""A Backend: one runtime with its session settings, and the exporter for its artifact format.

What a deployment target needs from this package: export an (already folded)
nn.Module to a validated artifact, open artifacts as prepared sessions with the
profile's settings, and check an artifact's outputs on a batch of inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.errors import InputError, ValidationError
from exporters.base import Session, as_numpy
from exporters.exporter import Exporter
from exporters.registry import get_exporter, get_runtime

TIMING_RANGE_RTOL = 1e-4  # export_block: an EfficientNet block chained 4 times on OpenVINO was off by 1.7e-4


class Backend:
    """`runtime` by name ("onnxruntime", "openvino", ...) with `threads` intra-op threads and its
    own `options`; artifacts are exported at `precision` with ONNX `opset`."""

    def __init__(self, runtime: str, precision: str = "fp32", threads: int = 1, options: dict | None = None,
                 opset: int = 17) -> None:
        self.runtime = get_runtime(runtime)
        self.exporter: Exporter = get_exporter(self.runtime.artifact_format, precision=precision)
        self.threads = threads
        self.options = dict(options or {})
        self.opset = opset

    @property
    def suffix(self) -> str:
        return self.exporter.suffix

    def export(self, model, example_input, path: Path) -> Path:
        """Export `model` (validated against it on `example_input`); returns the artifact's path."""
        return self.exporter.export(model, example_input, path, self.opset)

    def export_block(self, model, example_input, path: Path) -> Path:
        """Export a part of a model, on a random input, that is only timed (latency/steps.py): validated with
        TIMING_RANGE_RTOL of its output's range as well, since its output is an intermediate tensor, not
        logits: the runtime's summation order moves values near 0 by more than rtol of themselves, while a
        wrong graph is off by O(1) of the range."""
        return self.block_exporter().export(model, example_input, path, self.opset)

    def block_exporter(self) -> Exporter:
        """This backend's exporter with export_block's tolerance (a copy: its own stays as it is)."""
        import copy

        exporter = copy.copy(self.exporter)
        exporter.range_rtol = max(exporter.range_rtol, TIMING_RANGE_RTOL)
        return exporter

    def open(self, artifact: Path, example_input=None) -> Session:
        """A session on `artifact` with this backend's settings, prepared with `example_input` if given."""
        session = self.runtime.open(artifact, self.threads, self.options)
        if example_input is not None:
            session.prepare(as_numpy(example_input))
        return session

    def check_outputs(self, artifact: Path, inputs, expected, batch: int) -> float:
        """Run `artifact` on `inputs` `batch` at a time (its batch size is static) and compare with
        `expected`: one array, or a list of (name, array), one per output in the artifact's order (a
        model with several outputs); returns the largest |difference| (ValidationError beyond the
        exporter's tolerance, naming the output)."""
        x = as_numpy(inputs)
        usable = len(x) // batch * batch
        if usable == 0:
            msg = f"validation needs at least {batch} inputs for the batch size {batch}"
            raise InputError(msg)
        named = expected if isinstance(expected, list) else [("logits", expected)]
        session = self.open(artifact)
        runs = [session.run_all(x[i:i + batch]) for i in range(0, usable, batch)]
        if any(len(r) != len(named) for r in runs):
            msg = f"{artifact}: {len(runs[0])} outputs, the model has {len(named)}"
            raise ValidationError(msg)
        worst = 0.0
        for k, (name, reference) in enumerate(named):
            got = np.concatenate([r[k] for r in runs])
            worst = max(worst, self.exporter.check_close(got, reference[:usable], str(artifact), name))
        return worst
