"""INT8 through ONNX Runtime's and OpenVINO's own quantizers, judged against the fp32 model on held-out images:
written when close, refused with nothing written when collapsed, rescued by the per-layer fallback."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compressor.errors import FidelityFloorError, InputError
from compressor.metrics.lossy import Floor
from compressor.models.sources import load_model
from compressor.quantize import QuantizationImages, quantization_images, quantize_checked
from compressor.rewrite.fold import fold_batchnorm
from exporters import get_quantizer
from exporters.int8_onnxruntime import QOPERATOR_OPS
from exporters.quantizer import QuantizeSettings

RUNTIMES = ("onnxruntime", "openvino")


@pytest.fixture(scope="module")
def images(digits) -> QuantizationImages:
    return quantization_images(digits, calibration_size=128, held_out_size=120)


@pytest.fixture(scope="module")
def resnet56(digits, images):
    """The bundled resnet56 trained on digits32, BatchNorm folded (what is deployed), and its example input."""
    x = torch.from_numpy(images.calibration[:1])
    return fold_batchnorm(load_model("resnet56", digits).model.eval(), x)[0], x


@pytest.fixture(scope="module")
def dead_channel(resnet56):
    """resnet56 whose first conv has a dead channel with huge weights (ReLU never lets it through): the fp32
    model is unharmed, but one weight scale per tensor rounds every other channel's weights to zero."""
    model, x = resnet56
    model = copy.deepcopy(model)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight[0] = 1000.0 * conv.weight[0].sign()
        conv.bias[0] = -1e6
    return model, x


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_int8_resnet56_written_and_close_to_fp32(runtime, resnet56, images, tmp_path):
    model, x = resnet56
    result = quantize_checked(model, x, runtime, tmp_path / "int8", images)
    assert result.path == tmp_path / ("int8.onnx" if runtime == "onnxruntime" else "int8.xml")
    assert all(f.is_file() for f in result.files) and result.files[-1] == result.path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in result.files)  # no leftovers
    f = result.fidelity
    assert f.images == 120 and f.top1_agreement >= 97.0 and f.sqnr_db >= 15.0 and f.kl_divergence < 0.05
    assert abs(f.accuracy - f.reference_accuracy) <= 2.0
    assert result.excluded == [] and len(result.attempts) == 1 and result.attempts[0]["accepted"]
    assert result.quantizer["runtime"] == runtime and result.quantizer["per_channel"] is True
    assert result.to_dict()["fidelity"]["top1_agreement"] == f.top1_agreement


def test_onnxruntime_int8_is_qdq_s8s8_never_qoperator(resnet56, images, tmp_path):
    model, x = resnet56
    result = quantize_checked(model, x, "onnxruntime", tmp_path / "int8.onnx", images, fallback=())
    graph = onnx.load(str(result.path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and not ops & QOPERATOR_OPS
    inits = {t.name: t for t in graph.initializer}
    activations = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    weights = [inits[n.input[2]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and n.input[0].endswith("weight_quantized")]
    assert activations and weights  # S8S8: signed int8 activations and weights
    assert all(t.data_type == onnx.TensorProto.INT8 for t in activations + weights)
    q = result.quantizer
    assert (q["format"], q["activation_type"], q["weight_type"], q["calibrate_method"]) == \
        ("QDQ", "QInt8", "QInt8", "MinMax")


def test_openvino_int8_is_nncf_fakequantize(resnet56, images, tmp_path):
    import openvino as ov

    model, x = resnet56
    result = quantize_checked(model, x, "openvino", tmp_path / "int8", images, fallback=())
    ops = {op.get_type_name() for op in ov.Core().read_model(str(result.path)).get_ordered_ops()}
    assert "FakeQuantize" in ops
    assert (result.quantizer["preset"], result.quantizer["target_device"]) == ("PERFORMANCE", "CPU")
    assert result.quantizer["fast_bias_correction"] is True


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_collapsed_int8_refused_and_nothing_written(runtime, dead_channel, images, tmp_path):
    model, x = dead_channel
    with pytest.raises(FidelityFloorError, match="refused after 1 try .*nothing written") as e:
        quantize_checked(model, x, runtime, tmp_path / "int8", images, QuantizeSettings(per_channel=False),
                         fallback=())
    assert list(tmp_path.iterdir()) == []
    (attempt,) = e.value.attempts
    assert not attempt["accepted"] and attempt["fidelity"]["top1_agreement"] < 40.0
    assert e.value.exit_code == 3


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fallback_keeps_the_harmful_layer_in_fp32(runtime, dead_channel, images, tmp_path):
    model, x = dead_channel
    messages = []
    result = quantize_checked(model, x, runtime, tmp_path / "int8", images, QuantizeSettings(per_channel=False),
                              fallback=(1, 2), rank_images=16, log=messages.append)
    assert result.excluded == ["/conv1/Conv"]
    assert next(iter(result.ranking)) == "/conv1/Conv" and result.ranking["/conv1/Conv"] > 20.0
    before, after = result.attempts[0]["fidelity"], result.fidelity
    assert not result.attempts[0]["accepted"] and result.attempts[-1]["accepted"]
    assert after.top1_agreement >= 97.0 > before["top1_agreement"] and after.sqnr_db > before["sqnr_db"] + 15.0
    assert any(m.startswith("fallback: layers by SQNR gained") for m in messages)


def test_fallback_chooses_its_layers_on_images_it_is_not_judged_on(dead_channel, images, tmp_path):
    """The fallback ranks layers on selection images from the calibration split, never on the held-out images
    that then judge its tries (a choice made on the judging images biases acceptance upward): other held-out
    images give the very same ranking."""
    model, x = dead_channel
    selection = images.ranking_images()
    assert images.selection is not None and len(selection) >= 16
    held_out = {row.tobytes() for row in images.held_out}
    assert not any(row.tobytes() in held_out for row in selection)  # disjoint from the judging images
    settings = QuantizeSettings(per_channel=False)
    other = QuantizationImages(images.calibration, images.held_out[::-1].copy(), images.labels[::-1].copy(),
                               images.selection)
    rankings = [quantize_checked(model, x, "onnxruntime", tmp_path / name / "int8", these, settings, fallback=(1,),
                                 rank_images=16).ranking for name, these in (("a", images), ("b", other))]
    assert rankings[0] and rankings[0] == rankings[1]


def test_fallback_that_cannot_reach_the_floor_refuses(dead_channel, images, tmp_path):
    model, x = dead_channel
    with pytest.raises(FidelityFloorError, match="refused after 2 tries") as e:
        quantize_checked(model, x, "onnxruntime", tmp_path / "int8", images, QuantizeSettings(per_channel=False),
                         floor=Floor(min_top1_agreement=100.0, min_sqnr_db=80.0), fallback=(1,), rank_images=8)
    assert [a["excluded"] for a in e.value.attempts] == [[], ["/conv1/Conv"]]
    assert list(tmp_path.iterdir()) == []


def test_excluded_layer_must_exist(resnet56, images, tmp_path):
    model, x = resnet56
    quantizer = get_quantizer("onnxruntime", QuantizeSettings(exclude=("/no/such/Conv",)))
    with pytest.raises(InputError, match="not a quantized layer"):
        quantizer.quantize(model, x, images.calibration, tmp_path / "m", images.held_out, lambda logits: None)
    assert list(tmp_path.iterdir()) == []


def test_too_few_calibration_images_for_the_batch_refused(resnet56, images, tmp_path):
    model, x = resnet56
    with pytest.raises(InputError, match="calibration needs at least 2 images"):
        get_quantizer("onnxruntime").quantize(model, x.repeat(2, 1, 1, 1), images.calibration[:1], tmp_path / "m",
                                              images.held_out, lambda logits: None)
    assert list(tmp_path.iterdir()) == []


def test_bad_settings_runtime_and_images_refused():
    with pytest.raises(InputError, match="unknown calibration method"):
        QuantizeSettings(method="kl")
    with pytest.raises(InputError, match="INT8 runtime 'tensorrt'"):
        get_quantizer("tensorrt")
    with pytest.raises(InputError, match="N x C x H x W"):
        QuantizationImages(np.zeros((4, 3, 8), np.float32), np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="NaN"):
        QuantizationImages(np.full((1, 3, 8, 8), np.nan, np.float32), np.zeros((4, 3, 8, 8), np.float32))


def test_percentile_and_entropy_calibration_are_options(resnet56, images, tmp_path):
    model, x = resnet56
    few = QuantizationImages(images.calibration[:32], images.held_out[:60], images.labels[:60])
    for method in ("entropy", "percentile"):
        result = quantize_checked(model, x, "onnxruntime", tmp_path / method, few, QuantizeSettings(method=method))
        assert result.quantizer["calibrate_method"] == method.capitalize()
        assert result.fidelity.top1_agreement >= 95.0
