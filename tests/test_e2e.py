"""The prune job end to end on the bundled resnet56, with short timing floors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compressor.cli.main import main
from compressor.models.checkpoint import load_checkpoint
from tests.helpers import FAST_PROFILE

REPORT_KEYS = {"flops", "macs", "params", "latency_ms", "accuracy"}
LATENCY_KEYS = {"median", "p90", "iqr", "n", "noisy"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "r56"
    profile = out.parent / "fast.yaml"
    profile.write_text(FAST_PROFILE)
    code = main(["prune", "--model", "resnet56", "--data", "digits32", "--profile", str(profile),
                 "--target-speedup", "1.5", "--out", str(out), "--finetune-epochs", "1",
                 "--calibration-size", "128"])
    return code, out, json.loads((out / "report.json").read_text())


def test_outputs_and_exit_code(run):
    code, out, report = run
    assert sorted(p.name for p in out.iterdir()) == [
        "baseline.onnx", "latency_table.json", "model.onnx", "model.pt", "model.pt2", "recipe.json", "report.json",
        "report.md", "speedup.png"]
    assert code == (0 if report["target_met"] else 1)
    assert report["target_met"] == (report["pruned"]["latency_ms"]["median"] <= report["target_ms"])


def test_report_fields(run):
    _, _, report = run
    for side in ("baseline", "pruned"):
        assert REPORT_KEYS <= set(report[side])
        assert LATENCY_KEYS <= set(report[side]["latency_ms"])
        assert report[side]["latency_ms"]["n"] >= 40
        assert report[side]["macs"] * 2 == report[side]["flops"]
    assert report["removed_units"]
    assert report["pruned"]["flops"] < report["baseline"]["flops"]
    assert report["speedup_flops"] == pytest.approx(report["baseline"]["flops"] / report["pruned"]["flops"])
    assert report["speedup_measured"] == pytest.approx(
        report["baseline"]["latency_ms"]["median"] / report["pruned"]["latency_ms"]["median"])
    assert report["criterion"] == "cka"
    assert report["profile"]["name"] == "ort-cpu-fast" and report["profile"]["machine"]["cpu"]
    assert report["target_ms"] == pytest.approx(report["baseline"]["latency_ms"]["median"] / 1.5)
    assert report["checks"]["artifact_format"] == "onnx"
    assert report["checks"]["artifact_max_abs_error"] <= 1e-4 + 1e-3 * 20
    assert report["pruned"]["accuracy"] > 80  # one distillation epoch on digits32
    error = report["search"]["table_error"]
    assert error["candidates"] == len(report["search"]["trials"]) >= 1
    assert 0 <= error["calibrated"]["mape"] and error["calibrated"]["kind"] == "scale"


def test_checkpoint_and_onnx_agree(run, digits):
    _, out, report = run
    raw = torch.load(out / "model.pt", weights_only=True)
    assert raw["removed_units"] == report["removed_units"]
    pruned = load_checkpoint(out / "model.pt").model
    x = torch.cat([b[0] for b in digits.loader("val", batch_size=16, limit=16)])
    with torch.no_grad():
        expected = pruned(x).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    graph = onnx.load(out / "model.onnx").graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert len(graph.node) < len(onnx.load(out / "baseline.onnx").graph.node)


def test_prune_with_merge_units(tmp_path, digits):
    """--merge: every block is offered both removed and merged; the table measures both; the
    written ONNX is the merged model and matches the checkpoint with its blocks merged."""
    from compressor.rewrite.linearised import merge_linearised

    profile = tmp_path / "fast.yaml"
    profile.write_text(FAST_PROFILE)
    out = tmp_path / "merge"
    code = main(["prune", "--model", "resnet56", "--data", "digits32", "--profile", str(profile),
                 "--target-speedup", "1.3", "--out", str(out), "--finetune-epochs", "1",
                 "--calibration-size", "64", "--merge"])
    report = json.loads((out / "report.json").read_text())
    assert code == (0 if report["target_met"] else 1)
    kinds = [u["kind"] for u in report["units"]]
    assert kinds.count("merge") == 27 and len(kinds) == 54
    table = json.loads((out / "latency_table.json").read_text())
    assert sum(name.endswith("/merge") for name in table["savings_ms"]) == 27
    merged = [n for n in report["removed_units"] if n.endswith("/merge")]
    assert set(report["checks"]["merges"]) == {n.removesuffix("/merge") for n in merged}
    assert all(c["interior_max_rel_error"] <= 1e-5 for c in report["checks"]["merges"].values())
    deployed = merge_linearised(load_checkpoint(out / "model.pt").model).eval()
    x = torch.cat([b[0] for b in digits.loader("val", batch_size=8, limit=8)])
    with torch.no_grad():
        expected = deployed(x).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_prune_with_greedy_selection(tmp_path):
    """--selection greedy: the report records the greedy order with each set's measured KL, and
    every measured candidate carries its own measured KL (the search compares them on it)."""
    profile = tmp_path / "fast.yaml"
    profile.write_text(FAST_PROFILE)
    out = tmp_path / "greedy"
    code = main(["prune", "--model", "resnet56", "--data", "digits32", "--profile", str(profile),
                 "--target-speedup", "1.2", "--out", str(out), "--finetune-epochs", "0",
                 "--calibration-size", "64", "--selection", "greedy"])
    report = json.loads((out / "report.json").read_text())
    assert code == (0 if report["target_met"] else 1)
    search = report["search"]
    assert search["selection"] == "greedy" and report["config"]["selection"] == "greedy"
    greedy = search["greedy"]
    assert greedy["steps"] and greedy["images"] == 128
    assert greedy["sets_evaluated"] >= 27  # every unit alone, at least
    kls = [s["kl"] for s in greedy["steps"]]
    assert all(k > -1e-9 for k in kls)
    assert [s["table_saving_ms"] for s in greedy["steps"]] == sorted(s["table_saving_ms"] for s in greedy["steps"])
    assert all(t["importance_lost"] > -1e-9 for t in search["trials"])
    assert "sets proposed by greedy" in (out / "report.md").read_text()
