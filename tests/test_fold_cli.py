"""`compressor fold`: exact folds only, an ONNX without BatchNormalization that runs, nothing overwritten."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from compressor.cli.main import main
from compressor.models.checkpoint import save_checkpoint
from compressor.models.loaded import LoadedModel
from compressor.models.zoo import build
from compressor.rewrite.fold import FOLD_RTOL, apply_structure
from tests.helpers import randomise_batchnorm


@pytest.fixture
def checkpoint(tmp_path):
    """resnet20 with non-trivial BatchNorm statistics, so the folds change real numbers."""
    model = randomise_batchnorm(build("resnet20", 10))
    loaded = LoadedModel(model, "resnet20", 10, (3, 32, 32), "test")
    return save_checkpoint(tmp_path / "r20.pt", loaded), model


def _x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_fold_writes_a_checked_onnx_without_batchnorm(tmp_path, checkpoint, capsys):
    import onnxruntime as ort

    path, model = checkpoint
    out = tmp_path / "folded"
    assert main(["fold", "--model", str(path), "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "folded 21 BatchNorm layers" in summary and f"tolerance {FOLD_RTOL:g}" in summary
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt"]
    graph = onnx.load(str(out / "model.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = _x()[:1]
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(got - expected).max() <= FOLD_RTOL * np.abs(expected).max()


def test_folded_checkpoint_loads_without_pickle_and_rebuilds(tmp_path, checkpoint):
    path, model = checkpoint
    out = tmp_path / "folded"
    assert main(["fold", "--model", str(path), "--out", str(out), "--json"]) == 0
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["arch"] == "resnet20" and payload["fold_max_rel_error"] <= FOLD_RTOL
    rebuilt = apply_structure(build("resnet20", 10), payload["folded_structure"])
    rebuilt.load_state_dict(payload["state_dict"])
    assert not [m for m in rebuilt.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = _x()
    with torch.no_grad():
        expected = model(x)
        assert (rebuilt(x) - expected).abs().max() <= FOLD_RTOL * expected.abs().max()


def test_fold_json_summary(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    assert main(["fold", "--model", str(path), "--out", str(tmp_path / "o"), "--json", "--opset", "13"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["batchnorm_folds"] == 21 and summary["onnx_batchnorm_nodes"] == 0
    assert summary["onnx_opset"] == 13 and summary["max_rel_error"] <= summary["tolerance_rel"]
    assert onnx.load(str(tmp_path / "o" / "model.onnx")).opset_import[0].version == 13


def test_fold_refuses_a_non_empty_output_and_leaves_it_alone(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    out = tmp_path / "taken"
    out.mkdir()
    (out / "model.onnx").write_text("mine")
    assert main(["fold", "--model", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("compressor fold: error: ") and "not empty" in err[-1]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert (out / "model.onnx").read_text() == "mine"


@pytest.mark.parametrize(("model", "message"), [
    ("resnet999", "unknown model"),
    ("/nonexistent/model.pt", "checkpoint not found"),
])
def test_fold_bad_model_is_one_line_exit_2(tmp_path, capsys, model, message):
    assert main(["fold", "--model", model, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o").exists()


def test_fold_output_that_is_a_file_is_refused(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["fold", "--model", str(path), "--out", str(target)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert target.read_text() == "x"
