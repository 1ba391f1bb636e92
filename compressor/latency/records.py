"""What a measurement's record says of the conditions it was taken in: the parallel probe at its start and
end (parallel_probe.py), whether the probe moved, a summary over a run's probes, and a device's log entry.

Free of torch and of compressor's own imports on purpose: it is uploaded beside runner.py and timing.py,
so a remote device's runner, an offline bundle's measure.py and this machine write the same records from
the same code.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

PROBE_TOLERANCE = 1.5  # probes differ when one is this many times the other (the two states' medians here: 2.6x
# apart on ONNX Runtime, 1.9x on OpenVINO; within one state most probes stayed within 1.3x of each other)


def differ(a: float | None, b: float | None, tolerance: float = PROBE_TOLERANCE) -> bool:
    """Whether two positive figures are further apart than `tolerance` times (False if either is missing)."""
    return bool(a and b) and max(a, b) / min(a, b) > tolerance


def probe_frame(before: dict, after: dict, seconds: float) -> dict:
    """One measurement's record: the probe at its start and end, and whether the parallel speedup moved
    beyond PROBE_TOLERANCE while it ran (the remote devices' `changing` list, with the probe's reason).
    One thread's time is recorded, not judged here: one probe's can catch a slowdown of a tenth of a second."""
    a, b = before["speedup"], after["speedup"]
    changing = [f"the runtime's {before['threads']} threads ran at {a:.2f}x one thread's speed at the start "
                f"and {b:.2f}x at the end"] if differ(a, b) else []
    return {"parallel_speedup": {"start": a, "end": b}, "probe_ms": {"start": before, "end": after},
            "changing": changing, "throttled": False, "reference": None, "seconds": round(seconds, 3)}


def _spread(values: list[float]) -> dict:
    return {"low": min(values), "median": round(statistics.median(values), 4), "high": max(values)}


def probe_summary(measurements: Sequence[dict]) -> dict | None:
    """Over `measurements` (every probe's): the parallel speedup's low, median and high, how many probes,
    and one thread's probe time (ms) likewise; None: no probe."""
    probes = [m["probe_ms"][k] for m in measurements if m.get("probe_ms") for k in ("start", "end")]
    if not probes:
        return None
    return {**_spread([p["speedup"] for p in probes]), "probes": len(probes),
            "one_thread_ms": _spread([p["one_thread_ms"] for p in probes])}


def log_entry(host: str, names: Sequence[str], floors: dict, result: dict, check: dict | None) -> dict:
    """One device measurement's record for the provenance: where, what (`names`), the timing floors
    ({"min_runs", "min_time_s"}), the runner's conditions (with the parallel probe's start and end where
    the runner framed it so, and its move among the changes), the re-timed reference's `check`, and warnings."""
    conditions = result["conditions"]
    if result.get("probe_ms"):
        framed = probe_frame(result["probe_ms"]["start"], result["probe_ms"]["end"], 0.0)
        conditions = {**conditions, "changing": [*conditions["changing"], *framed["changing"]],
                      "parallel_speedup": framed["parallel_speedup"], "probe_ms": framed["probe_ms"]}
    what = ", ".join(names)
    warnings = []
    if conditions["throttled"]:
        warnings.append(f"{host}: the CPU was throttled while timing {what}")
    if conditions["changing"]:
        warnings.append(f"{host}: {what} timed under changing conditions ({'; '.join(conditions['changing'])})")
    if check is not None and check["drifted"]:
        warnings.append(f"{host}: the reference {check['artifact']} now times {check['median_ms']:.3f} ms against "
                        f"{check['earlier_ms']:.3f} ms before ({check['drift']:+.0%}): the device's conditions "
                        f"changed during the run")
    return {"host": host, "artifacts": list(names),
            "policy": {"min_runs": floors["min_runs"], "min_time_s": floors["min_time_s"]},
            "threads": result.get("threads"), "session": result.get("settings"), **conditions,
            "reference": check, "warnings": warnings}
