"""The prune job end to end with the other ways to choose: merged blocks, greedy selection (each a whole
prune with short timing floors, of a seeded random ResNet-20 given as MODULE:FACTORY: its 9 blocks make
the latency table and the greedy steps a third of resnet56's; in a file of their own so that the test
workers share them out)."""

from __future__ import annotations

import json

import torch

from compressor.cli.main import main
from compressor.models.checkpoint import load_checkpoint
from tests.helpers import FAST_PROFILE, assert_exit_matches_target, assert_onnx_matches

RESNET20 = "tests.helpers:resnet20"


def test_prune_with_merge_units(tmp_path, digits):
    """--merge: every block is offered both removed and merged; the table measures both; the
    written ONNX is the merged model and matches the checkpoint with its blocks merged."""
    from compressor.rewrite.linearised import merge_linearised

    profile = tmp_path / "fast.yaml"
    profile.write_text(FAST_PROFILE)
    out = tmp_path / "merge"
    code = main(["prune", "--model", RESNET20, "--data", "digits32", "--profile", str(profile),
                 "--target-speedup", "1.3", "--out", str(out), "--finetune-epochs", "1",
                 "--calibration-size", "64", "--merge"])
    report = json.loads((out / "report.json").read_text())
    assert_exit_matches_target(code, report, speedup=1.3)
    kinds = [u["kind"] for u in report["units"]]
    assert kinds.count("merge") == 9 and len(kinds) == 18
    table = json.loads((out / "latency_table.json").read_text())
    assert sum(name.endswith("/merge") for name in table["savings_ms"]) == 9
    merged = [n for n in report["removed_units"] if n.endswith("/merge")]
    assert set(report["checks"]["merges"]) == {n.removesuffix("/merge") for n in merged}
    assert all(c["interior_max_rel_error"] <= 1e-5 for c in report["checks"]["merges"].values())
    deployed = merge_linearised(load_checkpoint(out / "model.pt").model).eval()
    x = torch.cat([b[0] for b in digits.loader("val", batch_size=8, limit=8)])
    assert_onnx_matches(deployed, out / "model.onnx", x)


def test_prune_with_greedy_selection(tmp_path):
    """--selection greedy: the report records the greedy order with each set's measured KL, and
    every measured candidate carries its own measured KL (the search compares them on it)."""
    profile = tmp_path / "fast.yaml"
    profile.write_text(FAST_PROFILE)
    out = tmp_path / "greedy"
    code = main(["prune", "--model", RESNET20, "--data", "digits32", "--profile", str(profile),
                 "--target-speedup", "1.2", "--out", str(out), "--finetune-epochs", "0",
                 "--calibration-size", "64", "--selection", "greedy"])
    report = json.loads((out / "report.json").read_text())
    assert_exit_matches_target(code, report, speedup=1.2)
    search = report["search"]
    assert search["selection"] == "greedy" and report["config"]["selection"] == "greedy"
    greedy = search["greedy"]
    assert greedy["steps"] and greedy["images"] == 128
    assert greedy["sets_evaluated"] >= 9  # every unit alone, at least
    kls = [s["kl"] for s in greedy["steps"]]
    assert all(k > -1e-9 for k in kls)
    assert [s["table_saving_ms"] for s in greedy["steps"]] == sorted(s["table_saving_ms"] for s in greedy["steps"])
    alone = greedy["alone"]  # every unit the first step tried, least KL per ms first: the first step is the head
    assert len(alone) >= 9 and alone[0]["unit"] == greedy["steps"][0]["unit"]
    assert [a["kl"] / a["table_saving_ms"] for a in alone] == sorted(a["kl"] / a["table_saving_ms"] for a in alone)
    assert all(t["importance_lost"] > -1e-9 for t in search["trials"])
    assert "sets proposed by greedy" in (out / "report.md").read_text()
