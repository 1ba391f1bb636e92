"""The device-side runner and bundle script: what they import, and that they open sessions as exporters/ do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from compressor.errors import InputError
from compressor.latency.remote.bundle import SCRIPTS
from compressor.latency.remote.spec import parse_remote

ALLOWED = {"numpy", "onnxruntime", "openvino", "timing", "runner", "records"}
FORBIDDEN = {"torch", "compressor", "exporters", "yaml", "asyncssh", "scipy", "onnx"}


def imported_modules(stderr: str) -> tuple[set[str], set[str]]:
    """From `python -X importtime` output: (top-level names imported at depth 0, i.e. by the script itself
    rather than by a package it imports; every top-level name imported at all)."""
    direct, everything = set(), set()
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2 or "cumulative" in line:
            continue
        field = line.rsplit("|", 1)[1]
        name = field.strip().split(".")[0]
        everything.add(name)
        if len(field) - len(field.lstrip()) == 1:
            direct.add(name)
    return direct, everything


def run_isolated(script: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`script` with -S (no .pth hooks, no editable compressor) and only site-packages on the path."""
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    return subprocess.run([sys.executable, "-S", "-X", "importtime", str(script), *args], input=stdin,
                          capture_output=True, text=True, env=env, cwd=script.parent, timeout=120)


@pytest.fixture
def scripts(tmp_path):
    for name, source in SCRIPTS.items():
        shutil.copyfile(source, tmp_path / name)
    return tmp_path


def _onnx_model(tmp_path: Path) -> Path:
    from exporters.onnx import OnnxExporter

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    import torch

    return OnnxExporter().export(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", 17)


def test_runner_imports_only_stdlib_numpy_and_the_runtime(scripts, tmp_path):
    probe = run_isolated(scripts / "runner.py", "probe", "onnxruntime", str(tmp_path))
    assert probe.returncode == 0, probe.stdout + probe.stderr[-2000:]
    model = _onnx_model(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    job = {"runtime": "onnxruntime", "threads": 1, "options": {}, "artifacts": [str(model)],
           "input": str(tmp_path / "x.npy"), "policy": {"min_runs": 5, "min_time_s": 0.01, "warmup_s": 0.01}}
    measured = run_isolated(scripts / "runner.py", "measure", stdin=json.dumps(job))
    assert measured.returncode == 0, measured.stdout + measured.stderr[-2000:]
    assert json.loads(measured.stdout)["stats"][0]["n"] >= 5
    for run in (probe, measured):
        direct, everything = imported_modules(run.stderr)
        assert direct - ALLOWED <= set(sys.stdlib_module_names), direct - ALLOWED - set(sys.stdlib_module_names)
        assert not everything & FORBIDDEN, everything & FORBIDDEN


@pytest.mark.parametrize("threads", [1, 2])
def test_runner_frames_a_measurement_with_the_probe_it_is_sent_at_more_than_one_thread(scripts, tmp_path, threads):
    model = _onnx_model(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    job = {"runtime": "onnxruntime", "threads": threads, "options": {}, "artifacts": [str(model)],
           "input": str(tmp_path / "x.npy"), "policy": {"min_runs": 5, "min_time_s": 0.01, "warmup_s": 0.01},
           "probe": {"artifact": str(model), "shape": [1, 3, 8, 8], "warm_runs": 2}}
    measured = run_isolated(scripts / "runner.py", "measure", stdin=json.dumps(job))
    assert measured.returncode == 0, measured.stdout + measured.stderr[-2000:]
    probes = json.loads(measured.stdout).get("probe_ms")
    if threads == 1:
        assert probes is None  # one thread has nothing to keep in step
    else:
        assert {p["threads"] for p in probes.values()} == {2} and all(p["speedup"] > 0 for p in probes.values())


def test_runner_opens_onnxruntime_as_the_exporter_does(scripts, tmp_path):
    from exporters.onnxruntime import OnnxRuntimeSession

    model = _onnx_model(tmp_path)
    options = [{}, {"allow_spinning": False}, {"allow_spinning": True}]  # the runtime's default, off, on
    here = [OnnxRuntimeSession(model, 2, o).settings for o in options]
    sys.path.insert(0, str(scripts))
    try:
        import runner

        there = [runner.open_ort(str(model), 2, o)[1] for o in options]
    finally:
        sys.path.remove(str(scripts))
        sys.modules.pop("runner", None)
    assert there == here
    assert [s["allow_spinning"] for s in here] == ["default (on)", False, True]


def test_runner_reports_a_usage_error_as_json(scripts):
    result = run_isolated(scripts / "runner.py", "dance")
    assert result.returncode == 2 and json.loads(result.stdout)["error"] == "other"


@pytest.mark.parametrize(("section", "message"), [
    ({"user": "pi", "key": "k"}, "needs a host"),
    ({"host": "pi", "key": "k"}, "needs a user"),
    ({"host": "pi", "user": "pi"}, "remote.key must be a file path"),
    ({"host": "pi:99999", "user": "pi", "key": "k"}, "port in 1..65535"),
    ({"host": "pi", "user": "pi", "key": "k", "password": "x"}, "unknown remote field.*password"),
    ({"host": "pi", "user": "pi", "key": "k", "port": "22"}, "remote.port must be a non-negative integer"),
    ({"hosts": "pi", "user": "pi", "key": "k"}, "remote.hosts must be a list"),
])
def test_remote_section_is_checked(section, message):
    with pytest.raises(InputError, match=message):
        parse_remote(section, "p.yaml")


def test_remote_section_pool_and_defaults():
    spec = parse_remote({"host": "a", "hosts": ["b:2222", "[::1]:23", "a"], "user": "pi", "key": "/k"}, "p.yaml")
    assert [str(e) for e in spec.endpoints] == ["a:22", "b:2222", "::1:23"]
    assert spec.known_hosts.name == "known_hosts" and spec.python == "python3" and spec.retries == 3
    assert spec.retry_wait_s == 2.0


def test_drift_watch_flags_a_moving_reference_and_adds_it_when_due():
    from compressor.latency.remote.conditions import DriftWatch, version_matches
    from compressor.latency.timing import LatencyStats

    def seen(watch, keys, ms, added=None):
        measured = {"keys": keys, "names": [f"{k}.onnx" for k in keys], "paths": [f"/d/{k}" for k in keys]}
        return watch.observe(measured, [LatencyStats.from_samples([m]) for m in ms], added)

    watch = DriftWatch(every=2, tolerance=0.10)
    assert seen(watch, ["base", "u1"], [1.0, 0.8])["drifted"] is False
    assert watch.due(["u2"]) is None and seen(watch, ["u2"], [0.9]) is None  # one measurement without it
    due = watch.due(["u3"])
    assert due["key"] == "base"  # the second in a row without it: the reference is added
    check = seen(watch, ["u3"], [1.25, 0.7], added=due)
    assert check["retimed"] and check["drifted"] and check["drift"] == pytest.approx(0.25)
    assert seen(watch, ["base"], [1.04])["drifted"] is False  # against the median of 1.0 and 1.25
    assert version_matches("1.20.1", "1.20") and not version_matches("1.21.0", "1.2")
