"""The knapsack choice against brute force, and the measured search loop on a known latency model."""

from __future__ import annotations

import itertools
import random

import pytest

from compressor.graph.units import Unit
from compressor.search.knapsack import BINS, choose_units, most_removable, removable_limits
from compressor.search.loop import search_under_target
from compressor.search.target import OVERSHOOT_BAND, Measured, Target, required_fraction


def _units(n: int, stages: int = 3) -> list[Unit]:
    return [Unit(f"u{i}", "identity", f"s{i % stages}", i) for i in range(n)]


def _brute_force(units, importance, savings, required, min_per_stage):
    limits = removable_limits(units, min_per_stage)
    best = None
    for r in range(len(units) + 1):
        for subset in itertools.combinations(units, r):
            counts = {}
            for u in subset:
                counts[u.stage] = counts.get(u.stage, 0) + 1
            if any(c > limits[s] for s, c in counts.items()):
                continue
            if sum(savings[u.name] for u in subset) >= required:
                cost = sum(importance[u.name] for u in subset)
                if best is None or cost < best:
                    best = cost
    return best


@pytest.mark.parametrize("seed", range(25))
def test_choice_matches_brute_force(seed):
    rng = random.Random(seed)
    units = _units(10)
    importance = {u.name: rng.random() for u in units}
    savings = {u.name: rng.uniform(0.05, 1.0) for u in units}
    required = rng.uniform(0.3, 3.0)
    choice = choose_units(units, importance, savings, required, min_per_stage=1)
    best = _brute_force(units, importance, savings, required, 1)
    slack = len(units) * sum(savings.values()) / BINS  # savings are rounded to bins
    if choice is None:
        assert best is None or _brute_force(units, importance, savings, required + slack, 1) is None
        return
    assert choice.predicted_saving_ms >= required - slack
    counts = {}
    for name in choice.removed:
        stage = next(u.stage for u in units if u.name == name)
        counts[stage] = counts.get(stage, 0) + 1
    assert all(c <= 3 for c in counts.values())  # 4 or 3 per stage, one kept
    relaxed = _brute_force(units, importance, savings, required - slack, 1)
    assert relaxed is not None and choice.importance_lost <= (best if best is not None else 1e9) + 1e-9
    assert choice.importance_lost >= relaxed - 1e-9


def test_equal_importance_keeps_as_much_model_as_possible():
    units = _units(6, stages=1)
    importance = {u.name: 0.0 for u in units}
    savings = {u.name: 1.0 for u in units}
    choice = choose_units(units, importance, savings, 2.5, min_per_stage=1)
    assert len(choice.removed) == 3


def test_importance_below_zero_is_noise_and_does_not_pad_the_set():
    """Scores of -1e-7 (1 - CKA in float32 on blocks that barely change the features): the set still
    saves just what is required, as with equal importance."""
    units = _units(6, stages=1)
    importance = {u.name: -1e-7 * (1 + u.order) for u in units}
    savings = {u.name: 1.0 for u in units}
    choice = choose_units(units, importance, savings, 2.5, min_per_stage=1)
    assert len(choice.removed) == 3 and choice.importance_lost == 0.0


def test_infeasible_and_trivial_requirements():
    units = _units(4, stages=2)
    importance = {u.name: 1.0 for u in units}
    savings = {u.name: 1.0 for u in units}
    assert choose_units(units, importance, savings, 3.0, min_per_stage=1) is None  # only 2 removable
    assert choose_units(units, importance, savings, 0.0).removed == ()
    assert [u.name for u in most_removable(units, 1)] == ["u2", "u3"]


def _latency_model(baseline: float, savings: dict[str, float], bias: float):
    """A runtime whose real saving is `bias` times the table's, plus a fixed overhead."""
    def measure(removed):
        saved = bias * sum(savings[n] for n in removed)
        return Measured(baseline, max(baseline - saved, 0.05), spread=0.02)
    return measure


@pytest.mark.parametrize("bias", [0.6, 0.8, 1.0, 1.3])
def test_search_meets_target_without_overshooting(bias):
    units = _units(27)
    rng = random.Random(3)
    savings = {u.name: rng.uniform(0.04, 0.07) for u in units}
    importance = {u.name: rng.random() for u in units}
    baseline = 1.6
    target = Target(speedup=1.8)
    measure = _latency_model(baseline, savings, bias)
    floor = most_removable(units, 1)
    floor_saving = sum(savings[u.name] for u in floor)
    result = search_under_target(units, importance, savings, baseline, target, measure, margin=0.02,
                                 calibration=(floor_saving, measure(tuple(u.name for u in floor))))
    assert result.best is not None
    speedup = result.best.measured.speedup
    assert speedup >= 1.8 * 1.02
    assert speedup <= 1.8 * 1.12  # keeps model where the target allows
    assert len(result.trials) <= 8


def test_target_validation():
    from compressor.errors import InputError

    for bad in ({"speedup": 1.0}, {"speedup": -2.0}, {"ms": 0.0}, {"ms": -1.0}, {}, {"ms": 1.0, "speedup": 2.0}):
        with pytest.raises(InputError):
            Target(**bad)


def test_ms_target_is_judged_on_candidate_median_with_margin():
    from compressor.search.target import meets

    target = Target(ms=1.0)
    assert meets(target, Measured(2.0, 0.97, 0.02), margin=0.02)
    assert not meets(target, Measured(2.0, 0.99, 0.02), margin=0.02)
    assert target.goal_ms(5.0) == 1.0
    assert Target(speedup=2.0).goal_ms(5.0) == 2.5


def _with_merges(units):
    return units + [Unit(u.name + "/merge", "merge", u.stage, u.order) for u in units]


def _brute_force_with_merges(units, importance, savings, required, min_per_stage):
    """Every assignment of keep / remove / merge to each block."""
    limits = removable_limits(units, min_per_stage)
    best = None
    for assignment in itertools.product((None, "remove", "merge"), repeat=len(units)):
        removed = [u for u, a in zip(units, assignment, strict=True) if a == "remove"]
        if any(sum(u.stage == s for u in removed) > limits[s] for s in limits):
            continue
        names = [u.name if a == "remove" else u.name + "/merge"
                 for u, a in zip(units, assignment, strict=True) if a]
        if sum(savings[n] for n in names) >= required:
            cost = sum(importance[n] for n in names)
            best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("seed", range(20))
def test_merge_and_remove_are_alternatives_matching_brute_force(seed):
    rng = random.Random(seed)
    blocks = _units(6, stages=2)
    units = _with_merges(blocks)
    importance = {u.name: rng.random() for u in units}
    savings = {u.name: rng.uniform(0.1, 1.0) if u.kind != "merge" else rng.uniform(-0.2, 0.6) for u in units}
    required = rng.uniform(0.5, 3.0)
    choice = choose_units(units, importance, savings, required, min_per_stage=1)
    expected = _brute_force_with_merges(blocks, importance, savings, required, 1)
    if expected is None:
        assert choice is None
        return
    assert choice is not None
    paths = [u.path for u in units if u.name in choice.removed]
    assert len(paths) == len(set(paths)), "a block was both removed and merged"
    removed = [u for u in units if u.name in choice.removed and u.kind != "merge"]
    assert all(sum(u.stage == s for u in removed) <= lim for s, lim in removable_limits(blocks, 1).items())
    assert sum(savings[n] for n in choice.removed) >= required * (1 - 1e-3) - sum(savings.values()) / BINS * 7
    assert choice.importance_lost <= expected + 1e-9 + 1e-6 * len(units)


def test_merges_do_not_count_against_the_blocks_kept_per_stage():
    blocks = [Unit(f"b{i}", "identity", "s", i) for i in range(3)]
    units = _with_merges(blocks)
    importance = {u.name: (0.0 if u.kind == "merge" else 1.0) for u in units}
    savings = {u.name: 1.0 for u in units}
    # three blocks, at least one kept: only two removals allowed, but all three may merge
    choice = choose_units(units, importance, savings, 3.0, min_per_stage=1)
    assert choice is not None and sorted(choice.removed) == ["b0/merge", "b1/merge", "b2/merge"]
    floor = most_removable(units, 1)
    assert len(floor) == 2 and all(u.kind != "merge" for u in floor)


def test_noise_level_table_still_measures_before_giving_up():
    """On a loaded machine single-unit savings can be noise around zero, the floor's even below it: the
    scaled request then exceeds anything the table can remove. The loop asks for no more than that, so
    it measures a set instead of ending with no trial."""
    units = _units(27)
    floor = tuple(u.name for u in most_removable(units, 1))
    savings = {u.name: -0.01 if u.name in floor else 0.02 for u in units}
    importance = {u.name: 1.0 for u in units}
    measure = _latency_model(1.6, dict.fromkeys(savings, 0.05), bias=1.0)
    result = search_under_target(units, importance, savings, 1.6, Target(speedup=1.5), measure,
                                 margin=0.05, calibration=(sum(savings[n] for n in floor), measure(floor)))
    assert result.trials


def test_a_failed_candidate_does_not_end_the_search_before_the_most_removable_sets():
    """After a candidate that saved far less than the table predicted, the scaled request can exceed anything
    the table can remove (an INT8 search on OpenVINO: 10 blocks measured 2.26x where 18 had measured 4.9x).
    The loop then asks for the most the table can remove instead of ending with the target unmet."""
    units = _units(27)
    savings = {u.name: 0.05 for u in units}

    def measure(removed):  # little saved by the first blocks, much by the last few: not what a sum predicts
        return Measured(1.6, 0.3 if len(removed) >= 20 else 1.6 - 0.02 * len(removed), spread=0.02)

    floor = tuple(u.name for u in most_removable(units, 1))
    result = search_under_target(units, {u.name: 1.0 for u in units}, savings, 1.6, Target(speedup=2.0), measure,
                                 margin=0.05, calibration=(sum(savings[n] for n in floor), measure(floor)))
    assert len(result.trials) >= 2 and not result.trials[0].passed
    assert result.best is not None and result.best.measured.speedup >= 2.0 * 1.05


def _exact_bins(rng: random.Random, units: list[Unit]) -> dict[str, float]:
    """Savings that are whole bins of the knapsack (they sum to BINS thousandths of a ms), so that it is
    exact and a brute force can be compared set for set."""
    cuts = sorted(rng.sample(range(1, BINS), len(units) - 1))
    return {u.name: (b - a) / 1000 for u, a, b in zip(units, [0, *cuts], [*cuts, BINS], strict=True)}


def _allowed_sets(units, savings, required, below, min_per_stage=1):
    """Every set the stage floor allows with required <= saving < below, by brute force."""
    limits = removable_limits(units, min_per_stage)
    for r in range(len(units) + 1):
        for subset in itertools.combinations(units, r):
            if any(sum(u.stage == s for u in subset) > limit for s, limit in limits.items()):
                continue
            saving = sum(savings[u.name] for u in subset)
            if required - 1e-9 <= saving < below - 1e-9:
                yield tuple(u.name for u in subset)


@pytest.mark.parametrize("seed", range(12))
def test_the_knapsack_proposes_the_best_set_not_yet_measured(seed):
    """With sets excluded (already measured) and an upper bound on the saving (after an overshoot), the
    knapsack's proposal is the least-importance allowed set that is left, set for set as a brute force."""
    rng = random.Random(seed)
    units = _units(9)
    savings = _exact_bins(rng, units)
    importance = {u.name: rng.random() for u in units}
    required = rng.uniform(0.2, 0.5)
    below = rng.choice([None, *_allowed_sets(units, savings, 0.5, 0.8)])
    below_ms = sum(savings[n] for n in below) if below else float("inf")
    ranked = sorted(_allowed_sets(units, savings, required, below_ms),
                    key=lambda s: sum(importance[n] for n in s))
    excluded = [ranked[i] for i in sorted(rng.sample(range(min(len(ranked), 6)), min(len(ranked), 3)))]
    choice = choose_units(units, importance, savings, required, 1, below, excluded)
    left = [s for s in ranked if s not in excluded]
    assert choice is not None and choice.removed == left[0]
    assert required - 1e-9 <= choice.predicted_saving_ms < below_ms


def test_with_every_allowed_set_measured_nothing_is_proposed():
    units = _units(6)
    savings = _exact_bins(random.Random(0), units)
    importance = {u.name: 1.0 for u in units}  # ties everywhere: the most sets to go through
    allowed = list(_allowed_sets(units, savings, 0.3, float("inf")))
    assert choose_units(units, importance, savings, 0.3, 1, exclude=allowed[1:]).removed == allowed[0]
    assert choose_units(units, importance, savings, 0.3, 1, exclude=allowed) is None


def test_excluding_the_empty_set_proposes_the_least_important_unit():
    units = _units(3, stages=1)
    importance = {"u0": 0.3, "u1": 0.1, "u2": 0.2}
    savings = {u.name: 1.0 for u in units}
    assert choose_units(units, importance, savings, 0.0).removed == ()
    assert choose_units(units, importance, savings, 0.0, exclude=[()]).removed == ("u1",)


def _overshooting(big_real_ms: float, small_saving: float):
    """A model whose `big` unit saves far more when measured than the table says, and six small units that
    save what it says: the knapsack's first set (big alone, least important) overshoots a 1.3x target."""
    units = [Unit("big", "identity", "stage0", 0), *[Unit(f"s{i}", "identity", f"stage{i % 3}", 1 + i)
                                                     for i in range(6)]]
    savings = {"big": 0.3, **{f"s{i}": small_saving for i in range(6)}}
    importance = {"big": 0.1, **{f"s{i}": 1.0 + i / 100 for i in range(6)}}
    measured: list[tuple[str, ...]] = []

    def measure(removed):
        measured.append(removed)
        saved = sum(big_real_ms if n == "big" else savings[n] for n in removed)
        return Measured(1.0, 1.0 - saved, spread=0.0)

    return units, savings, importance, measure, measured


def test_after_an_overshoot_the_search_proposes_a_set_that_removes_less():
    """The convnext_tiny case: its first set measured 1.87x at a 1.3x target; asked for less, the knapsack
    proposed the same set again and the search ended. Now it proposes the best set not yet measured that
    removes less (two small units: they miss), then one between the two, which lands within the band."""
    units, savings, importance, measure, measured = _overshooting(0.5, 0.09)
    result = search_under_target(units, importance, savings, 1.0, Target(speedup=1.3), measure, margin=0.02,
                                 calibration=(0.3, Measured(1.0, 0.7, 0.0)))
    assert measured[0] == ("big",) and result.trials[0].passed and result.trials[0].overshot
    assert len(measured) == len(set(measured)), "a set was measured twice"
    assert all(sum(savings[n] for n in s) < 0.3 for s in measured[1:])
    speedup = result.best.measured.speedup
    aimed = 1 / (1 - required_fraction(Target(speedup=1.3), 1.0, 0.02))
    assert 1.3 * 1.02 <= speedup <= aimed / (1 - OVERSHOOT_BAND)
    assert not result.best.overshot and "within" in result.ended


def test_when_no_untried_set_removes_less_the_search_says_why():
    """Small units saving too little to reach the target between them: no set that removes less than the
    overshooting one is predicted to meet it, and the result says so, naming the measured speedup."""
    units, savings, importance, measure, measured = _overshooting(0.5, 0.01)
    result = search_under_target(units, importance, savings, 1.0, Target(speedup=1.3), measure, margin=0.02,
                                 calibration=(0.3, Measured(1.0, 0.7, 0.0)))
    assert measured == [("big",)]
    assert result.best.choice.removed == ("big",) and result.best.overshot
    assert "no set not yet measured removes less" in result.ended and "2.00x" in result.ended


@pytest.mark.parametrize("bias", [0.6, 0.8, 1.0, 1.3, 2.0])
def test_no_set_is_measured_twice(bias):
    units = _units(27)
    rng = random.Random(5)
    savings = {u.name: rng.uniform(0.04, 0.07) for u in units}
    importance = {u.name: rng.random() for u in units}
    measured: list[tuple[str, ...]] = []
    model = _latency_model(1.6, savings, bias)

    def measure(removed):
        measured.append(removed)
        return model(removed)

    search_under_target(units, importance, savings, 1.6, Target(speedup=1.8), measure, margin=0.02,
                        max_trials=8)
    assert len(measured) == len({frozenset(s) for s in measured})
