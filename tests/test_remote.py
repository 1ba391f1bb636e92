"""Remote measurement over a real SSH server (tests/sshd.py) on 127.0.0.1, timing with ONNX Runtime here."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from compressor.errors import InputError
from compressor.latency.deploy import Deployment
from compressor.latency.device import close_device, time_parts
from compressor.latency.machine import machine_info
from compressor.latency.profiles import parse_profile
from tests.helpers import FAST_PROFILE
from tests.sshd import TestDevice

pytestmark = pytest.mark.timing  # compares real latencies: run alone (make test)

PROVENANCE_KEYS = {"host", "hostname", "model", "os", "kernel", "runtime", "runtime_version", "threads", "governor",
                   "freq_mhz", "measurements", "throttled", "changing_conditions", "drifted"}


def remote_profile(server: TestDevice, tmp_path: Path, **overrides: object):
    path = tmp_path / "remote.yaml"
    path.write_text(FAST_PROFILE + server.remote_section(**overrides))
    return parse_profile(path.read_text(), str(path))


def small_models(tmp_path: Path, deployment: Deployment) -> list[Path]:
    """Two small ONNX models, the second about 50 times the work of the first, so that their order
    holds on a loaded machine (at 8 against 16 channels, both were overhead-bound: 0.98x in one CI run)."""
    paths = []
    for width in (8, 64):
        model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()
        paths.append(deployment.export(model, tmp_path / f"w{width}.onnx"))
    return paths


def session_folders(server: TestDevice) -> list[Path]:
    return sorted(server.workdir.glob("compressor-*"))


def test_times_on_the_device_with_its_provenance_and_cleans_up(server, tmp_path):
    deployment = Deployment(remote_profile(server, tmp_path), (3, 32, 32))
    try:
        a, b = small_models(tmp_path, deployment)
        before = len(server.log)
        first = deployment.time([a, b], deployment.profile.search_policy)
        again = deployment.time([a, b], deployment.profile.search_policy)
        folder, = session_folders(server)
        assert len(list((folder / "a").iterdir())) == 3  # two artifacts and the input, each uploaded once
        provenance = deployment.device.provenance()
    finally:
        close_device(deployment.device)
    assert [c.split()[-1] for c in server.log[before:]] == ["measure", "measure"]  # the runner ran there
    assert first.stats[0].n >= 20 and first.stats[1].samples and len(first.round_medians) == 2
    assert again.speedup(1, 0) > 1  # the wider model is slower, compared within one measurement
    assert set(machine_info()) <= set(provenance) and PROVENANCE_KEYS <= set(provenance)
    assert provenance["host"] == f"127.0.0.1:{server.port}" and provenance["runtime"] == "onnxruntime"
    assert deployment.profile.threads == provenance["physical_cores"]  # threads: null -> the device's cores
    entry = provenance["measurements"][0]
    assert entry["artifacts"] == ["w8.onnx", "w64.onnx"] and set(entry["temperature_c"]) == {"start", "end"}
    assert entry["session"]["allow_spinning"] is False and entry["throttled"] is False
    assert "probe_ms" not in entry and "parallel_speedup" not in provenance  # the profile asks for no probe
    assert session_folders(server) == []  # the runner and artifacts are removed at the end


def test_the_parallel_probe_frames_each_measurement_on_the_device(server, tmp_path):
    """As on this machine (test_parallel_probe.py): with `parallel_probe` and two threads, the runner times the
    probe before and after each measurement, uploaded once; the provenance sums the probes up."""
    path = tmp_path / "probed.yaml"
    path.write_text(FAST_PROFILE.replace("parallel_probe: false", "parallel_probe: true")
                    .replace("threads: null", "threads: 2") + server.remote_section())
    deployment = Deployment(parse_profile(path.read_text(), str(path)), (3, 32, 32))
    try:
        a, b = small_models(tmp_path, deployment)
        for _ in range(2):
            deployment.time([a, b], deployment.profile.search_policy)
        folder, = session_folders(server)
        uploaded = len(list((folder / "a").iterdir()))
        provenance = deployment.device.provenance()
    finally:
        close_device(deployment.device)
    assert uploaded == 4  # the two artifacts, the input and the probe
    for entry in provenance["measurements"]:
        start, end = entry["probe_ms"]["start"], entry["probe_ms"]["end"]
        assert start["threads"] == end["threads"] == 2 and start["one_thread_ms"] > 0 and end["threads_ms"] > 0
        assert entry["parallel_speedup"] == {"start": start["speedup"], "end": end["speedup"]}
    assert provenance["parallel_speedup"]["probes"] == 4


def test_reference_is_retimed_every_few_measurements(server, tmp_path):
    deployment = Deployment(remote_profile(server, tmp_path, retime_every=2), (3, 32, 32))
    try:
        a, b = small_models(tmp_path, deployment)
        policy = deployment.profile.search_policy
        deployment.time([a, b], policy)
        alone = [deployment.time([b], policy) for _ in range(2)]
        log = deployment.device.provenance()["measurements"]
    finally:
        close_device(deployment.device)
    assert all(len(r.stats) == 1 for r in alone)  # the added reference is not returned
    assert log[1]["reference"] is None
    assert log[2]["reference"]["retimed"] and log[2]["reference"]["artifact"] == "w8.onnx"
    assert log[2]["reference"]["first_ms"] == log[2]["reference"]["earlier_ms"] == log[0]["reference"]["median_ms"]


def test_runtime_version_named_by_the_profile_is_checked(server, tmp_path):
    import onnxruntime

    ok = Deployment(remote_profile(server, tmp_path, runtime_version=onnxruntime.__version__.rpartition(".")[0]),
                    (3, 32, 32))
    assert not any("names no" in w for w in ok.device.provenance()["warnings"])
    close_device(ok.device)
    with pytest.raises(InputError, match=r"has onnxruntime .*the profile names 0\.1\.0"):
        Deployment(remote_profile(server, tmp_path, runtime_version="0.1.0"), (3, 32, 32))
    assert session_folders(server) == []


def test_pool_of_two_devices_splits_the_table_and_never_mixes_them(server, tmp_path):
    second = TestDevice(tmp_path / "second", client_key_path=server.client_key_path)
    second.start()
    try:
        both = tmp_path / "known_hosts"
        both.write_text(server.known_hosts.read_text() + second.known_hosts.read_text())
        profile = remote_profile(server, tmp_path, hosts=f"['127.0.0.1:{second.port}']", known_hosts=str(both))
        _run_pool(profile, server, second, tmp_path)
    finally:
        second.stop()


def _run_pool(profile, server, second, tmp_path):
    deployment = Deployment(profile, (3, 32, 32))
    try:
        a, b = small_models(tmp_path, deployment)
        parts = time_parts(deployment.device, [a, b, a, b], profile.search_policy, deployment.example.numpy())
        table = _pool_table(deployment)
        provenance = deployment.device.provenance()
    finally:
        close_device(deployment.device)
    sessions = table.design["sessions"]  # a pool splits the design's measurements, each part with its baseline
    assert {s["device"] for s in sessions} == {p.device for p in parts} and len(sessions) % 2 == 0
    assert all(s["sets"][0] == [] and len(s["sets"]) >= 2 for s in sessions)
    timed = [tuple(x) for s in sessions for x in s["sets"][1:]]
    assert len(timed) == len(set(timed)) == table.design["sets"]
    assert [p.indices for p in parts] == [[0, 1, 2], [0, 3]]  # the reference is timed on every device
    assert {p.device for p in parts} == {f"127.0.0.1:{second.port}", f"127.0.0.1:{server.port}"}
    assert len(provenance["pool"]) == 2 and {m["host"] for m in provenance["measurements"]} == {
        p.device for p in parts}
    assert session_folders(server) == [] and session_folders(second) == []


def _pool_table(deployment):
    """A small residual net's latency table measured on the pool (the initial design only)."""
    from compressor.graph.units import find_units
    from compressor.latency.designed import DesignOptions, measure_latency_table
    from tests.random_nets import random_net

    model = random_net(0).model  # adaptive pooling: any input size
    units = find_units(model, deployment.example)
    return measure_latency_table(model, units, deployment, "random_net(0)", options=DesignOptions(target_sd=1.0))


def test_openvino_ir_is_uploaded_with_its_weights_and_timed_there(server, tmp_path):
    path = tmp_path / "ov.yaml"
    path.write_text(FAST_PROFILE.replace("runtime: onnxruntime", "runtime: openvino")
                    .replace("runtime_options: {allow_spinning: false}", "runtime_options: {}")
                    + server.remote_section())
    deployment = Deployment(parse_profile(path.read_text(), str(path)), (3, 32, 32))
    try:
        a, b = small_models(tmp_path, deployment)
        result = deployment.time([a, b], deployment.profile.search_policy)
        folder, = session_folders(server)
        uploaded = sorted(p.name for p in (folder / "a").rglob("w8.*"))
        entry = deployment.device.provenance()["measurements"][0]
    finally:
        close_device(deployment.device)
    assert a.suffix == ".xml" and uploaded == ["w8.bin", "w8.xml"]
    assert result.stats[1].median > 0 and entry["session"]["runtime"] == "openvino"
    assert entry["session"]["inference_precision_hint"] == "f32" and entry["session"]["num_streams"] == "1"
