"""A device reached over SSH, and a pool of identical ones: the Device of compressor/latency/device.py.

Per session the runner (runner.py with timing.py beside it) is uploaded once
into a fresh folder under the profile's workdir; every artifact is uploaded
once, keyed by the sha256 of its files, and the folder is removed at the end
(`close`). A measurement sends a job to the runner and gets raw samples back;
conditions (temperature, frequency, throttling, and the parallel probe timed
there before and after, where the policy asks for it: parallel_probe.py) are
recorded with each one, and the first artifact ever measured (the baseline, in
a prune) is re-timed at least every `retime_every` measurements to catch drift
(conditions.py).
"""

from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import hashlib
import io
import json
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from compressor.errors import CompressorError, DeviceError, InputError
from compressor.latency.parallel_probe import PROBE_SHAPE, spread_warnings
from compressor.latency.records import log_entry, probe_summary
from compressor.latency.remote.conditions import DriftWatch, version_matches
from compressor.latency.remote.spec import Endpoint, RemoteSpec
from compressor.latency.remote.transport import Answer, Link, TransientError, call
from compressor.latency.timing import PROBE_WARM_RUNS, Interleaved, LatencyStats, TimingPolicy

HERE = Path(__file__).resolve().parent
RUNNER_FILES = {"runner.py": HERE / "runner.py", "timing.py": HERE.parent / "timing.py",
                "records.py": HERE.parent / "records.py"}
RUNTIMES = ("onnxruntime", "openvino")  # what runner.OPENERS opens
ERRORS = {"missing-runtime": "{host}: {message}", "python": "{host}: {message} (set remote.python)",
          "bad-artifact": "{host}: {message}", "disk": "the device {host} has no space left: {message}"}
Log = Callable[[str], None]
T = TypeVar("T")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def files_key(files: Sequence[Path]) -> str:
    """sha256 over an artifact's files (names and bytes): what it is uploaded and found under."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class RemoteDevice:
    """One device over SSH; `time` runs a measurement there and returns its raw samples."""

    def __init__(self, spec: RemoteSpec, endpoint: Endpoint, runtime: str, threads: int | None, options: dict,
                 artifact_files: Callable[[Path], list[Path]], log: Log | None = None,
                 probe: Callable[[], Path] | None = None) -> None:
        if runtime not in RUNTIMES:
            msg = f"remote measurement times {' and '.join(RUNTIMES)} artifacts; this profile's runtime is {runtime}"
            raise InputError(msg)
        self.spec, self.endpoint, self.runtime = spec, endpoint, runtime
        self.threads, self.options, self.artifact_files = threads, dict(options), artifact_files
        self.log = log or _stderr
        self.link = Link(spec, endpoint)
        self.folder = f"{spec.workdir.rstrip('/')}/compressor-{secrets.token_hex(6)}"
        self.uploaded: dict[str, str] = {}  # key -> remote path
        self.static: dict = {}
        self.measurements: list[dict] = []
        self.warnings: list[str] = []
        self.drift = DriftWatch(spec.retime_every, spec.drift_tolerance)
        self.lock: asyncio.Lock | None = None
        self.closed = False
        self.reached = False  # a session was opened: later failures are the device's, not the profile's
        self.probe = probe  # exports the parallel probe for this runtime (parallel_probe.probe_artifact)
        self._probe_path: str | None = None

    @property
    def name(self) -> str:
        return str(self.endpoint)

    # ------------------------------------------------------------ session

    async def open(self) -> None:
        """Connect, upload the runner, probe the device, check its runtime version."""
        self.lock = asyncio.Lock()
        await self._retrying(lambda: asyncio.sleep(0))  # connect
        await self.link.mkdir(self.folder)
        for name, local in RUNNER_FILES.items():
            await self.link.put(local, f"{self.folder}/{name}")
        answer = await self.link.run(self.link.command(self.folder, "runner.py", "probe", self.runtime, self.folder),
                                     "", self.spec.connect_timeout_s + 60)
        self.static = self._parse(answer, "probing the device")
        self.reached = True
        self._check_version()

    def _check_version(self) -> None:
        found, named = self.static["runtime_version"], self.spec.runtime_version
        if named is None:
            note = (f"note: {self.name} runs {self.runtime} {found}; the profile names no remote.runtime_version, "
                    f"so this is recorded, not checked")
            self.warnings.append(note)
            self.log(note)
        elif not version_matches(found, named):
            msg = (f"{self.name} has {self.runtime} {found}, the profile names {named} (remote.runtime_version): "
                   f"a runtime upgrade can change latency several times over; install {named} on the device "
                   "or change the profile")
            raise InputError(msg)

    async def close_async(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.link.sftp is not None:
                await self.link.remove_tree(self.folder)
        except (InputError, TransientError) as e:
            self.log(f"warning: could not remove {self.folder} on {self.name}: {e}")
        finally:
            await self.link.close()

    def close(self) -> None:
        """Remove this session's folder on the device (runner and artifacts) and disconnect."""
        if not self.closed:
            call(self.close_async())

    # ------------------------------------------------------------ uploads and runs

    async def _upload(self, files: Sequence[Path], key: str) -> str:
        """The remote folder holding `files`, uploaded once per session (checked against the free space)."""
        if key not in self.uploaded:
            size = sum(f.stat().st_size for f in files)
            free = self.static.get("free_bytes")
            if free is not None and size > free:
                msg = (f"the device {self.name} has {free / 1e6:.1f} MB free in {self.spec.workdir}, "
                       f"{files[-1].name} needs {size / 1e6:.1f} MB: free some space or change remote.workdir")
                raise InputError(msg)
            folder = f"{self.folder}/a/{key[:20]}"
            await self.link.mkdir(folder)
            for f in files:
                await self.link.put(f, f"{folder}/{f.name}")
            self.uploaded[key] = folder
            if free is not None:
                self.static["free_bytes"] = free - size
        return self.uploaded[key]

    async def _upload_input(self, x: np.ndarray, staging: Path) -> str:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(x, np.float32))
        key = hashlib.sha256(buffer.getvalue()).hexdigest()
        path = staging / "input.npy"
        path.write_bytes(buffer.getvalue())
        return f"{await self._upload([path], key)}/input.npy"

    def _parse(self, answer: Answer, what: str) -> dict:
        """The runner's JSON answer; TransientError for a killed runner, InputError for its errors."""
        if answer.signal or answer.status in (137, 143, -1):
            msg = f"the runner on {self.name} was killed (signal {answer.signal or answer.status}) while {what}"
            raise TransientError(msg)
        lines = answer.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            result = None
        if not isinstance(result, dict):
            last = (answer.stderr.strip().splitlines() or ["no output"])[-1][:300]
            msg = f"the runner on {self.name} failed while {what} (exit {answer.status}): {last}"
            raise InputError(msg)
        if "error" in result:
            template = ERRORS.get(result["error"], "the runner on {host} failed: {message}")
            raise InputError(template.format(host=self.name, message=result.get("message")))
        return result

    def _job(self, paths: list[str], x_path: str, policy: TimingPolicy) -> dict:
        return {"runtime": self.runtime, "threads": self.threads, "options": self.options, "artifacts": paths,
                "input": x_path, "policy": vars(policy), "burst": 5, "cool_above_c": self.spec.cool_above_c,
                "cool_max_s": self.spec.cool_max_s}

    def _timeout(self, n: int, policy: TimingPolicy) -> float:
        """Seconds one measurement of `n` artifacts may take: floors, warm-ups, re-measures, loading, cooling."""
        floors = n * (policy.warmup_s + 2) + policy.min_time_s * n * max(1, policy.max_repeats)
        return self.spec.command_timeout_s + 3 * floors + self.spec.cool_max_s

    async def _measure(self, artifacts: Sequence[Path], policy: TimingPolicy, x: np.ndarray, staging: Path
                       ) -> tuple[list[str], dict, dict | None]:
        """Upload what is missing, run one job (the reference prepended when due); (keys, result, reference)."""
        keys, paths = [], []
        for artifact in artifacts:
            files = self.artifact_files(Path(artifact))
            key = files_key(files)
            keys.append(key)
            paths.append(f"{await self._upload(files, key)}/{Path(artifact).name}")
        reference = self.drift.due(keys)
        if reference is not None:
            paths.insert(0, reference["path"])
        job = self._job(paths, await self._upload_input(x, staging), policy)
        if policy.parallel_probe and (probe := await self._uploaded_probe()) is not None:
            job["probe"] = {"artifact": probe, "shape": list(PROBE_SHAPE), "warm_runs": PROBE_WARM_RUNS}
        command = self.link.command(self.folder, "runner.py", "measure")
        answer = await self.link.run(command, json.dumps(job), self._timeout(len(paths), policy))
        return keys, self._parse(answer, f"timing {', '.join(Path(a).name for a in artifacts)}"), reference

    async def _uploaded_probe(self) -> str | None:
        """The parallel probe's path on the device, exported and uploaded at the first measurement that asks
        for it (None without a probe: none given, or one that cannot be exported here, which is warned of
        once; the runner leaves it out at one thread)."""
        if self._probe_path is None and self.probe is not None:
            try:
                path = self.probe()
                files = self.artifact_files(path)
            except (CompressorError, ImportError, OSError) as e:
                self.warnings.append(f"no parallel probe on {self.name}: {e}")
                self.probe = None
                return None
            self._probe_path = f"{await self._upload(files, files_key(files))}/{path.name}"
        return self._probe_path

    async def time_async(self, artifacts: Sequence[Path], policy: TimingPolicy, x: np.ndarray,
                         staging: Path) -> Interleaved:
        """One measurement on this device, retried (reconnecting if need be) after a transient failure."""
        async with self.lock:
            keys, result, reference = await self._retrying(lambda: self._measure(artifacts, policy, x, staging))
            return self._record(artifacts, keys, result, reference, policy)

    async def _retrying(self, step: Callable[[], Awaitable[T]]) -> T:
        """`step()` on a connected link; after a transient failure (connection lost or refused, runner killed,
        timeout) reconnect and retry, `spec.retries` times, waiting `spec.retry_wait_s` before the first retry
        and twice as long before each further one. Then DeviceError (exit 4) once the device had been reached
        in this session, else InputError: the profile names a device that never answered."""
        for attempt in range(self.spec.retries + 1):
            try:
                if self.link.conn is None:
                    await self.link.open(reconnecting=self.reached)
                return await step()
            except TransientError as e:
                if attempt == self.spec.retries:
                    msg = f"{e} (tried {attempt + 1} times)"
                    raise (DeviceError(msg) if self.reached else InputError(msg)) from e
                wait = self.spec.retry_wait_s * 2 ** attempt
                self.log(f"warning: {e}; retrying in {wait:g} s")
                await self.link.close()
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    def _record(self, artifacts: Sequence[Path], keys: list[str], result: dict, reference: dict | None,
                policy: TimingPolicy) -> Interleaved:
        stats = [LatencyStats(**s) for s in result["stats"]]
        rounds = result["round_medians"]
        measured = {"keys": keys, "names": [Path(a).name for a in artifacts],
                    "paths": [f"{self.uploaded[k]}/{Path(a).name}" for k, a in zip(keys, artifacts, strict=True)]}
        check = self.drift.observe(measured, stats, reference)
        if reference is not None:
            stats, rounds = stats[1:], rounds[1:]
        entry = log_entry(self.name, measured["names"], {"min_runs": policy.min_runs, "min_time_s": policy.min_time_s},
                          result, check)
        self.measurements.append(entry)
        for warning in entry["warnings"]:
            self.warnings.append(warning)
            self.log(f"warning: {warning}")
        return Interleaved(stats, rounds, result.get("burst", 5), result.get("cooldown_s", 0.0))

    def time(self, artifacts: Sequence[Path], policy: TimingPolicy, x: np.ndarray) -> Interleaved:
        """Interleaved protocol measurement of `artifacts` on the device, each on input `x`."""
        import tempfile

        with tempfile.TemporaryDirectory() as staging:
            return call(self.time_async(artifacts, policy, x, Path(staging)))

    def provenance(self) -> dict:
        """The device as probed (machine_info()'s keys where they apply, and more), the conditions of every
        measurement so far, and whether any was throttled, taken under changing conditions or drifted."""
        static = {k: v for k, v in self.static.items() if k != "free_bytes"}
        speed = probe_summary(self.measurements)
        return {**static, **({"parallel_speedup": speed} if speed else {}),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "host": self.name, "threads": self.threads, "remote": self.spec.to_dict(),
                "measurements": list(self.measurements),
                "throttled": any(m["throttled"] for m in self.measurements),
                "changing_conditions": any(m["changing"] for m in self.measurements),
                "drifted": any((m["reference"] or {}).get("drifted") for m in self.measurements),
                "warnings": [*self.warnings, *spread_warnings(speed)]}


def open_devices(devices: list[RemoteDevice]) -> None:
    """Open every device's session in parallel; on any failure close them all and raise the first error."""
    async def opened() -> list:
        return await asyncio.gather(*(d.open() for d in devices), return_exceptions=True)

    async def closed() -> None:
        await asyncio.gather(*(d.close_async() for d in devices), return_exceptions=True)

    errors = [e for e in call(opened()) if isinstance(e, BaseException)]
    if errors:
        call(closed())
        if isinstance(errors[0], TransientError):
            raise InputError(str(errors[0])) from errors[0]
        raise errors[0]
    for d in devices:
        atexit.register(d.close)
