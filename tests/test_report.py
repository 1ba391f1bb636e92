"""The report's figures over measured candidates: known answers on synthetic trials."""

from __future__ import annotations

import json

import pytest

from compressor.latency.table import LatencyTable
from compressor.report import _prediction_error, _trial
from compressor.search.knapsack import Choice
from compressor.search.loop import Trial
from compressor.search.target import Measured


def _trials() -> list[Trial]:
    timed = Trial(Choice(("a",), 0.1, 1.0), 9.0, Measured(10.0, 8.0, 0.01), False)  # predicted 9 ms, measured 8
    refused = Trial(Choice(("a", "b"), 0.2, 2.0), 8.0, Measured(10.0, float("inf"), 0.0, refused=True), False)
    return [timed, refused]


TABLE = LatencyTable("m", [1, 3, 8, 8], {}, {}, 10.0, {"a": 1.0, "b": 1.0})  # version 1: 10 ms - 1 ms per unit


def test_a_refused_candidate_is_left_out_of_the_table_error():
    error = _prediction_error(_trials(), TABLE)
    assert error["candidates"] == 1 and error["mape"] == pytest.approx(1 / 8)  # |9 - 8| / 8, not NaN


def test_the_table_error_is_taken_at_each_candidates_own_baseline():
    halved = Trial(Choice(("a",), 0.1, 1.0), 9.0, Measured(20.0, 16.0, 0.01), False)  # the machine ran 2x slower
    assert _prediction_error([halved], TABLE)["mape"] == pytest.approx(2 / 16)  # predicted 18 ms, measured 16


def test_a_refused_candidate_has_no_latency_in_the_report():
    rows = [_trial(t, TABLE) for t in _trials()]
    refused = json.loads(json.dumps(rows, allow_nan=False))[1]  # strict JSON: no Infinity or NaN
    assert (refused["measured_ms"], refused["speedup"], refused["refused"]) == (None, None, True)
    assert rows[0]["measured_ms"] == 8.0 and rows[0]["speedup"] == pytest.approx(1.25)


def test_the_one_line_summary_gives_the_delivered_int8_fidelity():
    from compressor.cli.commands import _summary

    latency = {"latency_ms": {"median": 1.0}}
    report = {"model": "m", "speedup_measured": 2.0, "speedup_flops": 1.0,
              "baseline": {**latency, "accuracy": 99.0}, "pruned": {**latency, "accuracy": 98.0},
              "fidelity": {"after_finetune": {"top1_agreement": 100.0}},
              "precision": {"delivered": "fp32"}}
    assert "accuracy 99.00 -> 98.00%, top-1 agreement 100.0%" in _summary(report, "out")
    report["precision"] = {"delivered": "int8",
                           "final_int8": {"against_unpruned": {"top1_agreement": 85.9, "accuracy": 97.5}}}
    assert "INT8 accuracy 99.00 -> 97.50%, top-1 agreement 85.9%" in _summary(report, "out")


def test_predicted_figures_are_called_predicted():
    """A run on the table device (runtime: table) timed nothing: its summary says so."""
    from compressor.cli.commands import _summary

    latency = {"latency_ms": {"median": 1.0}}
    report = {"model": "m", "speedup_measured": 2.0, "speedup_flops": 1.0, "latency_source": "predicted",
              "baseline": {**latency, "accuracy": None}, "pruned": {**latency, "accuracy": None},
              "fidelity": {"after_finetune": {"top1_agreement": 100.0}}, "precision": {"delivered": "fp32"}}
    assert "2.00x PREDICTED by the latency table, not measured" in _summary(report, "out")
    assert "measured" not in _summary(report, "out").replace("not measured", "")


def test_a_delivered_set_faster_than_needed_is_explained():
    from compressor.report import _search_lines

    trials = [{"removed": ["a"], "overshot": True}, {"removed": ["b"], "overshot": False}]
    report = {"removed_units": ["a"], "latency_source": "measured",
              "search": {"trials": trials, "ended": "no set not yet measured removes less than ..."}}
    lines = _search_lines(report)
    assert "measured 2 candidate(s)" in lines[0] and "faster than needed" in lines[1]
    assert len(_search_lines({**report, "removed_units": ["b"]})) == 1
def test_a_set_with_a_group_no_set_measured_has_no_sd_in_the_report():
    from compressor.latency.model import LatencyModel, SetMeasurement, UnitInfo

    infos = [UnitInfo("a", "ga", "s", 0, "a"), UnitInfo("b", "gb", "s", 1, "b")]
    model = LatencyModel.fit(infos, [SetMeasurement(("a",), 0.1, 0.01, 0, 9.0, 10.0)])  # b never removed
    table = LatencyTable.from_model("m", [1, 3, 8, 8], {}, {}, model, {"sessions": []})
    row = _trial(Trial(Choice(("a", "b"), 0.1, 1.0), 9.0, Measured(10.0, 8.0, 0.01), False), table)
    json.dumps(row, allow_nan=False)  # strict JSON: no Infinity
    assert row["model_sd_ms"] is None and row["model_ms"] == pytest.approx(9.0)  # b: saving 0, unknown
