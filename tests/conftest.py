from __future__ import annotations

import os

import pytest
import torch

from compressor.data import load_digits32
from tests.helpers import FAST_PROFILE

# The files with whole prunes (50-200 s each on a loaded 2-core machine), longest first: `make test` hands
# files to two workers in collection order, so the long ones start first and the short ones fill the gaps.
LONGEST_FIRST = ("test_precision.py", "test_resume.py", "test_e2e_selection.py", "test_quantize.py",
                 "test_e2e.py", "test_device_failure.py", "test_table_resume.py", "test_api.py", "test_e2e_table.py",
                 "test_remote_e2e.py", "test_scale_e2e.py", "test_e2e_width.py", "test_scale.py")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # two workers on two cores: one torch (OpenMP) thread each, inherited by the prunes they start, so
        # that neither worker's threads spin against the other's; runtime sessions keep the profile's threads
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


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
