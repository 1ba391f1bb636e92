"""The zoo models trained here with their own recipes: vit_digits (a timm-style ViT on digits32) and
det_digits (a C2f detector on digit_canvas). They build with the structure their units come from, their
bundled weights load with weights_only=True and reach the figures their checkpoints report on the held-out
split, and they export to ONNX and OpenVINO IR that agree with torch."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from compressor.data import load_data
from compressor.models.det_digits import C2f, det_digits
from compressor.models.sources import load_model
from compressor.models.trained import BUNDLED_WEIGHTS
from compressor.models.vit_digits import vit_digits

# what the bundled weights reached when trained (docs/models.md); the checkpoints record the same figures
VIT_ACCURACY = 98.0  # % top-1 on digits32's 360 held-out images, at least
DET_CELL_ACCURACY = 90.0  # % of digit cells classified right on digit_canvas' 256 held-out canvases, at least
ONNX_TOL = {"atol": 1e-4, "rtol": 1e-3}  # the ONNX exporter's tolerance: fp32 summation order only


@pytest.fixture(scope="module")
def vit():
    return load_model("vit_digits")


@pytest.fixture(scope="module")
def det():
    return load_model("det_digits")


def _payload(name: str) -> dict:
    return torch.load(BUNDLED_WEIGHTS / name, map_location="cpu", weights_only=True)


def test_vit_digits_is_built_like_timm():
    model = vit_digits()
    block = model.blocks[3]
    assert [n for n, _ in block.named_children()] == ["norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2",
                                                      "drop_path2"]
    assert [n for n, _ in block.attn.named_children()] == ["qkv", "proj"]
    assert len(model.blocks) == 12 and model.pos_embed.shape == (1, 65, 64)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) * 4 < 3e6  # bytes of fp32 weights


def test_det_digits_has_c2f_stages_and_two_heads():
    model = det_digits().eval()
    stages = [m for m in model.modules() if isinstance(m, C2f)]
    assert [len(s.m) for s in stages] == [2, 3, 2] and all(b.add for s in stages for b in s.m)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 15, 8, 8), (2, 15, 4, 4)]


def test_bundled_vit_reaches_its_reported_accuracy(vit, digits):
    from compressor.finetune.training import accuracy

    payload = _payload("vit_digits-digits32.pt")
    assert payload["arch"] == "vit_digits" and payload["trained_on"] == "digits32"
    assert payload["val_accuracy"] >= VIT_ACCURACY
    assert "vit_digits-digits32.pt" in vit.source and vit.input_shape == (3, 32, 32)
    assert accuracy(vit.model, digits.loader("val")) >= payload["val_accuracy"] - 1.0


def test_bundled_det_reaches_its_reported_quality(det):
    from compressor.data.canvas import VAL_CANVASES, split_canvases
    from compressor.models.det_training import detection_quality

    payload = _payload("det_digits-digit_canvas.pt")
    assert payload["arch"] == "det_digits" and payload["trained_on"] == "digit_canvas"
    assert payload["cell_accuracy"] >= DET_CELL_ACCURACY
    assert "det_digits-digit_canvas.pt" in det.source and det.input_shape == (3, 64, 64)
    quality = detection_quality(det.model, split_canvases("val", VAL_CANVASES))
    for key in ("cell_accuracy", "background_accuracy", "precision", "recall"):
        assert quality[key] >= payload[key] - 1.0, key
    assert quality["box_iou"] >= payload["box_iou"] - 0.01


def test_vit_exports_to_onnx_and_openvino(vit, digits, tmp_path):
    """Both exporters validate against torch themselves; ONNX Runtime is also checked here on real digits."""
    import onnxruntime as ort

    from exporters import get_exporter

    x = next(iter(digits.loader("val", batch_size=1)))[0]
    path = get_exporter("onnx").export(vit.model, x, tmp_path / "onnx" / "vit.onnx")
    get_exporter("openvino").export(vit.model, x, tmp_path / "ir" / "vit.xml")
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, vit.model(x).numpy(), **ONNX_TOL)


def test_det_exports_to_onnx_and_openvino(det, tmp_path):
    """Both outputs of the ONNX graph (opset 17) agree with torch in ONNX Runtime and in OpenVINO (fp32)."""
    import onnxruntime as ort
    import openvino as ov

    from compressor.data.canvas import split_canvases

    x = split_canvases("val", 2).normalised()[:1]
    path = tmp_path / "det.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(det.model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["stride8", "stride16"])
    with torch.no_grad():
        expected = [o.numpy() for o in det.model(x)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled(x.numpy())
    for i, got in enumerate(session.run(None, {"input": x.numpy()})):
        np.testing.assert_allclose(got, expected[i], **ONNX_TOL)
        np.testing.assert_allclose(results[compiled.output(i)], expected[i], **ONNX_TOL)


def test_default_data_loads_the_bundled_weights(det):
    """With its own data source as with none, det_digits is its bundled checkpoint."""
    with_data = load_model("det_digits", load_data("digit_canvas"))
    assert with_data.source == det.source and with_data.input_shape == (3, 64, 64)
    assert all(torch.equal(v, det.model.state_dict()[k]) for k, v in with_data.model.state_dict().items())
