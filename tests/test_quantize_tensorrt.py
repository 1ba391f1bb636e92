"""TensorRT INT8 without TensorRT here: the device bundle carries the calibration images and the commands that
calibrate with TensorRT's entropy calibrator and keep its cache (built and checked on the device)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from compressor.cli.main import main
from exporters.tensorrt import tensorrt_status

pytestmark = pytest.mark.skipif(tensorrt_status()[0], reason="TensorRT is usable here: an engine is built instead")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt-int8")
    code = main(["export", "--model", "resnet56", "--data", "digits32", "--format", "tensorrt", "--precision", "int8",
                 "--calibration-size", "40", "--batch", "2", "--out", str(out)])
    assert code == 0
    return out / "model-tensorrt-bundle"


def test_int8_bundle_holds_calibration_images_and_cache_commands(bundle, digits):
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["int8"] is True and manifest["calibration"]["cache"] == "calibration.cache"
    batches = np.load(bundle / "calibration.npz")["input"]
    assert batches.shape == (20, 2, 3, 32, 32) and manifest["calibration"]["batches"] == 20
    val = np.stack([x.numpy() for x, _ in digits.val])  # calibration comes from the training split only
    assert not any(np.array_equal(batches[0, 0], v) for v in val)
    assert "--calibration calibration.npz --calibration-cache calibration.cache" in manifest["build_command"]
    assert "--int8 --calib=calibration.cache" in (bundle / "trtexec.sh").read_text()
    assert "calibration.cache" in (bundle / "README.txt").read_text()


def test_int8_build_script_checks_the_calibration_file(bundle, tmp_path):
    done = subprocess.run([sys.executable, "build_engine.py", "--onnx", "model.onnx", "--engine",
                           str(tmp_path / "m.engine"), "--int8", "--calibration", "absent.npz"],
                          capture_output=True, text=True, cwd=bundle, timeout=60)
    assert done.returncode == 2 and "--calibration absent.npz: file not found" in done.stderr


def test_int8_tensorrt_needs_data(tmp_path, capsys):
    assert main(["export", "--model", "resnet56", "--format", "tensorrt", "--precision", "int8",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--precision int8 needs --data" in capsys.readouterr().err
