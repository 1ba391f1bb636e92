from __future__ import annotations

import pytest
import torch

from compressor.data import load_digits32
from tests.helpers import FAST_PROFILE


@pytest.fixture(scope="session")
def digits():
    return load_digits32()


@pytest.fixture
def fast_profile(tmp_path):
    path = tmp_path / "fast.yaml"
    path.write_text(FAST_PROFILE)
    return path


@pytest.fixture(autouse=True)
def _seed_and_cache(monkeypatch, tmp_path_factory):
    torch.manual_seed(0)
    # zoo models other than the bundled resnet56 would be trained and cached here
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real SSH and SFTP server (asyncssh) on 127.0.0.1, shared by the remote-measurement tests."""
    from tests.sshd import TestDevice

    device = TestDevice(tmp_path_factory.mktemp("device"))
    device.start()
    yield device
    device.stop()
