"""ONNX export and ONNX Runtime sessions: validation against torch, refusals, atomic writes."""

import numpy as np
import pytest
import torch
from torch import nn

from compressor.errors import InputError, ValidationError
from compressor.latency.deploy import Deployment
from compressor.latency.profiles import load_profile
from compressor.models.zoo import build
from exporters import get_exporter, get_runtime
from exporters.onnx import OnnxExporter
from tests.helpers import randomise_batchnorm


@pytest.fixture(scope="module")
def deployment():
    return Deployment(load_profile("ort-cpu"), (3, 32, 32))


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return randomise_batchnorm(build("resnet20", 10))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, deployment, resnet20):
    folder = tmp_path_factory.mktemp("export")
    return deployment.export(resnet20, folder / "resnet20.onnx")


def _x(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_deployment_shapes(deployment):
    assert deployment.input_shape == (1, 3, 32, 32)
    assert tuple(deployment.example.shape) == (1, 3, 32, 32)
    assert isinstance(deployment.exporter, OnnxExporter)
    assert deployment.runtime.name == "onnxruntime"


def test_validate_resnet20_within_tolerance(deployment, resnet20, exported):
    diff = deployment.validate(exported, resnet20, _x(2))
    assert 0.0 <= diff < deployment.exporter.atol


def test_session_settings_follow_profile(deployment, exported):
    session = deployment.open(exported)
    assert session.settings["allow_spinning"] == "default (on)"  # ort-cpu keeps ONNX Runtime's defaults
    assert session.settings["intra_op_num_threads"] == deployment.profile.resolved_threads
    out = session()
    assert np.asarray(out[0]).shape == (1, 10)
    np.testing.assert_allclose(out[0], session.run(deployment.example.numpy()), rtol=0, atol=0)


def test_validate_detects_a_different_model(deployment, exported):
    torch.manual_seed(1)
    other = randomise_batchnorm(build("resnet20", 10), seed=7)
    with pytest.raises(ValidationError, match="logits"):
        deployment.validate(exported, other, _x(2))


def test_check_close_names_output_and_largest_difference():
    exporter = get_exporter("onnx")
    expected = np.linspace(-1, 1, 20, dtype=np.float32).reshape(2, 10)
    assert exporter.check_close(expected.copy(), expected, "m.onnx") == 0.0
    got = expected.copy()
    got[1, 3] += 1e-2
    with pytest.raises(ValidationError, match="logits") as info:
        exporter.check_close(got, expected, "m.onnx")
    message = str(info.value)
    assert "0.01" in message
    assert "m.onnx" in message


def test_check_close_accepts_differences_within_tolerance():
    exporter = get_exporter("onnx")
    expected = np.full((1, 10), 10.0, dtype=np.float32)
    got = expected + 5e-3  # within atol 1e-4 + rtol 1e-3 * 10
    assert exporter.check_close(got, expected, "m") == pytest.approx(5e-3, rel=1e-3)


def test_check_close_rejects_shape_mismatch():
    exporter = get_exporter("onnx")
    with pytest.raises(ValidationError, match="shape"):
        exporter.check_close(np.zeros((1, 9), np.float32), np.zeros((1, 10), np.float32), "m")


def test_garbage_onnx_is_input_error(tmp_path, deployment):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x08\x07garbage, not a protobuf" * 16)
    with pytest.raises(InputError, match="cannot load"):
        get_runtime("onnxruntime").open(path, 1)
    with pytest.raises(InputError, match="cannot load"):
        deployment.open(path)


def test_truncated_onnx_is_input_error(tmp_path, exported):
    path = tmp_path / "truncated.onnx"
    data = exported.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot load"):
        get_runtime("onnxruntime").open(path, 1)


def test_missing_onnx_is_input_error(tmp_path):
    with pytest.raises(InputError):
        get_runtime("onnxruntime").open(tmp_path / "absent.onnx", 1)


def test_export_leaves_only_the_artifact(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    folder = tmp_path / "out"
    path = get_exporter("onnx").export(model, torch.randn(1, 3, 8, 8), folder / "m.onnx", 17)
    assert path == folder / "m.onnx"
    assert [p.name for p in folder.iterdir()] == ["m.onnx"]
    # overwriting an existing artifact also leaves no temporary behind
    get_exporter("onnx").export(model, torch.randn(1, 3, 8, 8), path, 17)
    assert [p.name for p in folder.iterdir()] == ["m.onnx"]


class _Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("broken forward")


def test_failed_export_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="broken forward"):
        get_exporter("onnx").export(_Broken(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", 17)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_previous_artifact(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        get_exporter("onnx").export(_Broken(), torch.randn(1, 3, 8, 8), path, 17)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_unknown_exporter_and_runtime():
    with pytest.raises(InputError, match="unknown export format 'nope'") as info:
        get_exporter("nope")
    assert "onnx" in str(info.value)
    with pytest.raises(InputError, match="unknown runtime 'nope'") as info:
        get_runtime("nope")
    assert "onnxruntime" in str(info.value)


def test_profile_with_unknown_runtime_is_refused_by_deployment(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: p\nruntime: tensorrt-nope\n")
    with pytest.raises(InputError, match="tensorrt-nope"):
        Deployment(load_profile(str(path)), (3, 32, 32))


def _small_net():
    torch.manual_seed(0)
    return randomise_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))


def _batch_profile(tmp_path, batch):
    path = tmp_path / "batched.yaml"
    path.write_text(f"name: batched\nruntime: onnxruntime\nthreads: 1\nbatch: {batch}\n")
    return load_profile(str(path))


def test_validate_with_batched_profile(tmp_path):
    deployment = Deployment(_batch_profile(tmp_path, 2), (3, 32, 32))
    model = _small_net()
    artifact = deployment.export(model, tmp_path / "b2.onnx")
    assert deployment.validate(artifact, model, _x(2)) < deployment.exporter.atol


def test_validate_with_batched_profile_and_more_rows(tmp_path):
    deployment = Deployment(_batch_profile(tmp_path, 2), (3, 32, 32))
    model = _small_net()
    artifact = deployment.export(model, tmp_path / "b2.onnx")
    assert deployment.validate(artifact, model, _x(4)) < deployment.exporter.atol
