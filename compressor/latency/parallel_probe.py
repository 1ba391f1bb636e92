"""How well the runtime's threads run in step right now: a small probe timed before and after each measurement.

On a virtual machine the host decides how the guest's cores run, and the runtime's threads feel it in
every operator. Measured on this project's 2-core VM (benchmarks/results/parallel_modes.md): ONNX Runtime's
2-thread latency of mobilenet_v2 switched, for minutes at a time, between about 1.3 ms and 2.2 ms, while its
1-thread latency stayed at 2.3-2.6 ms and two threads hashing in parallel kept 1.9x of one. Work split
into many small operators waits on the slower thread at every operator; coarse work does not see it.
So every millisecond a measurement gives depends on which state the machine was in, and two measurements
taken in different states disagree by up to 1.7x, whatever the model: a latency table against a later
check, a regression baseline against today's run.

The probe is a chain of small convolutions (pointwise and depthwise, 32 channels at 16x16), exported
with the profile's own exporter and timed on its runtime at the profile's threads and at one thread,
in alternating blocks; its *parallel speedup* is the 1-thread median over the N-thread median. Measuring
this needs the runtime itself (no library reports it), so it is written here; it takes about 50 ms.
A measurement whose probe moved by more than PROBE_TOLERANCE between its start and its end was taken
under changing conditions, and figures from probes further apart than that compare only as ratios.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from compressor.errors import CompressorError
from compressor.latency.timing import busy_after

PROBE_TOLERANCE = 1.5  # probes differ when one is this many times the other (the two states here: 2.2-2.7x apart;
# within one state consecutive probes stayed within 1.3x)
PROBE_SHAPE = (1, 32, 16, 16)
PROBE_LAYERS = 40
BLOCK_RUNS = 8  # timed runs per block, after one untimed run that wakes the session's threads
ROUNDS = 6  # blocks per session, alternating

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


def _artifact(backend) -> Path:
    """The probe exported once per process for `backend`'s runtime (fp32, the backend's opset)."""
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

        path = _artifact(backend)
        x = np.ones(PROBE_SHAPE, np.float32)
        self.threads = backend.threads
        self.many = Backend(backend.runtime.name, "fp32", backend.threads, backend.options, backend.opset).open(path, x)
        self.one = Backend(backend.runtime.name, "fp32", 1, backend.options, backend.opset).open(path, x)
        for session in (self.one, self.many):
            for _ in range(2 * BLOCK_RUNS):
                session()

    def measure(self) -> dict:
        """{"speedup": 1-thread / N-thread median, "one_thread_ms", "threads_ms", "threads"}. Waits before until
        nothing else in the process is busy (sessions just opened spin their pools too), and after until the
        probe's own threads stop, so the next model timed has the cores."""
        busy_after()
        times: dict[str, list[float]] = {"one": [], "many": []}
        for _ in range(ROUNDS):
            for name, session in (("one", self.one), ("many", self.many)):
                session()  # wakes the session's threads: not timed
                for _ in range(BLOCK_RUNS):
                    t0 = time.perf_counter_ns()
                    session()
                    times[name].append((time.perf_counter_ns() - t0) / 1e6)
        busy_after()
        one, many = statistics.median(times["one"]), statistics.median(times["many"])
        return {"speedup": round(one / many, 3), "one_thread_ms": round(one, 4), "threads_ms": round(many, 4),
                "threads": self.threads}


def open_probe(backend) -> tuple[ParallelProbe | None, str | None]:
    """A probe for `backend`, or None and why not: one thread has nothing to keep in step, and a runtime
    that cannot run the probe here (TensorRT's bundle) is measured without it."""
    if backend is None or backend.threads <= 1:
        return None, None
    try:
        return ParallelProbe(backend), None
    except (CompressorError, ImportError, OSError) as e:
        return None, f"no parallel probe on {backend.runtime.name}: {e}"


def differ(a: float | None, b: float | None) -> bool:
    """Whether two parallel speedups are further apart than PROBE_TOLERANCE (False if either is missing)."""
    return bool(a and b) and max(a, b) / min(a, b) > PROBE_TOLERANCE


def conditions(before: dict, after: dict, seconds: float) -> dict:
    """One measurement's record: the probe at its start and end, and whether the speedup moved beyond the
    tolerance while it ran (the remote devices' `changing` list, here with the probe's reason)."""
    a, b = before["speedup"], after["speedup"]
    changing = [f"the runtime's {before['threads']} threads ran at {a:.2f}x one thread's speed at the start "
                f"and {b:.2f}x at the end"] if differ(a, b) else []
    return {"parallel_speedup": {"start": a, "end": b}, "probe_ms": {"start": before, "end": after},
            "changing": changing, "throttled": False, "reference": None, "seconds": round(seconds, 3)}


def summary(measurements: list[dict]) -> dict | None:
    """The parallel speedups over `measurements` (every probe's): low, median and high; None: no probe."""
    values = [m["parallel_speedup"][k] for m in measurements if m.get("parallel_speedup") for k in ("start", "end")]
    if not values:
        return None
    return {"low": min(values), "median": round(statistics.median(values), 3), "high": max(values),
            "probes": len(values)}


def comparison_note(then: dict, now: dict, what: str) -> str | None:
    """A warning when `then`'s machine (a provenance dict: a baseline's, a table's) ran its runtime's threads
    at another parallel speed than `now`'s, so that their milliseconds do not compare; None otherwise."""
    a, b = (((m or {}).get("parallel_speedup") or {}).get("median") for m in (then, now))
    if not differ(a, b):
        return None
    return (f"warning: {what} was measured while the runtime's threads ran at {a:.2f}x one thread's speed, "
            f"this measurement at {b:.2f}x (docs/measurement.md, 'parallel speed'): their milliseconds differ "
            "by the machine's state as well as by the models")
