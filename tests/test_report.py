"""The report's figures over measured candidates: known answers on synthetic trials."""

from __future__ import annotations

import json

import pytest

from compressor.report import _prediction_error, _trial
from compressor.search.knapsack import Choice
from compressor.search.loop import Trial
from compressor.search.target import Measured


def _trials() -> list[Trial]:
    timed = Trial(Choice(("a",), 0.1, 1.0), 9.0, Measured(10.0, 8.0, 0.01), False)  # predicted 9 ms, measured 8
    refused = Trial(Choice(("a", "b"), 0.2, 2.0), 8.0, Measured(10.0, float("inf"), 0.0, refused=True), False)
    return [timed, refused]


def test_a_refused_candidate_is_left_out_of_the_table_error():
    error = _prediction_error(_trials())
    assert error["candidates"] == 1 and error["mape"] == pytest.approx(1 / 8)  # |9 - 8| / 8, not NaN


def test_a_refused_candidate_has_no_latency_in_the_report():
    rows = [_trial(t) for t in _trials()]
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
