"""A device that fails is not bad input: a pool device that goes down in the middle of a prune ends it with
exit 4 and one line, the run's state kept; `--resume` against the device, back on its address, finishes
the run. Real SSH servers on 127.0.0.1 (tests/sshd.py), a real prune in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compressor.errors import DeviceError
from tests.helpers import FAST_PROFILE
from tests.sshd import TestDevice

ROOT = Path(__file__).resolve().parent.parent
# a seeded ResNet-20 (9 units): a whole prune in about a minute here
ARGS = ["--model", "tests.helpers:resnet20", "--data", "digits32", "--target-speedup", "2", "--finetune-epochs", "0",
        "--calibration-size", "64", "--max-trials", "2"]


def _prune(profile: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "compressor.cli.main", "prune", *ARGS, "--profile", str(profile),
                             "--out", str(out), *extra], stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Two devices behind one profile (`hosts:`), retried once after a short wait."""
    root = tmp_path_factory.mktemp("pool")
    first = TestDevice(root / "a")
    first.start()
    second = TestDevice(root / "b", client_key_path=first.client_key_path)
    second.start()
    both = root / "known_hosts"
    both.write_text(first.known_hosts.read_text() + second.known_hosts.read_text())
    profile = root / "pool.yaml"
    profile.write_text(FAST_PROFILE + first.remote_section(hosts=f"['127.0.0.1:{second.port}']",
                                                          known_hosts=str(both), retries=1, retry_wait_s=0.5,
                                                          connect_timeout_s=5))
    yield profile, first, second, root
    for device in (first, second):
        device.stop()


@pytest.fixture(scope="module")
def dropped(pool):
    """The prune, with the second device stopped (every connection dropped) once the latency table starts."""
    profile, _, second, root = pool
    out = root / "run"
    process = _prune(profile, out)
    lines = []
    for line in process.stderr:
        lines.append(line.rstrip())
        if "measuring the latency table" in line:
            second.stop()
            started = time.perf_counter()
            break
    lines += process.stderr.read().splitlines()
    code = process.wait(timeout=300)
    return code, lines, out, time.perf_counter() - started


def test_a_device_lost_mid_run_exits_4_and_keeps_the_state(dropped):
    code, lines, out, seconds = dropped
    assert code == DeviceError.exit_code == 4, lines[-5:]
    assert lines[-1].startswith("compressor prune: error: ") and not any("Traceback" in line for line in lines)
    assert "tried 2 times" in lines[-1] and f"kept in {out}" in lines[-1] and "--resume" in lines[-1]
    assert any("retrying in 0.5 s" in line for line in lines)  # retried after a wait, then given up
    assert seconds < 60
    state = {p.name for p in (out / ".state").iterdir()}
    assert {"run.json", "reach.json", "scores.json"} <= state  # what was measured before the device went down
    assert not (out / "report.json").exists()


def test_resume_on_the_pool_once_the_device_is_back(pool, dropped):
    profile, _, second, _ = pool
    _, _, out, _ = dropped
    second.start(second.port)
    process = _prune(profile, out, "--resume")
    err = process.stderr.read()
    code = process.wait(timeout=600)
    assert (out / "report.json").is_file(), err[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert code == (0 if report["target_met"] else 1), err[-2000:]
    assert "reachability" in " ".join(report["resumed"]["reused"])
    assert [d["host"] for d in report["profile"]["machine"]["pool"]] == [f"127.0.0.1:{d.port}" for d in pool[1:3]]
    assert not (out / ".state").exists()


def test_the_resume_check_of_a_pool_ignores_its_dates(digits, tmp_path):
    """Each pool entry carries the date it was probed; the run is the same run an hour later."""
    from compressor.jobs.prune import fingerprint
    from compressor.latency.profiles import parse_profile
    from compressor.models.sources import from_module
    from compressor.search.target import Target
    from compressor.stages.options import PruneOptions
    from compressor.stages.state import RunState
    from tests.helpers import resnet20

    loaded = from_module(resnet20(), (3, 32, 32))
    profile = parse_profile(FAST_PROFILE, "test")

    def machine(date: str) -> dict:
        device = {"host": "a:22", "cpu": "Cortex-A76", "logical_cores": 4, "physical_cores": 4, "date": date}
        return {**device, "pool": [device, {**device, "host": "b:22"}], "measurements": []}

    def run_of(date: str) -> dict:
        return fingerprint(loaded, digits, Target(speedup=2), profile, PruneOptions(), machine(date))

    RunState(tmp_path, run_of("2026-01-01T10:00:00+00:00"), resume=False)
    RunState(tmp_path, run_of("2026-01-01T11:00:00+00:00"), resume=True)  # refused before the fix
