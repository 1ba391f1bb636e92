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
