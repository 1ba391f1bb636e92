"""Each way remote measurement fails is one clear line and exit 2 (or retries, then exit 4 for a device that
fails once reached), leaving nothing behind: unreachable host, refused key, unknown or changed host key, a
silent host, no runtime on the device, a runner killed mid-measurement, a full disk. All against real SSH
servers on 127.0.0.1."""

from __future__ import annotations

import socket
import stat
import sys
import threading
from pathlib import Path

import asyncssh
import pytest

from compressor.cli.main import main
from compressor.errors import DeviceError, InputError
from compressor.latency.deploy import Deployment
from compressor.latency.device import close_device
from compressor.latency.remote.device import RUNNER_FILES
from tests.sshd import TestDevice
from tests.test_remote import remote_profile, session_folders, small_models


def connect(server, tmp_path, **overrides):
    return Deployment(remote_profile(server, tmp_path, **overrides), (3, 32, 32))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host(server, tmp_path):
    with pytest.raises(InputError, match=r"cannot reach 127\.0\.0\.1:\d+: .*refused"):
        connect(server, tmp_path, host=f"127.0.0.1:{free_port()}")


def test_refused_key(server, tmp_path):
    other = tmp_path / "other_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(other))
    with pytest.raises(InputError, match=r"refused the key .*other_key for user 'tester'"):
        connect(server, tmp_path, key=str(other))


def test_unknown_host_key_is_never_accepted(server, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(InputError, match=r"is not in .*known_hosts \(unknown host key"):
        connect(server, tmp_path, known_hosts=str(empty))


def test_changed_host_key_is_refused(server, tmp_path):
    changed = server.write_known_hosts(tmp_path / "known_hosts", asyncssh.generate_private_key("ssh-ed25519"))
    with pytest.raises(InputError, match=r"host key of 127\.0\.0\.1:\d+ has CHANGED.*ssh-keygen -R"):
        connect(server, tmp_path, known_hosts=str(changed))


def test_a_host_that_never_answers_times_out(server, tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    try:
        port = listener.getsockname()[1]
        with pytest.raises(InputError, match=rf"no SSH answer from 127\.0\.0\.1:{port} within 1 s .*tried 2 times"):
            connect(server, tmp_path, host=f"127.0.0.1:{port}", connect_timeout_s=1, retries=1)
    finally:
        listener.close()


def test_missing_runtime_on_the_device(server, tmp_path):
    bare = tmp_path / "bare-python"  # this machine's interpreter without its site-packages: no numpy, no runtime
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(bare.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(InputError, match=r"cannot import numpy .*install it on the device: pip install numpy"):
        connect(server, tmp_path, python=str(bare))
    assert session_folders(server) == []


def test_runner_killed_mid_measurement_is_retried_then_a_device_failure(tmp_path):
    """Not bad input: exit 4 (DeviceError), after one retry."""
    device = TestDevice(tmp_path / "device", kill_measure_after_s=0.3)
    device.start()
    try:
        deployment = connect(device, tmp_path, retries=1, retry_wait_s=0.1)
        a, b = small_models(tmp_path, deployment)
        with pytest.raises(DeviceError, match=r"runner on 127\.0\.0\.1:\d+ was killed \(signal KILL\).*tried 2 times"):
            deployment.time([a, b], deployment.profile.search_policy)
        close_device(deployment.device)
        assert [c.split()[-1] for c in device.log].count("measure") == 2
        assert session_folders(device) == []
    finally:
        device.stop()


def test_full_disk_on_the_device(tmp_path):
    runner_bytes = sum(p.stat().st_size for p in RUNNER_FILES.values())
    device = TestDevice(tmp_path / "device", quota_bytes=runner_bytes + 200)
    device.start()
    try:
        deployment = connect(device, tmp_path)
        a, b = small_models(tmp_path, deployment)
        with pytest.raises(InputError, match=r"device 127\.0\.0\.1:\d+ has no space left for uploading w8\.onnx"):
            deployment.time([a, b], deployment.profile.search_policy)
        close_device(deployment.device)
        assert session_folders(device) == []
    finally:
        device.stop()


def test_cli_one_line_exit_2_and_no_output_folder(server, tmp_path, capsys):
    bad = tmp_path / "known_hosts"
    bad.write_text("")
    profile = tmp_path / "remote.yaml"
    remote_profile(server, tmp_path, known_hosts=str(bad))  # writes remote.yaml
    out = tmp_path / "run"
    code = main(["prune", "--model", "resnet56", "--data", "digits32", "--profile", str(profile),
                 "--target-speedup", "1.2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("compressor prune: error: ") and "unknown host key" in err[-1]
    assert not out.exists()
    assert Path(profile).is_file()
