"""Calibration of latency-table predictions: known answers on synthetic numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from compressor.latency.predictor import (
    Calibration,
    Observation,
    anchor_plus_one,
    compare,
    errors_fitted_on,
    fit_calibration,
    leave_one_out,
    pooled,
    predicted_fraction,
    prediction_errors,
)


@dataclass
class FakeTable:
    baseline_ms: float = 10.0
    savings_ms: dict[str, float] = field(default_factory=lambda: {"a": 1.0, "b": 2.0, "c": 0.5})


def _obs(pairs: list[tuple[float, int]], truth) -> list[Observation]:
    """Observations whose measured fraction follows `truth(predicted, k)` exactly."""
    return [Observation(p, truth(p, k), k) for p, k in pairs]


PAIRS = [(0.1, 1), (0.25, 2), (0.3, 4), (0.45, 5), (0.6, 6)]


def test_scale_from_one_candidate_is_measured_over_predicted():
    cal = fit_calibration([Observation(0.4, 0.3, 5)], "scale")
    assert cal.kind == "scale" and cal.n == 1
    assert cal.scale == pytest.approx(0.75)
    assert cal.per_unit == 0.0


def test_scale_is_least_squares_through_origin():
    obs = [Observation(0.1, 0.1, 1), Observation(0.2, 0.3, 2)]
    # c = (0.1*0.1 + 0.2*0.3) / (0.1^2 + 0.2^2) = 0.07 / 0.05
    assert fit_calibration(obs, "scale").scale == pytest.approx(1.4)


def test_offset_recovers_a_per_unit_error():
    obs = _obs(PAIRS, lambda p, k: p - 0.02 * k)
    cal = fit_calibration(obs, "offset")
    assert cal.scale == 1.0
    assert cal.per_unit == pytest.approx(-0.02)


def test_affine_recovers_both_terms():
    obs = _obs(PAIRS, lambda p, k: 0.8 * p + 0.01 * k)
    cal = fit_calibration(obs, "affine")
    assert cal.kind == "affine" and cal.n == len(PAIRS)
    assert cal.scale == pytest.approx(0.8)
    assert cal.per_unit == pytest.approx(0.01)


def test_affine_falls_back_to_scale_without_two_independent_candidates():
    one = fit_calibration([Observation(0.4, 0.2, 4)], "affine")
    assert one.kind == "scale" and one.scale == pytest.approx(0.5)
    collinear = fit_calibration([Observation(0.1, 0.05, 1), Observation(0.2, 0.1, 2)], "affine")
    assert collinear.kind == "scale" and collinear.scale == pytest.approx(0.5)


def test_none_and_empty_fits_are_the_identity():
    assert fit_calibration([Observation(0.4, 0.2, 4)], "none") == Calibration()
    for kind in ("scale", "offset", "affine"):
        cal = fit_calibration([], kind)
        assert (cal.scale, cal.per_unit, cal.n) == (1.0, 0.0, 0)
    assert fit_calibration([Observation(0.0, 0.0, 0)], "scale").n == 0  # the unpruned model carries nothing


def test_count_ignores_the_table():
    obs = _obs(PAIRS, lambda p, k: 0.07 * k)
    cal = fit_calibration(obs, "count")
    assert (cal.scale, cal.per_unit) == (0.0, pytest.approx(0.07))
    assert cal.predict_ms(FakeTable(), ["a", "b"]) == pytest.approx(10.0 * (1 - 0.14))
    with pytest.raises(ValueError, match="does not rank"):
        cal.required_saving_ms(FakeTable(), 0.3, 2)


def test_pooled_savings_are_group_means():
    table = FakeTable(savings_ms={"a": 1.0, "b": 2.0, "c": 0.5, "d": 4.0})
    p = pooled(table, {"a": "x", "b": "x", "c": "y"})
    assert p.baseline_ms == table.baseline_ms
    assert p.savings_ms == {"a": 1.5, "b": 1.5, "c": 0.5, "d": 4.0}  # d has no group: kept
    assert table.savings_ms["a"] == 1.0  # the original is untouched
    assert sum(p.savings_ms[n] for n in ("a", "b")) == pytest.approx(3.0)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown calibration kind"):
        fit_calibration([], "cubic")


def test_predict_ms_in_a_measured_baseline_frame():
    table = FakeTable()
    assert predicted_fraction(table, ["a", "b"]) == pytest.approx(0.3)
    assert Calibration().predict_ms(table, ["a", "b"]) == pytest.approx(7.0)  # = table baseline - sum
    cal = Calibration("scale", 0.5)
    assert cal.predict_ms(table, ["a", "b"], baseline_ms=20.0) == pytest.approx(17.0)  # 20 * (1 - 0.15)
    offset = Calibration("offset", 1.0, -0.05)
    assert offset.predict_ms(table, ["a", "b"]) == pytest.approx(8.0)  # 10 * (1 - (0.3 - 0.1))


def test_required_saving_inverts_the_correction():
    table = FakeTable()
    cal = Calibration("affine", 0.8, -0.01)
    need = cal.required_saving_ms(table, 0.3, removed=4)
    assert cal.saved_fraction(need / table.baseline_ms, 4) == pytest.approx(0.3)


def test_observation_from_a_measurement():
    o = Observation.measured(FakeTable(), ["a", "c"], baseline_ms=5.0, candidate_ms=4.0)
    assert (o.predicted_fraction, o.measured_fraction, o.removed) == (pytest.approx(0.15), pytest.approx(0.2), 2)


def test_prediction_errors_known_answer():
    e = prediction_errors([110, 90, 100, 130], [100, 100, 100, 100])
    assert e["mape"] == pytest.approx(0.125)
    assert e["within_10pct"] == pytest.approx(0.75)  # +-10% counts as within
    assert e["bias"] == pytest.approx(0.075)
    assert e["max"] == pytest.approx(0.3)
    assert e["n"] == 4


def test_prediction_errors_empty_and_mismatched():
    assert prediction_errors([], [])["n"] == 0
    with pytest.raises(ValueError):
        prediction_errors([1.0], [1.0, 2.0])


def test_cross_validation_is_exact_for_the_true_model_only():
    test = _obs(PAIRS, lambda p, k: p - 0.02 * k)
    floor = Observation(0.8, 0.8 - 0.02 * 7, 7)
    assert leave_one_out(test, "offset", [floor])["mape"] == pytest.approx(0.0, abs=1e-12)
    assert errors_fitted_on([floor], test, "offset")["mape"] == pytest.approx(0.0, abs=1e-12)
    assert anchor_plus_one(test, "affine", [floor])["mape"] == pytest.approx(0.0, abs=1e-9)
    assert leave_one_out(test, "scale", [floor])["mape"] > 0.01
    raw = errors_fitted_on([floor], test, "none")
    assert raw["bias"] < 0  # the raw sum predicts too much saving: latency predicted too low


def test_error_of_one_prediction_is_relative_to_latency_not_saving():
    # measured: 40% saved -> latency 0.6; predicted 30% saved -> latency 0.7: error +1/6
    e = errors_fitted_on([], [Observation(0.3, 0.4, 2)], "none")
    assert e["mape"] == pytest.approx(0.1 / 0.6)
    assert e["bias"] == pytest.approx(0.1 / 0.6)


def test_compare_counts():
    test = _obs(PAIRS, lambda p, k: 0.9 * p)
    out = compare(test, Observation(0.7, 0.63, 7), kinds=("scale", "affine"))
    assert set(out) == {"on_floor", "floor_plus_one", "leave_one_out"}
    assert out["on_floor"]["scale"]["n"] == len(PAIRS)
    assert out["leave_one_out"]["scale"]["n"] == len(PAIRS)
    assert out["floor_plus_one"]["affine"]["n"] == len(PAIRS) * (len(PAIRS) - 1)
    assert out["on_floor"]["scale"]["mape"] == pytest.approx(0.0, abs=1e-12)
    assert out["leave_one_out"]["scale"]["scale"]["median"] == pytest.approx(0.9)


def test_module_is_torch_free():
    import subprocess
    import sys

    code = "import sys, compressor.latency.predictor; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
