"""`compressor prune` and `compressor bench` with a profile whose `remote:` is an SSH server on 127.0.0.1:
every figure is measured by the runner there and carries the device's provenance."""

from __future__ import annotations

import json

import pytest

from compressor.cli.main import main
from tests.helpers import FAST_PROFILE, assert_exit_matches_target
from tests.sshd import TestDevice


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-e2e")
    device = TestDevice(root / "device")
    device.start()
    try:
        profile = root / "remote.yaml"
        profile.write_text(FAST_PROFILE + device.remote_section())
        out = root / "run"
        code = main(["prune", "--model", "resnet56", "--data", "digits32", "--profile", str(profile),
                     "--target-speedup", "1.3", "--out", str(out), "--finetune-epochs", "0",
                     "--calibration-size", "128", "--max-trials", "4"])
        yield code, out, device, profile
    finally:
        device.stop()


def test_prune_measures_everything_on_the_device(pruned):
    code, out, device, _ = pruned
    report = json.loads((out / "report.json").read_text())
    table = json.loads((out / "latency_table.json").read_text())
    assert_exit_matches_target(code, report, speedup=1.3)
    host = f"127.0.0.1:{device.port}"
    for machine in (report["profile"]["machine"], table["machine"]):
        assert machine["host"] == host and machine["runtime"] == "onnxruntime" and machine["hostname"]
    sessions = table["design"]["sessions"]
    assert table["version"] == 2 and all(s["device"] == host for s in sessions)
    measured = report["profile"]["machine"]["measurements"]
    # reachability, each of the table's sessions, each candidate, the final verification: all run by the runner
    assert len(measured) == 1 + len(sessions) + len(report["search"]["trials"]) + 1
    assert [c.split()[-1] for c in device.log].count("measure") == len(measured)
    assert measured[-1]["artifacts"] == ["baseline.onnx", "model.onnx"]
    assert all(m["reference"]["artifact"] == "baseline.onnx" for m in measured)
    assert list(device.workdir.iterdir()) == []  # the session's folder is gone
    assert f"remote device {host} (" in (out / "report.md").read_text()  # the human report names where it ran


def test_bench_on_the_device(pruned, tmp_path, capsys):
    _, out, device, profile = pruned
    before = len(device.log)
    code = main(["bench", "--artifact", str(out / "model.onnx"), "--against", str(out / "baseline.onnx"),
                 "--profile", str(profile), "--runs", "20", "--min-time", "0.2", "--out", str(tmp_path / "b.json")])
    report = json.loads((tmp_path / "b.json").read_text())
    assert code == 0 and report["verdict"]["ratio"] < 1  # the pruned model is faster there
    assert report["candidate"]["machine"]["host"] == f"127.0.0.1:{device.port}"
    assert report["candidate"]["machine"]["measurements"][0]["artifacts"] == ["model.onnx", "baseline.onnx"]
    assert [c.split()[-1] if c.endswith("measure") else c.split()[-3] for c in device.log[before:]] == [
        "probe", "measure"]
    assert list(device.workdir.iterdir()) == []
