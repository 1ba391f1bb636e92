"""Exporters and runtimes: one contract every backend meets, every zoo model in ONNX and OpenVINO,
the TensorRT device bundle, and `compressor export`'s refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.cli.main import main
from compressor.errors import InputError, ValidationError
from compressor.latency.deploy import Deployment
from compressor.latency.profiles import load_profile
from compressor.latency.timing import TimingPolicy, measure
from compressor.models.zoo import ZOO, build
from compressor.rewrite.fold import fold_batchnorm
from exporters import EXPORTERS, MissingBackendError, get_exporter, get_runtime
from tests.helpers import randomise_batchnorm

pytest.importorskip("openvino")
QUICK = TimingPolicy(min_runs=5, min_time_s=0.05, warmup_runs=2, warmup_s=0.01)
X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _model(arch: str = "resnet20") -> torch.nn.Module:
    torch.manual_seed(0)
    folded, _ = fold_batchnorm(randomise_batchnorm(build(arch, 10)))
    return folded


@pytest.fixture(scope="module")
def resnet20() -> torch.nn.Module:
    return _model()


def _reference(model: torch.nn.Module, x: torch.Tensor = X) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


class BackendContract:
    """What every backend shares; subclasses name the format, precision and runtime."""

    format: str
    precision: str = "fp32"
    runtime: str

    @classmethod
    def exporter(cls):
        return get_exporter(cls.format, precision=cls.precision)

    @pytest.fixture(scope="class")
    @classmethod
    def artifact(cls, tmp_path_factory, resnet20) -> Path:
        return cls.exporter().export(resnet20, X, tmp_path_factory.mktemp(cls.format) / "m", 17)

    def test_export_validates_and_runs(self, artifact, resnet20):
        exporter = self.exporter()
        assert artifact.suffix == exporter.suffix
        got = get_runtime(self.runtime).open(artifact, 1).run(X.numpy())
        assert exporter.check_close(got, _reference(resnet20), str(artifact)) <= np.abs(_reference(resnet20)).max()

    def test_only_the_artifact_files_remain(self, artifact):
        names = sorted(p.name for p in artifact.parent.iterdir())
        assert names == sorted(p.name for p in self.exporter().artifact_files(artifact))
        assert not any(n.endswith(".tmp") or n.startswith(".") for n in names)

    def test_failed_validation_writes_nothing(self, tmp_path, resnet20):
        exporter = self.exporter()
        exporter.atol, exporter.rtol, exporter.range_rtol = -1.0, 0.0, 0.0  # nothing can pass
        with pytest.raises(ValidationError, match="'logits'"):
            exporter.export(resnet20, X, tmp_path / "m", 17)
        assert list(tmp_path.iterdir()) == []

    def test_check_close_names_output_and_largest_difference(self):
        exporter = self.exporter()
        expected = np.linspace(-1, 1, 20, dtype=np.float32).reshape(2, 10)
        got = expected.copy()
        got[0, 4] += 0.5
        with pytest.raises(ValidationError, match=r"'logits'.*0\.5") as info:
            exporter.check_close(got, expected, "art")
        assert self.format in str(info.value)

    def test_truncated_artifact_is_input_error(self, tmp_path, artifact):
        exporter = self.exporter()
        for original in exporter.artifact_files(artifact):
            data = original.read_bytes()
            (tmp_path / original.name).write_bytes(data[: len(data) // 2])
        with pytest.raises(InputError):
            get_runtime(self.runtime).open(tmp_path / artifact.name, 1)

    def test_garbage_and_missing_artifacts_are_input_errors(self, tmp_path, artifact):
        for original in self.exporter().artifact_files(artifact):
            (tmp_path / original.name).write_bytes(b"\x00garbage, not a model" * 8)
        with pytest.raises(InputError):
            get_runtime(self.runtime).open(tmp_path / artifact.name, 1)
        with pytest.raises(InputError):
            get_runtime(self.runtime).open(tmp_path / f"absent{artifact.suffix}", 1)

    def test_session_timing_returns_finite_stats(self, artifact):
        session = get_runtime(self.runtime).open(artifact, 1)
        session.prepare(X.numpy())
        stats = measure(session, QUICK)
        assert math.isfinite(stats.median) and stats.median > 0 and stats.n >= QUICK.min_runs
        assert session.settings["runtime"] == self.runtime


class TestOnnx(BackendContract):
    format, runtime = "onnx", "onnxruntime"


class TestOpenVinoFP32(BackendContract):
    format, runtime = "openvino", "openvino"

    def test_latency_settings(self, artifact):
        s = get_runtime("openvino").open(artifact, 2).settings
        assert s["performance_hint"] == "LATENCY"
        assert s["inference_num_threads"] == "2"
        assert s["num_streams"] == "1"
        assert s["inference_precision_hint"] == "f32"


class TestOpenVinoFP16(BackendContract):
    format, precision, runtime = "openvino", "fp16", "openvino"

    def test_weights_are_half_the_size(self, artifact, tmp_path, resnet20):
        fp32 = get_exporter("openvino").export(resnet20, X, tmp_path / "fp32", 17)
        ratio = artifact.with_suffix(".bin").stat().st_size / fp32.with_suffix(".bin").stat().st_size
        assert 0.4 < ratio < 0.6


class TestTorch(BackendContract):
    format, runtime = "torch", "torch"


class TestTable(BackendContract):
    """The table runtime's artifact: the removed units' names, with the model as ONNX for its outputs."""

    format, runtime = "table", "table"

    def test_names_the_units_the_model_lacks(self, tmp_path, resnet20):
        from compressor.graph.surgery import remove_units
        from compressor.graph.units import find_units
        from exporters.table import read_artifact

        units = find_units(resnet20, X)
        pruned = remove_units(resnet20, [units[1], units[4]])
        path = self.exporter().export(pruned, X, tmp_path / "m", 17)
        names = (units[1].name, units[4].name)
        assert read_artifact(path) == names
        assert get_runtime("table").open(path, 1).removed == names
        assert read_artifact(self.exporter().export(resnet20, X, tmp_path / "base", 17)) == ()


ZOO_MODELS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
              "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small",
              "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


# the models trained here, exported with their bundled weights and every output: tests/test_zoo_models.py
EXPORTED_IN_ZOO_TESTS = ["vit_digits", "det_digits"]


def test_every_zoo_model_is_tested():
    assert sorted(ZOO_MODELS + EXPORTED_IN_ZOO_TESTS) == sorted(ZOO)


@pytest.mark.parametrize("arch", ZOO_MODELS)
def test_zoo_model_exports_to_onnx_and_openvino(arch, tmp_path):
    model = _model(arch)
    expected = _reference(model)
    for fmt, runtime in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        exporter = get_exporter(fmt)
        path = exporter.export(model, X, tmp_path / arch, 17)
        got = get_runtime(runtime).open(path, 2).run(X.numpy())
        exporter.check_close(got, expected, f"{arch} {fmt}")


def test_openvino_from_an_onnx_file(tmp_path, resnet20):
    onnx_path = get_exporter("onnx").export(resnet20, X, tmp_path / "src.onnx", 17)
    xml = get_exporter("openvino").export(onnx_path, X, tmp_path / "ir", 17)
    assert xml.name == "ir.xml" and xml.with_suffix(".bin").is_file()


def test_onnx_dynamic_batch_simplify_and_external_data(tmp_path, resnet20):
    exporter = get_exporter("onnx", dynamic_batch=True, simplify=True, external_data_bytes=0)
    path = exporter.export(resnet20, X, tmp_path / "m.onnx", 17)
    assert [p.name for p in exporter.artifact_files(path)] == ["m.onnx.data", "m.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    x3 = torch.randn(3, 3, 32, 32)
    got = get_runtime("onnxruntime").open(path, 1).run(x3.numpy())
    exporter.check_close(got, _reference(resnet20, x3), "batch 3")


def test_unsupported_precision_is_input_error():
    with pytest.raises(InputError, match="fp16"):
        get_exporter("onnx", precision="fp16")


def test_missing_backend_explains_itself(monkeypatch, tmp_path, resnet20):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingBackendError, match="pip install openvino"):
        get_exporter("openvino").export(resnet20, X, tmp_path / "m", 17)
    assert list(tmp_path.iterdir()) == []


def test_openvino_deployment_round_trip(tmp_path, resnet20):
    deployment = Deployment(load_profile("openvino-cpu"), (3, 32, 32))
    path = deployment.export(resnet20, tmp_path / "model.onnx")  # the suffix follows the exporter
    assert path == tmp_path / "model.xml"
    assert deployment.validate(path, resnet20, torch.randn(2, 3, 32, 32)) < 1e-3
    result = deployment.time([path, path], QUICK)
    assert all(math.isfinite(s.median) for s in result.stats)


@pytest.mark.parametrize("name", ["openvino-cpu", "torch-cpu", "tensorrt-gpu-fp16"])
def test_builtin_profiles_name_registered_runtimes(name):
    from exporters import RUNTIMES

    profile = load_profile(name)
    assert profile.runtime in RUNTIMES and profile.name == name


def _tensorrt_usable() -> bool:
    from exporters.tensorrt import tensorrt_status

    return tensorrt_status()[0]


no_tensorrt = pytest.mark.skipif(_tensorrt_usable(), reason="TensorRT is usable here: an engine is built instead")


@no_tensorrt
def test_tensorrt_profile_refused_without_tensorrt():
    with pytest.raises(MissingBackendError, match="tensorrt"):
        Deployment(load_profile("tensorrt-gpu-fp16"), (3, 32, 32))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, resnet20) -> Path:
    exporter = get_exporter("tensorrt", precision="fp16")
    path = exporter.export(resnet20, X, tmp_path_factory.mktemp("trt") / "model", 17)
    assert "no engine was built" in exporter.outcome
    return path


@no_tensorrt
def test_tensorrt_bundle_contents(bundle):
    assert bundle.name == "model-tensorrt-bundle" and bundle.is_dir()
    assert sorted(p.name for p in bundle.iterdir()) == ["README.txt", "build_engine.py", "bundle.json",
                                                         "model.onnx", "reference.npz", "trtexec.sh"]
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["engine_built"] is False and manifest["fp16"] is True
    assert manifest["onnx"]["inputs"] == {"input": [1, 3, 32, 32]}
    assert "--fp16" in (bundle / "trtexec.sh").read_text()
    assert not list(bundle.parent.glob(".*"))


@no_tensorrt
def test_tensorrt_bundle_reference_matches_onnxruntime_and_torch(bundle, resnet20):
    ref = np.load(bundle / "reference.npz")
    session = get_runtime("onnxruntime").open(bundle / "model.onnx", 1)
    onnx = get_exporter("onnx")
    for x, logits in zip(ref["input"], ref["logits"], strict=True):
        np.testing.assert_allclose(session.run(x), logits, rtol=1e-5, atol=1e-6)
        onnx.check_close(logits, _reference(resnet20, torch.from_numpy(x)), "bundle vs torch")
    assert ref["input"].shape == (4, 1, 3, 32, 32)


def _script(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(bundle / "build_engine.py"), *args], capture_output=True, text=True,
                          cwd=bundle, timeout=60)


@no_tensorrt
def test_build_script_help_and_missing_tensorrt(bundle, tmp_path):
    assert _script(bundle, "--help").returncode == 0
    args = ["--onnx", "model.onnx", "--engine", str(tmp_path / "m.engine"), "--fp16",
            "--inputs", "reference.npz", "--outputs", "reference.npz", "--timing-cache", str(tmp_path / "t.cache")]
    done = _script(bundle, *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensorrt" in lines[0] and "not importable" in lines[0]
    assert not (tmp_path / "m.engine").exists()


def test_build_script_file_checks_and_arguments(bundle, tmp_path):
    done = _script(bundle, "--onnx", "absent.onnx", "--engine", str(tmp_path / "m.engine"))
    assert done.returncode == 2 and "absent.onnx: file not found" in done.stderr
    done = _script(bundle, "--onnx", "model.onnx", "--engine", str(tmp_path / "no" / "m.engine"))
    assert done.returncode == 2 and "folder does not exist" in done.stderr
    done = _script(bundle, "--onnx", "model.onnx", "--engine", "m.engine", "--inputs", "reference.npz")
    assert done.returncode == 2 and "go together" in done.stderr


def test_onnx_check_for_tensorrt_refuses_old_opset(tmp_path, resnet20):
    from exporters.tensorrt import check_onnx_for_tensorrt

    path = get_exporter("onnx").export(resnet20, X, tmp_path / "m.onnx", 8)
    with pytest.raises(InputError, match="opset 8"):
        check_onnx_for_tensorrt(path)


# `compressor export`

def test_cli_export_all_formats(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["export", "--model", "resnet20", "--format", "onnx,openvino,tensorrt", "--out", str(out), "--json"])
    assert code == 0
    written = json.loads(capsys.readouterr().out)
    assert set(written) == {"onnx", "openvino", "tensorrt"}
    assert (out / "model.onnx").is_file() and (out / "model.xml").is_file() and (out / "model.bin").is_file()
    if not _tensorrt_usable():
        assert (out / "model-tensorrt-bundle" / "bundle.json").is_file()
        assert "no engine was built" in written["tensorrt"]["outcome"]
    # a second export into the same folder refuses to overwrite
    assert main(["export", "--model", "resnet20", "--format", "onnx", "--out", str(out)]) == 2


@pytest.mark.parametrize("fmt", ["nope", "onnx,nope", ","])
def test_cli_export_unknown_format(tmp_path, capsys, fmt):
    assert main(["export", "--model", "resnet20", "--format", fmt, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown export format" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_cli_export_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", "--model", str(bad), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "not a loadable checkpoint" in capsys.readouterr().err


def test_cli_export_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "--model", "resnet20", "--format", "onnx", "--out", str(blocker / "sub")]) == 2
    assert "cannot create output folder" in capsys.readouterr().err
    assert main(["export", "--model", "resnet20", "--format", "onnx", "--out", str(blocker)]) == 2


def test_every_registered_format_is_covered():
    covered = {c.format for c in (TestOnnx, TestOpenVinoFP32, TestTorch, TestTable)} | {"tensorrt"}
    assert covered == set(EXPORTERS)


def test_a_block_exported_for_timing_is_checked_against_its_range(tmp_path):
    """export_block allows TIMING_RANGE_RTOL of the output's range (an intermediate tensor near 0 moves by
    more than rtol of itself) and leaves the backend's own tolerance as it was; a wrong graph still fails."""
    from exporters.backend import TIMING_RANGE_RTOL, Backend

    backend = Backend("onnxruntime")
    before = backend.exporter.range_rtol
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1)).eval()
    assert backend.export_block(model, X, tmp_path / "block").is_file()
    assert backend.exporter.range_rtol == before < TIMING_RANGE_RTOL
    with torch.no_grad():
        expected = model(X).numpy()
    scale = float(np.abs(expected).max())
    near = expected + 0.5 * TIMING_RANGE_RTOL * scale  # within the range term, beyond atol + rtol near 0
    lenient = backend.block_exporter()
    assert lenient.check_close(near, expected, "block") > 0
    with pytest.raises(ValidationError):
        lenient.check_close(expected + 0.01 * scale, expected, "a wrong graph")
