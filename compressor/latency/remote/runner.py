"""The device-side runner: opens sessions, times them by the protocol, prints JSON on stdout.

Uploaded to the device (with timing.py beside it) and run there by the device's
Python: it needs only the standard library, numpy and the runtime (onnxruntime
or openvino). It does not import `exporters` or anything of compressor because
the device has no compressor (and no torch): the session settings below are
those of exporters/onnxruntime.py and exporters/openvino.py, kept in step with
them (tests/test_remote_runner.py checks that they agree). Those settings and
physical_cores() are deliberate copies of compressor's, the only ones the torch-free
device side keeps (measure.py's atomic write is another). The protocol itself
is not repeated here: it is timing.py's `measure_interleaved`, uploaded as is.

    python3 runner.py probe RUNTIME [WORKDIR]     provenance of the device, and whether the runtime imports
    python3 runner.py measure < job.json          interleaved rounds of the job's artifacts

Every answer is one JSON object on stdout; a failure is {"error": KIND, "message": ...}
with exit status 2 (KIND: missing-runtime, python, bad-artifact, disk, other).
"""

from __future__ import annotations

import datetime as dt
import glob
import importlib
import json
import os
import platform
import sys
import time

MIN_PYTHON = (3, 10)  # timing.py uses zip(strict=True)
HINTS = {"onnxruntime": "pip install onnxruntime", "openvino": "pip install openvino"}


class RunnerError(Exception):
    """A failure reported to the caller as {"error": kind, "message": ...}."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def _number(path: str) -> int | None:
    text = _read(path)
    try:
        return int(text, 0) if text else None
    except ValueError:
        return None


def _cpuinfo() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        found.setdefault(key.strip(), value.strip())
    return found


def physical_cores() -> int:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; os.cpu_count() where there are none
    (ARM boards list no core ids). The same rule as compressor/latency/machine.py."""
    pairs, phys = set(), None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            pairs.add((phys, value.strip()))
    return len(pairs) or os.cpu_count() or 1


def _os_name() -> str | None:
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.partition("=")[2].strip().strip('"')
    return None


def _cpufreq() -> dict:
    """Governor and frequencies (MHz) of cpu0's policy, where readable."""
    base = "/sys/devices/system/cpu/cpu0/cpufreq/"
    khz = {k: _number(base + f) for k, f in (("min", "cpuinfo_min_freq"), ("max", "cpuinfo_max_freq"))}
    return {"governor": _read(base + "scaling_governor"),
            "freq_mhz": {k: v / 1000 for k, v in khz.items() if v}}


def runtime_version(runtime: str) -> str:
    """Import the runtime; its version, or RunnerError("missing-runtime")."""
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(runtime)
    if module is None:
        raise RunnerError("other", f"the runner times onnxruntime and openvino artifacts, not {runtime}")
    try:
        lib = importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken native library
        raise RunnerError("missing-runtime", f"{sys.executable} cannot import {module} ({type(e).__name__}: "
                                             f"{e}); install it on the device: {HINTS[runtime]}") from e
    return lib.get_version() if runtime == "openvino" else lib.__version__


def provenance(runtime: str) -> dict:
    """The device: the keys of compressor's machine_info() where they apply, and host, board model, OS,
    kernel, runtime and version, CPU governor and frequencies (MHz), thermal zones."""
    info = _cpuinfo()
    cpu = info.get("model name") or info.get("Hardware") or platform.processor() or platform.machine()
    versions = {}
    try:
        import numpy

        versions["numpy"] = numpy.__version__
    except ImportError as e:
        raise RunnerError("missing-runtime", f"{sys.executable} cannot import numpy ({e}); install it on the "
                                             "device: pip install numpy") from e
    version = runtime_version(runtime)
    versions[runtime] = version
    zones = sorted(glob.glob("/sys/class/thermal/thermal_zone*"))
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": physical_cores(),
        "machine": platform.machine(), "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(), "versions": versions,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(), "model": _read("/proc/device-tree/model") or info.get("Model") or cpu,
        "os": _os_name(), "kernel": platform.release(), "runtime": runtime, "runtime_version": version,
        **_cpufreq(), "thermal_zones": [_read(z + "/type") for z in zones], "interpreter": sys.executable,
    }


def conditions() -> dict:
    """What can change under a measurement: hottest temperature (C), current frequency (MHz), throttle counts."""
    temps = [t / 1000 for t in (_number(z + "/temp") for z in glob.glob("/sys/class/thermal/thermal_zone*/"))
             if t is not None]
    cur = [f / 1000 for f in (_number(p) for p in glob.glob("/sys/devices/system/cpu/cpu*/cpufreq/scaling_cur_freq"))
           if f]
    counts = [_number(p) for p in glob.glob("/sys/devices/system/cpu/cpu*/thermal_throttle/*_throttle_count")]
    firmware = _number("/sys/devices/platform/soc/soc:firmware/get_throttled")  # Raspberry Pi: bit 2 = throttled now
    return {"temperature_c": max(temps) if temps else None, "freq_mhz": min(cur) if cur else None,
            "throttle_count": sum(c for c in counts if c is not None) if counts else None,
            "firmware_throttled": bool(firmware & 0x4) if firmware is not None else None,
            "time": time.time()}


def cool_down(above_c: float, max_s: float) -> float:
    """Wait while the hottest thermal zone is above `above_c`, at most `max_s`; the seconds waited."""
    t0 = time.time()
    while time.time() - t0 < max_s:
        temp = conditions()["temperature_c"]
        if temp is None or temp <= above_c:
            break
        time.sleep(min(2.0, max_s))
    return round(time.time() - t0, 3)


def changes(before: dict, after: dict, cooled_s: float, max_s: float) -> dict:
    """Start and end conditions, a throttle flag, and why the figures were taken under changing conditions."""
    def delta(key: str) -> float | None:
        a, b = before[key], after[key]
        return None if a is None or b is None else b - a

    throttled = bool((delta("throttle_count") or 0) > 0 or after["firmware_throttled"])
    reasons = []
    if (delta("temperature_c") or 0) > 10:
        reasons.append(f"temperature rose {delta('temperature_c'):.0f} C")
    if before["freq_mhz"] and after["freq_mhz"] and after["freq_mhz"] < 0.9 * before["freq_mhz"]:
        reasons.append(f"CPU frequency fell {before['freq_mhz']:.0f} -> {after['freq_mhz']:.0f} MHz")
    if throttled:
        reasons.append("the CPU was throttled")
    if cooled_s >= max_s:
        reasons.append(f"still hot after waiting {cooled_s:.0f} s to cool")
    return {"temperature_c": {"start": before["temperature_c"], "end": after["temperature_c"]},
            "freq_mhz": {"start": before["freq_mhz"], "end": after["freq_mhz"]},
            "throttled": throttled, "changing": reasons, "cooled_s": cooled_s,
            "seconds": round(after["time"] - before["time"], 3)}


def open_ort(artifact: str, threads: int, options: dict):
    """ONNX Runtime as exporters/onnxruntime.py opens it: explicit intra-op threads, one inter-op thread,
    sequential, ORT_ENABLE_ALL, the runtime's default spinning unless options.allow_spinning says."""
    import onnxruntime as ort

    spinning = None if options.get("allow_spinning") is None else bool(options["allow_spinning"])
    # the same lines as exporters/onnxruntime.py's session, on purpose: the device has no compressor
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(artifact, so, providers=["CPUExecutionProvider"])
    settings = {"runtime": "onnxruntime", "version": ort.__version__, "provider": "CPUExecutionProvider",
                "intra_op_num_threads": threads, "execution_mode": "sequential",
                "graph_optimization": "ORT_ENABLE_ALL",
                "allow_spinning": "default (on)" if spinning is None else spinning}
    name = session.get_inputs()[0].name

    def prepared(x):
        feed = {name: x}
        return lambda: session.run(None, feed)

    return prepared, settings


def open_openvino(artifact: str, threads: int, options: dict):
    """OpenVINO as exporters/openvino.py opens it: CPU, LATENCY hint, one stream, f32 inference precision,
    one synchronous infer request."""
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads),
              "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}
    config.update({str(k).upper(): v for k, v in options.items()})
    core = ov.Core()
    compiled = core.compile_model(core.read_model(artifact, os.path.splitext(artifact)[0] + ".bin"), "CPU", config)
    request = compiled.create_infer_request()
    settings = {"runtime": "openvino", "version": ov.get_version(), "device": "CPU",
                "inference": "synchronous, one infer request",
                **{k.lower(): str(v) for k, v in config.items()}}

    def prepared(x):
        request.set_input_tensor(ov.Tensor(x, shared_memory=True))

        def run():
            request.infer()
            return request.get_output_tensor(0)

        return run

    return prepared, settings


OPENERS = {"onnxruntime": open_ort, "openvino": open_openvino}


def _open(job: dict, path: str, threads: int, x, what: str = "") -> tuple:
    """A prepared run() of `path` at `threads` on input `x`, and its session settings; RunnerError("bad-artifact")
    naming the file (`what` says what it is)."""
    try:
        prepared, settings = OPENERS[job["runtime"]](path, threads, job.get("options") or {})
    except Exception as e:  # each runtime raises its own types for a file it cannot load
        raise RunnerError("bad-artifact", f"{job['runtime']} cannot load {what}{path}: {e}") from e
    return prepared(x), settings


def open_all(job: dict, x) -> tuple[list, dict]:
    """A prepared run() per artifact, and the session settings; RunnerError("bad-artifact") naming the file."""
    runtime_version(job["runtime"])
    runs, settings = [], {}
    for path in job["artifacts"]:
        run, settings = _open(job, path, job["threads"], x)
        runs.append(run)
    return runs, settings


def open_probe(job: dict) -> list | None:
    """The parallel probe's prepared runs at one thread and at the job's threads, warmed up, where the job
    sends one ({"artifact", "shape", "warm_runs"}) and runs more than one thread; else None."""
    import numpy as np

    spec = job.get("probe")
    if not spec or job["threads"] <= 1:
        return None
    x = np.ones(spec["shape"], np.float32)
    runs = [_open(job, spec["artifact"], threads, x, "the probe ")[0] for threads in (1, job["threads"])]
    for run in runs:
        for _ in range(spec["warm_runs"]):
            run()
    return runs


def measure(job: dict) -> dict:
    """Cool down, open every artifact, time them in interleaved rounds (timing.measure_interleaved), framed
    by the parallel probe where the job sends one (timing.parallel_speed); the statistics with raw samples
    (ms), per-round medians, settings, conditions and the probes."""
    import numpy as np
    from timing import TimingPolicy, measure_interleaved, parallel_speed  # uploaded beside this file

    job = {**job, "threads": job.get("threads") or physical_cores()}
    x = np.ascontiguousarray(np.load(job["input"]), np.float32)
    cooled = cool_down(job.get("cool_above_c", 1e9), job.get("cool_max_s", 0))
    runs, settings = open_all(job, x)
    probe = open_probe(job)
    before = conditions()
    start = parallel_speed(*probe, job["threads"]) if probe else None
    result = measure_interleaved(runs, TimingPolicy.from_dict(job["policy"]), job.get("burst", 5))
    end = parallel_speed(*probe, job["threads"]) if probe else None
    after = conditions()
    answer = {"stats": [s.to_dict(with_samples=True) for s in result.stats], "round_medians": result.round_medians,
              "burst": result.burst, "cooldown_s": result.cooldown_s, "settings": settings, "threads": job["threads"],
              "conditions": changes(before, after, cooled, job.get("cool_max_s", 0))}
    if probe:
        answer["probe_ms"] = {"start": start, "end": end}
    return answer


def probe(runtime: str, workdir: str | None) -> dict:
    """Provenance, and the free space (bytes) where artifacts will be uploaded."""
    if sys.version_info < MIN_PYTHON:
        raise RunnerError("python", f"{sys.executable} is Python {platform.python_version()}; the runner needs "
                                    f"{'.'.join(map(str, MIN_PYTHON))} or newer")
    found = provenance(runtime)
    if workdir:
        st = os.statvfs(workdir)
        found["free_bytes"] = st.f_bavail * st.f_frsize
    return found


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["probe"] and len(argv) in (2, 3):
            answer = probe(argv[1], argv[2] if len(argv) == 3 else None)
        elif argv == ["measure"]:
            answer = measure(json.load(sys.stdin))
        else:
            raise RunnerError("other", "usage: runner.py probe RUNTIME [WORKDIR] | runner.py measure < job.json")
    except RunnerError as e:
        answer, status = {"error": e.kind, "message": str(e)}, 2
    except OSError as e:
        kind = "disk" if e.errno == 28 else "other"  # ENOSPC
        answer, status = {"error": kind, "message": f"{type(e).__name__}: {e}"}, 2
    else:
        status = 0
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
