"""The search's margin: from the spread of the floor measurement and of every set the latency table timed."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.latency.table import LatencyTable
from compressor.search.target import Measured
from compressor.stages.reach import Reach, settled_margin

# per-round ratios whose quartiles are known: sorted, np.percentile interpolates 1.9875 and 2.0125 around 2.0
RATIOS = [2.05, 1.9, 2.0, 1.95, 2.0, 2.1, 2.0, 2.0]
SPREAD = 0.025 / 2.0


def _table(sets: int, short_sets: int = 0) -> LatencyTable:
    """A table whose design timed `sets` sets at SPREAD in 8 rounds, and `short_sets` more in 3 wild rounds."""
    base = [2.0] * len(RATIOS)
    steady = [[b / r for b, r in zip(base, RATIOS, strict=True)] for _ in range(sets)]
    sessions = [{"id": 0, "sets": [[], *([f"u{i}"] for i in range(sets))], "round_medians": [base, *steady]}]
    if short_sets:
        wild = [[1.0, 2.0, 0.5]] * short_sets
        sessions.append({"id": 1, "sets": [[], *([f"w{i}"] for i in range(short_sets))],
                         "round_medians": [[2.0, 2.0, 2.0], *wild]})
    return LatencyTable("m", [1, 3, 8, 8], {}, {}, 2.0, {}, version=2, design={"sessions": sessions})


def _reach(floor_spread: float) -> Reach:
    return Reach(Path("baseline.onnx"), ["u0"], Measured(2.0, 1.0, floor_spread), margin=min(0.05, floor_spread / 2))


def test_round_spreads_are_the_iqr_over_median_of_each_timed_set_with_enough_rounds():
    spreads = _table(5, short_sets=2).round_spreads()
    assert spreads == pytest.approx([SPREAD] * 5)
    v1 = LatencyTable("m", [1, 3, 8, 8], {}, {}, 2.0, {"a": 0.1})
    assert v1.round_spreads() == []


def test_one_wide_floor_measurement_does_not_set_the_margin_when_the_table_timed_many_steady_sets():
    """A floor that spread 10% alone would aim 5% under the target; 20 sets at 1.25% say 1% (the least)."""
    logged = []
    reach = settled_margin(_reach(0.10), _table(20, short_sets=3), logged.append)
    assert reach.margin == pytest.approx(0.01) and reach.margin_sets == 20
    assert "5.0%" in logged[0] and "20 timed sets" in logged[0]


def test_the_median_is_over_the_floor_and_the_sets_alike():
    """With two steady sets beside a 6% floor the median is the steady sets' spread (half of it is under the
    least margin, 1%), and with one steady set it is the mean of the two: (6% + 1.25%) / 4 = 1.8% under."""
    assert settled_margin(_reach(0.06), _table(2), print).margin == pytest.approx(0.01)
    assert settled_margin(_reach(0.06), _table(1), print).margin == pytest.approx((0.06 + SPREAD) / 4)


def test_a_table_without_timed_sets_keeps_the_floor_margin():
    reach = _reach(0.06)
    assert settled_margin(reach, LatencyTable("m", [1, 3, 8, 8], {}, {}, 2.0, {"a": 0.1}), print) is reach
