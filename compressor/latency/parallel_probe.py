"""How well the runtime's threads run in step right now: a small probe timed before and after each measurement.

On a virtual machine the host decides how the guest's cores run, and the runtime's threads feel it in
every operator. Measured on this project's 2-core VM (benchmarks/results/parallel_modes.md): ONNX Runtime's
2-thread latency of mobilenet_v2 switched, in stretches of seconds to a minute, between 3.98 ms and 6.69 ms,
while its 1-thread latency stayed at 7.4-7.5 ms and two threads hashing in parallel kept 1.9x of one. Work
split into many small operators waits on the other thread at every operator; coarse work does not see it.
So every millisecond a measurement gives depends on which state the machine was in, and two measurements
taken in different states disagree by up to 1.7x, whatever the model: a latency table against a later
check, a regression baseline against today's run.

The probe is a chain of small convolutions (pointwise and depthwise, 32 channels at 16x16), exported
with the profile's own exporter and timed on its runtime at the profile's threads and at one thread,
in alternating blocks; its *parallel speedup* is the 1-thread median over the N-thread median. Measuring
this needs the runtime itself (no library reports it), so it is written here; it takes 0.1-0.15 s.
A measurement whose probe moved by more than PROBE_TOLERANCE between its start and its end was taken
under changing conditions, and figures from probes further apart than that compare only as ratios
(records.py keeps those records, in code a device runs too).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from compressor.errors import CompressorError
from compressor.latency.records import differ
from compressor.latency.timing import PROBE_WARM_RUNS, parallel_speed

ONE_THREAD_TOLERANCE = 1.10  # one thread's fastest probe time between two runs (the regression gate's default
# threshold); single probes here read up to 1.8x their median for a tenth of a second, their fastest did not
PROBE_SHAPE = (1, 32, 16, 16)
PROBE_LAYERS = 40

_exported: dict[tuple, Path] = {}  # one probe artifact per runtime and opset, for this process
_folder: list[tempfile.TemporaryDirectory] = []


def _probe_module():
    """The chain, built in torch so that the profile's exporter writes it in the runtime's format."""
    import torch

    channels, layers = PROBE_SHAPE[1], []
    for _ in range(PROBE_LAYERS // 2):
        layers += [torch.nn.Conv2d(channels, channels, 1, bias=False), torch.nn.ReLU6(),
                   torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False), torch.nn.ReLU6()]
    torch.manual_seed(0)
    return torch.nn.Sequential(*layers).eval(), torch.ones(PROBE_SHAPE)


def probe_artifact(backend) -> Path:
    """The probe exported once per process for `backend`'s runtime (fp32, the backend's opset); a remote device
    gets it uploaded and times it there (remote/runner.py)."""
    from exporters import Backend

    key = (backend.runtime.name, backend.opset)
    if key not in _exported:
        if not _folder:
            _folder.append(tempfile.TemporaryDirectory(prefix="compressor-probe-"))
        fp32 = Backend(backend.runtime.name, "fp32", 1, backend.options, backend.opset)
        model, x = _probe_module()
        _exported[key] = fp32.export(model, x, Path(_folder[0].name) / f"probe-{key[0]}{fp32.suffix}")
    return _exported[key]


class ParallelProbe:
    """The probe's sessions on `backend`'s runtime, at its threads and at one; `measure()` times them."""

    def __init__(self, backend) -> None:
        import numpy as np

        from exporters import Backend

        path = probe_artifact(backend)
        x = np.ones(PROBE_SHAPE, np.float32)
        self.threads = backend.threads
        self.many = Backend(backend.runtime.name, "fp32", backend.threads, backend.options, backend.opset).open(path, x)
        self.one = Backend(backend.runtime.name, "fp32", 1, backend.options, backend.opset).open(path, x)
        for session in (self.one, self.many):
            for _ in range(PROBE_WARM_RUNS):
                session()

    def measure(self) -> dict:
        """{"speedup": 1-thread / N-thread median, "one_thread_ms", "threads_ms", "threads"} (timing.parallel_speed:
        it waits before until nothing else in the process is busy, since sessions just opened spin their pools
        too, and after until the probe's own threads stop, so the next model timed has the cores)."""
        return parallel_speed(self.one, self.many, self.threads)


def open_probe(backend) -> tuple[ParallelProbe | None, str | None]:
    """A probe for `backend`, or None and why not: one thread has nothing to keep in step, and a runtime
    that cannot run the probe here (TensorRT's bundle) is measured without it."""
    if backend is None or backend.threads <= 1:
        return None, None
    try:
        return ParallelProbe(backend), None
    except (CompressorError, ImportError, OSError) as e:
        return None, f"no parallel probe on {backend.runtime.name}: {e}"


def spread_warnings(speed: dict | None) -> list[str]:
    """What a run's probes (`summary`) say of its milliseconds: a warning where their parallel speedups spread
    beyond PROBE_TOLERANCE."""
    if not speed or not differ(speed["low"], speed["high"]):
        return []
    return [f"this machine ran the runtime's threads at {speed['low']:.2f}x to {speed['high']:.2f}x one thread's "
            "speed across measurements: milliseconds from different measurements compare only as ratios within each"]


def comparison_note(then: dict, now: dict, what: str) -> str | None:
    """A warning when `then`'s machine (a provenance dict: a baseline's, a table's) ran the probe otherwise than
    `now`'s: its median parallel speedup beyond PROBE_TOLERANCE, or its fastest one-thread time beyond
    ONE_THREAD_TOLERANCE (the fastest: a short slowdown only ever adds time), so that their milliseconds differ
    by the machine as well as by the models; None otherwise (or when either has no probe)."""
    a, b = ((m or {}).get("parallel_speedup") or {} for m in (then, now))
    one_a, one_b = ((s.get("one_thread_ms") or {}).get("low") for s in (a, b))
    reasons = [f"its runtime's threads ran at {a['median']:.2f}x one thread's speed, today's at "
               f"{b['median']:.2f}x"] if differ(a.get("median"), b.get("median")) else []
    reasons += [f"one thread ran the probe in {one_a:.3f} ms, today in {one_b:.3f} ms"
                ] if differ(one_a, one_b, ONE_THREAD_TOLERANCE) else []
    if not reasons:
        return None
    return (f"warning: {what} was measured with this machine in another state ({'; '.join(reasons)}; "
            "docs/measurement.md, 'parallel speed'): milliseconds differ by the machine as well as by the models")
