"""A prune whose device drops in the middle of the latency table resumes against the restarted device: the
removal sets timed before the drop are kept in the run's state as they come and reused, not timed again."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import FAST_PROFILE
from tests.sshd import TestDevice

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--model", "tests.helpers:resnet20", "--data", "digits32", "--target-speedup", "1.3", "--finetune-epochs",
        "0", "--calibration-size", "64", "--max-trials", "2"]
FIRST_SESSION = re.compile(r"  timed \d+ removal sets with the baseline")  # logged after the session is saved


def _prune(profile: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "compressor.cli.main", "prune", *ARGS, "--profile", str(profile),
                             "--out", str(out), *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def dropped(tmp_path_factory):
    """A prune over SSH whose server is killed once the table's first session is saved, then restarted."""
    root = tmp_path_factory.mktemp("table-resume")
    device = TestDevice(root / "device")
    device.start()
    profile = root / "remote.yaml"
    profile.write_text(FAST_PROFILE + device.remote_section(command_timeout_s=120, connect_timeout_s=5))
    out = root / "run"
    out.mkdir()  # the folder exists before the run, so a failed run leaves it (and its state) in place
    process = _prune(profile, out)
    lines = []
    try:
        for line in process.stderr:
            lines.append(line.rstrip())
            if FIRST_SESSION.match(line):
                device.stop()  # the device drops in the middle of the table
                break
        lines += process.stderr.read().splitlines()
        code = process.wait(timeout=300)
        saved = json.loads((out / ".state" / "latency_design.json").read_text())
        measured_before = len(device.log)
        device.start()
        yield {"code": code, "lines": lines, "out": out, "profile": profile, "saved": saved, "device": device,
               "measured_before": measured_before}
    finally:
        if process.poll() is None:
            process.kill()
        device.stop()


def test_the_drop_ends_the_run_and_keeps_the_timed_sessions(dropped):
    assert dropped["code"] != 0, dropped["lines"][-5:]
    assert not any("Traceback" in line for line in dropped["lines"]), dropped["lines"][-20:]
    assert f"127.0.0.1:{dropped['device'].port}" in dropped["lines"][-1]  # one line naming the device
    saved = dropped["saved"]
    assert len(saved["sessions"]) >= 1 and all(len(s["sets"]) >= 2 for s in saved["sessions"])
    assert not (dropped["out"] / "report.json").exists()


def test_resume_against_the_restarted_device_reuses_the_timed_sets(dropped):
    out, device = dropped["out"], dropped["device"]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "compressor.cli.main", "prune", *ARGS, "--profile",
                             str(dropped["profile"]), "--out", str(out), "--resume"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    report = json.loads((out / "report.json").read_text())
    assert result.returncode == (0 if report["target_met"] else 1), result.stderr[-2000:]
    reused = " ".join(report["resumed"]["reused"])
    timed_before = sum(len(s["sets"]) - 1 for s in dropped["saved"]["sessions"])
    assert f"the latency table's {timed_before} removal sets already timed" in reused
    table = json.loads((out / "latency_table.json").read_text())
    sessions = table["design"]["sessions"]
    before = dropped["saved"]["sessions"]
    assert sessions[:len(before)] == before  # the sessions timed before the drop, kept as they were measured
    assert len(sessions) > len(before)  # and the rest of the design timed on the restarted device
    assert table["design"]["sets"] == sum(len(s["sets"]) - 1 for s in sessions)
    again = [tuple(s) for session in sessions[len(before):] for s in session["sets"][1:]]
    assert not set(again) & {tuple(s) for session in before for s in session["sets"][1:]}  # none timed twice
    host = f"127.0.0.1:{device.port}"
    assert all(s["device"] == host for s in sessions) and table["machine"]["host"] == host
    assert time.perf_counter() - started < 900
