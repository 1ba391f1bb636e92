"""TensorRT INT8 without TensorRT here: the device bundle carries the calibration images and the commands that
calibrate with TensorRT's entropy calibrator and keep its cache, and the held-out images with the fp32 logits
that build_engine.py judges the engine on, by the same floor as every INT8 artifact (built and judged on the
device; here, what runs without TensorRT: the bundle, the script's arguments and its judgement of logits)."""

from __future__ import annotations

import json
import shlex
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


@pytest.mark.parametrize("flag", ["--calibration", "--held-out"])
def test_int8_build_script_checks_its_files(flag, bundle, tmp_path):
    done = subprocess.run([sys.executable, "build_engine.py", "--onnx", "model.onnx", "--engine",
                           str(tmp_path / "m.engine"), "--int8", flag, "absent.npz"],
                          capture_output=True, text=True, cwd=bundle, timeout=60)
    assert done.returncode == 2 and f"{flag} absent.npz: file not found" in done.stderr


def test_int8_tensorrt_needs_data(tmp_path, capsys):
    assert main(["export", "--model", "resnet56", "--format", "tensorrt", "--precision", "int8",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--precision int8 needs --data" in capsys.readouterr().err


def test_int8_bundle_carries_held_out_images_the_fp32_logits_and_the_floor(bundle, digits):
    import onnxruntime as ort

    from exporters import trt_build

    manifest = json.loads((bundle / "bundle.json").read_text())
    with np.load(bundle / "heldout.npz") as f:
        batches, logits = f["input"], f["logits"]
    assert batches.shape == (180, 2, 3, 32, 32) and logits.shape == (180, 2, 10)  # every held-out image, batch 2
    val = {x.numpy().tobytes() for x, _ in digits.val}
    assert all(image.tobytes() in val for image in batches.reshape(-1, 3, 32, 32))  # the validation split's
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": batches[7]})[0], logits[7], rtol=1e-4, atol=1e-5)
    assert manifest["held_out"]["floor"] == {"min_top1_agreement": 70.0, "min_sqnr_db": 10.0}
    build = manifest["build_command"]
    assert "--held-out heldout.npz --min-agreement 70 --min-sqnr 10 --held-out-outputs heldout_outputs.npz" in build
    args = trt_build.parse_args(shlex.split(build)[2:])  # what the script on the device will read
    assert (args.int8, args.held_out, args.min_agreement, args.min_sqnr) == (True, "heldout.npz", 70.0, 10.0)
    assert "heldout.npz" in (bundle / "README.txt").read_text()


def test_the_device_script_judges_int8_logits_as_compressor_does(bundle):
    """build_engine.py keeps its own copy of the floor (the device has no compressor): on the same logits it
    measures the same top-1 agreement and SQNR and refuses for the same reasons."""
    from compressor.metrics.lossy import Floor, lossy_fidelity
    from exporters import trt_build

    with np.load(bundle / "heldout.npz") as f:
        reference = f["logits"].reshape(-1, 10).astype(np.float64)
    rng = np.random.default_rng(0)
    scale = float(np.sqrt(np.mean(reference ** 2)))
    cases = {"close": reference + 0.02 * scale * rng.standard_normal(reference.shape),  # ~34 dB
             "noisy": reference + 0.5 * scale * rng.standard_normal(reference.shape),  # ~6 dB
             "shuffled": reference[rng.permutation(len(reference))], "identical": reference.copy()}
    floor = Floor()
    assert (trt_build.MIN_TOP1_AGREEMENT, trt_build.MIN_SQNR_DB) == (floor.min_top1_agreement, floor.min_sqnr_db)
    verdicts = {}
    for name, logits in cases.items():
        ours, theirs = trt_build.lossy_fidelity(reference, logits), lossy_fidelity(reference, logits)
        assert ours["top1_agreement"] == pytest.approx(theirs.top1_agreement)
        assert ours["sqnr_db"] == pytest.approx(theirs.sqnr_db)
        verdicts[name] = trt_build.shortfalls(ours, floor.min_top1_agreement, floor.min_sqnr_db)
        assert verdicts[name] == floor.shortfalls(theirs)
    assert not verdicts["close"] and not verdicts["identical"] and verdicts["noisy"] and verdicts["shuffled"]
