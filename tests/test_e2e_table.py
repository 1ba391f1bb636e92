"""Whole prunes on the table device (`runtime: table`), whose latencies are a known function of the units
removed: the outcome is asserted exactly. The target is met, and the set delivered is the one an exhaustive
search over every allowed subset of resnet20's 9 units finds with the run's own importance scores, so these
fail when the search, the target arithmetic or the final verification is broken."""

from __future__ import annotations

import itertools
import json

import pytest

import compressor
from compressor.cli.main import main
from tests.helpers import resnet20
from tests.test_table_device import table_profile, write_table

BASE_MS = 2.0
# resnet20's units of identical structure (graph/signature.py) save the same on the device: the latency model
# the prune fits on designed removal sets (latency/model.py) has one saving per structure group, so only a
# device whose savings are additive per group is one it fits exactly, and the search's outcome exact
# (multiples of 0.005 ms adding up to 1 ms: tests/test_e2e_width.py's knapsack bins stay exact)
SAVINGS = {"layer1.0": 0.035, "layer1.1": 0.035, "layer1.2": 0.035, "layer2.0": 0.095, "layer2.1": 0.065,
           "layer2.2": 0.065, "layer3.0": 0.07, "layer3.1": 0.30, "layer3.2": 0.30}
# the documented search settings (docs/how-it-works.md), written out so the arithmetic is checked independently:
MARGIN = 0.01  # a device with no spread: the search aims 1% under the target
BAND = 0.06  # a pass more than 6% under the latency aimed at is refined
OPTIONS = {"finetune_epochs": 0, "calibration_size": 64, "criterion": "magnitude"}
CLI_OPTIONS = ["--finetune-epochs", "0", "--calibration-size", "64", "--criterion", "magnitude"]


def allowed_sets() -> list[tuple[str, ...]]:
    """Every removal set of resnet20 that keeps a block in each of its three stages of three blocks."""
    stages = [[n for n in SAVINGS if n.startswith(f"layer{i}.")] for i in (1, 2, 3)]
    per_stage = [[c for k in range(3) for c in itertools.combinations(blocks, k)] for blocks in stages]
    return [tuple(n for part in parts for n in part) for parts in itertools.product(*per_stage)]


def predicted_ms(removed, savings=SAVINGS) -> float:
    return BASE_MS - sum(savings[n] for n in removed)


def exact_trials(importance: dict[str, float], speedup: float, savings=SAVINGS) -> list[tuple[str, ...]]:
    """The sets the search must measure, in order: the least important set predicted to meet the target with
    the margin; while the last one overshoots (more than the band under the latency aimed at), the least
    important set that meets it and saves less than the last one."""
    aimed_ms = BASE_MS / speedup * (1 - MARGIN)
    assert all(abs(predicted_ms(s, savings) - aimed_ms) > 1e-6 for s in allowed_sets()), "a set on the boundary"
    meeting = [s for s in allowed_sets() if predicted_ms(s, savings) <= aimed_ms]
    trials = [min(meeting, key=lambda s: sum(importance[n] for n in s))]
    while predicted_ms(trials[-1], savings) < aimed_ms * (1 - BAND):
        less = [s for s in meeting if predicted_ms(s, savings) > predicted_ms(trials[-1], savings) + 1e-9]
        if not less:
            break
        trials.append(min(less, key=lambda s: sum(importance[n] for n in s)))
    return trials


def check_outcome(report: dict, speedup: float, savings=SAVINGS) -> None:
    """The target met, by the set the exact search delivers (the last it measures: within the band, or the
    least important that meets the target if none is), after measuring what it must, each set once."""
    importance = {u["name"]: u["importance"] for u in report["units"]}
    expected = exact_trials(importance, speedup, savings)
    delivered = tuple(report["removed_units"])
    assert report["latency_source"] == "predicted"
    assert report["pruned"]["latency_ms"]["median"] == pytest.approx(predicted_ms(delivered, savings), abs=1e-12)
    assert report["baseline"]["latency_ms"]["median"] == BASE_MS
    assert report["speedup_measured"] >= speedup, "the target is not met"
    assert report["target_met"]
    assert sorted(delivered) == sorted(expected[-1]), f"delivered {delivered}, the exact search gives {expected}"
    tried = [sorted(t["removed"]) for t in report["search"]["trials"]]
    assert tried == [sorted(s) for s in expected]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("table")
    write_table(folder, SAVINGS)
    table_profile(folder)
    return folder


def test_cli_prune_meets_the_target_with_the_exact_optimum_and_says_it_is_predicted(folder, capsys):
    code = main(["prune", "--model", "tests.helpers:resnet20", "--data", "digits32", "--profile",
                 str(folder / "replay.yaml"), "--target-speedup", "1.45", "--out", str(folder / "r145"), *CLI_OPTIONS])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    report = json.loads((folder / "r145" / "report.json").read_text())
    check_outcome(report, 1.45)
    assert "PREDICTED by the latency table, not measured" in err.strip().splitlines()[-1]
    markdown = (folder / "r145" / "report.md").read_text()
    assert "predicted, not measured" in markdown and "Predicted speedup" in markdown
    assert "Measured speedup" not in markdown
    assert (folder / "r145" / "model.table").is_file() and (folder / "r145" / "model.onnx").is_file()


def test_after_an_overshoot_the_prune_delivers_the_best_set_within_the_band(folder, digits):
    """At 1.09x the least important set that meets the target (one of layer3.1, layer3.2, saving 0.30 of 2 ms)
    is 1.18x:
    the search must go on to the best set not yet measured that removes less."""
    report = compressor.prune(resnet20(), data=digits, target=compressor.Speedup(1.09),
                              profile=str(folder / "replay.yaml"), out=folder / "r109", log=None,
                              selection="knapsack", **OPTIONS).report
    check_outcome(report, 1.09)
    assert len(report["search"]["trials"]) >= 2 and report["search"]["trials"][0]["overshot"]
    assert "within" in report["search"]["ended"]


def test_when_only_overshooting_sets_meet_the_target_the_report_says_why(tmp_path, digits):
    """Two units (one structure) save 40% of the latency each and the others little: every set that meets 1.1x
    is far faster.
    Greedy selection proposes by measured KL; it too never proposes a set twice, and the report says why the
    set delivered is faster than needed."""
    savings = {n: (0.8 if n in ("layer3.1", "layer3.2") else 0.0125) for n in SAVINGS}
    write_table(tmp_path, savings)
    profile = table_profile(tmp_path)
    report = compressor.prune(resnet20(), data=digits, target=compressor.Speedup(1.1), profile=str(profile),
                              out=tmp_path / "run", log=None, selection="greedy", **OPTIONS).report
    assert report["removed_units"] and {"layer3.1", "layer3.2"} & set(report["removed_units"])
    assert report["speedup_measured"] >= 1.1 and report["target_met"]
    tried = [frozenset(t["removed"]) for t in report["search"]["trials"]]
    assert len(tried) == len(set(tried)) and all(t["overshot"] for t in report["search"]["trials"])
    assert "no set not yet measured removes less" in report["search"]["ended"]
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "faster than needed" in markdown and report["search"]["ended"] in markdown


def test_int8_on_the_table_runtime_is_refused_and_leaves_nothing(folder, capsys):
    out = folder / "int8"
    code = main(["prune", "--model", "tests.helpers:resnet20", "--data", "digits32", "--profile",
                 str(folder / "replay.yaml"), "--target-speedup", "1.3", "--out", str(out), "--precision", "int8",
                 *CLI_OPTIONS])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "INT8" in last and "table" in last, last
    assert not out.exists()
