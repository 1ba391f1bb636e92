"""The prune job end to end on the bundled resnet56, with short timing floors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from compressor.cli.main import main
from compressor.latency.table import LatencyTable
from compressor.models.checkpoint import load_checkpoint
from compressor.search.target import margin_from
from tests.helpers import FAST_PROFILE, assert_exit_matches_target, assert_onnx_matches

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
        "baseline.onnx", "latency_table.json", "model.onnx", "model.pt", "model.pt2", "prediction.png", "recipe.json",
        "report.json", "report.md", "speedup.png"]
    assert_exit_matches_target(code, report, speedup=1.5)
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


def test_the_search_aims_under_the_target_by_the_spread_of_every_set_it_timed(run):
    """The margin the search used: half the median per-round spread of the floor measurement and of every set
    the latency table timed (not the floor's alone)."""
    _, out, report = run
    spreads = LatencyTable.load(out / "latency_table.json").round_spreads()
    basis = report["search"]["margin_from"]
    assert basis["table_sets"] == len(spreads) > 0
    median = float(np.median([basis["floor_spread"], *spreads]))
    assert report["search"]["margin"] == pytest.approx(margin_from(median))


def test_checkpoint_and_onnx_agree(run, digits):
    _, out, report = run
    raw = torch.load(out / "model.pt", weights_only=True)
    assert raw["removed_units"] == report["removed_units"]
    pruned = load_checkpoint(out / "model.pt").model
    x = torch.cat([b[0] for b in digits.loader("val", batch_size=16, limit=16)])
    assert_onnx_matches(pruned, out / "model.onnx", x)
    graph = onnx.load(out / "model.onnx").graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert len(graph.node) < len(onnx.load(out / "baseline.onnx").graph.node)
