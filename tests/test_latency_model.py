"""The latency model: known answers on synthetic measurements (exact recovery, calibrated uncertainties,
interactions only where they are in the data), the design's sets, and the table's versions."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from compressor.graph.units import MERGE_SUFFIX, Unit
from compressor.latency.design import (
    informative_sets,
    initial_design,
    query_sd,
    random_set,
    unit_infos,
)
from compressor.latency.model import (
    TAU_FLOOR,
    LatencyModel,
    SetMeasurement,
    UnitInfo,
    measurements_of,
    ratio_se,
)
from compressor.latency.table import LatencyTable
from compressor.search.knapsack import Choice, removable_limits
from compressor.search.uncertain import aiming_past_uncertainty

# a resnet-like layout: stage 1 of 6 identical blocks, stages 2 and 3 each a projection then 5 identical blocks
LAYOUT = [("s1", "identity", 6), ("s2", "projection", 1), ("s2", "identity", 5), ("s3", "projection", 1),
          ("s3", "identity", 5)]
TRUTH = {"s1/identity": 0.030, "s2/projection": 0.045, "s2/identity": 0.025, "s3/projection": 0.040,
         "s3/identity": 0.020}  # fraction of the baseline each unit saves


def _layout() -> tuple[list[Unit], list[UnitInfo]]:
    units, order = [], 0
    for stage, kind, n in LAYOUT:
        for _ in range(n):
            shortcut = "proj" if kind == "projection" else None
            units.append(Unit(f"{stage}.{order}", kind, stage, order, shortcut=shortcut))
            order += 1
    return units, unit_infos(units, {u.name: f"{u.stage}/{u.kind}" for u in units})


def _saved(infos: list[UnitInfo], removed, adjacent_bonus: float = 0.0) -> float:
    names = set(removed)
    y = sum(TRUTH[i.group] for i in infos if i.name in names)
    ordered = sorted(infos, key=lambda i: i.order)
    pairs = sum(a.name in names and b.name in names and a.stage == b.stage == "s1" and a.kind == b.kind
                for a, b in zip(ordered, ordered[1:], strict=False))
    return y + adjacent_bonus * pairs


def _measure(infos, sets, rng: np.random.Generator, noise: float, se: float, bonus: float = 0.0):
    return [SetMeasurement(tuple(s), _saved(infos, s, bonus) + rng.normal(0, noise), se, i // 6, 2.0 * (1 - 0.5), 2.0)
            for i, s in enumerate(sets)]


def _design(units, infos, n_random: int = 14, seed: int = 0):
    return initial_design(units, infos, random.Random(seed), 1, n_random)


def test_noise_free_measurements_give_the_exact_savings():
    units, infos = _layout()
    model = LatencyModel.fit(infos, _measure(infos, _design(units, infos), np.random.default_rng(0), 0.0, 1e-4))
    assert {t.name: c for t, c in zip(model.terms, model.coef, strict=True)} == pytest.approx(TRUTH, abs=1e-9)
    assert [t.kind for t in model.terms] == ["group"] * 5  # no interaction where the data has none
    any_set = [u.name for u in units[::3]]
    assert model.predict_ms(any_set) == pytest.approx(model.baseline_ms * (1 - _saved(infos, any_set)), rel=1e-9)
    assert model.unit_savings_ms()["s1.0"] == pytest.approx(TRUTH["s1/identity"] * model.baseline_ms)


def test_standard_errors_are_calibrated():
    """Over many simulated tables, (fitted - true) / sd of a set's prediction is a standard normal: the
    reported uncertainty is as large as the error, no more, no less. Here each measurement's own se
    understates its noise 3x (drift between sessions), which the fit must find (tau)."""
    units, infos = _layout()
    rng = np.random.default_rng(1)
    query = [u.name for u in units if u.order % 2 == 0]
    z, taus = [], []
    for trial in range(300):
        sets = _design(units, infos, seed=trial)
        model = LatencyModel.fit(infos, _measure(infos, sets, rng, 0.006, 0.002), interactions=False)
        z.append((model.saved_fraction(query) - _saved(infos, query)) / model.sd_fraction(query))
        taus.append(model.tau)
    assert np.median(taus) == pytest.approx(np.sqrt(0.006 ** 2 - 0.002 ** 2), rel=0.2)
    assert 0.8 < np.std(z) < 1.25 and abs(np.mean(z)) < 0.2
    assert 0.9 < np.mean(np.abs(z) < 1.96) / 0.95 < 1.05


def test_an_interaction_in_the_data_is_found_and_only_then():
    units, infos = _layout()
    sets = _design(units, infos, n_random=24)
    rng = np.random.default_rng(2)
    plain = LatencyModel.fit(infos, _measure(infos, sets, rng, 0.002, 0.002))
    assert [t.kind for t in plain.terms] == ["group"] * 5
    fused = LatencyModel.fit(infos, _measure(infos, sets, rng, 0.002, 0.002, bonus=0.01))
    extra = [(t.name, c) for t, c in zip(fused.terms, fused.coef, strict=True) if t.kind != "group"]
    assert [name for name, _ in extra] == ["adjacent:s1"] and extra[0][1] == pytest.approx(0.01, abs=0.003)
    pair = ["s1.0", "s1.1"]
    assert fused.saved_fraction(pair) == pytest.approx(2 * TRUTH["s1/identity"] + 0.01, abs=0.004)
    # the same model as an additive replay reads it: unit savings, and sets of units saving more together
    savings, interactions = fused.unit_savings_ms(), fused.interactions_ms()
    assert len(interactions) == 5  # adjacency in stage s1: one term per neighbouring pair of its 6 blocks
    for s in [pair, ["s1.0", "s1.2", "s1.3", "s2.7"], [u.name for u in units]]:
        replayed = fused.baseline_ms - sum(savings[n] for n in s) - sum(
            i["saving_ms"] for i in interactions if set(i["units"]) <= set(s))
        assert replayed == pytest.approx(fused.predict_ms(s), rel=1e-12)


def test_a_group_never_measured_has_an_infinite_uncertainty():
    units, infos = _layout()
    sets = [s for s in _design(units, infos) if "s2.6" not in s]  # s2.6: the projection of stage 2
    model = LatencyModel.fit(infos, _measure(infos, sets, np.random.default_rng(3), 0.0, 1e-3))
    assert model.sd_fraction(["s2.6"]) == float("inf") and np.isfinite(model.sd_fraction(["s1.0", "s3.13"]))


def test_ratio_se_of_known_rounds():
    base = [2.0] * 9
    rounds = [1.0, 1.01, 0.99, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97]
    # ratios 0.5 + 0, +-.005 (4), +-.01 (2), +-.015 (2): MAD 0.005; se = 1.2533 * 1.4826 * MAD / sqrt(9)
    assert ratio_se(rounds, base, 0.5, (0.0, 0.0)) == pytest.approx(1.2533 * 1.4826 * 0.005 / 3)
    session = {"id": 4, "sets": [[], ["a"]], "round_medians": [base, rounds],
               "stats": [{"median": 2.0, "iqr": 0.1}, {"median": 1.0, "iqr": 0.02, "noisy": True}]}
    (m,) = measurements_of(session)
    assert (m.removed, m.saved, m.session, m.noisy, m.baseline_ms) == (("a",), 0.5, 4, True, 2.0)
    burst = {**session, "round_medians": [[2.0, 2.0, 8.0, 2.0], [1.0, 1.0, 4.0, 1.0]],  # a burst of load in round 3
             "stats": [{"median": 2.0, "iqr": 0.1}, {"median": 4.0, "iqr": 0.1}]}  # and medians read unluckily
    assert measurements_of(burst)[0].saved == pytest.approx(0.5)  # the per-round pairs still say half


def _with_merges(units: list[Unit]) -> list[Unit]:
    return units + [Unit(u.name + MERGE_SUFFIX, "merge", u.stage, 100 + u.order) for u in units if u.stage != "s1"]


@pytest.mark.parametrize("seed", range(20))
def test_random_sets_keep_the_stage_floor_and_one_unit_per_block(seed):
    units = _with_merges(_layout()[0])
    limits = removable_limits(units, 1)
    s = random_set(units, limits, random.Random(seed), 0.9)
    by_name = {u.name: u for u in units}
    blocks = [by_name[n].path for n in s]
    assert len(blocks) == len(set(blocks))  # a block is removed or merged, not both
    for stage, limit in limits.items():
        assert sum(by_name[n].stage == stage and by_name[n].kind != "merge" for n in s) <= limit
    assert list(s) == sorted(s, key=lambda n: by_name[n].order)


def test_initial_design_times_each_group_of_one_alone_and_the_most_removable_set():
    units, infos = _layout()
    sets = _design(units, infos, n_random=8)
    assert ("s2.6",) in sets and ("s3.12",) in sets  # the projections, groups of one
    assert tuple(u.name for u in units if u.order not in (0, 6, 12)) in sets  # the first block of each stage kept
    assert len(sets) == len(set(sets)) == 2 + 1 + 8
    sizes = sorted(len(s) for s in sets[3:])
    assert sizes[0] < sizes[-1] / 2  # balanced sets of small to large sizes


def test_informative_sets_pick_what_the_queries_need():
    """The query is a set of stage-3 blocks; a model fitted without any stage-3 measurement is least sure
    of it, so the candidate holding stage-3 blocks is picked before one that only repeats stage 1."""
    units, infos = _layout()
    rng = np.random.default_rng(4)
    sets = [s for s in _design(units, infos, n_random=20) if not any(n.startswith("s3.") for n in s)]
    sets.append(("s3.12",))
    model = LatencyModel.fit(infos, _measure(infos, sets, rng, 0.003, 0.003))
    query = [("s3.13", "s3.14", "s3.15")]
    stage1, stage3 = ("s1.0", "s1.1", "s1.2"), ("s3.13", "s3.14")
    assert informative_sets(model, [stage1, stage3], query, 1, 0.003) == [stage3]
    before = query_sd(model, query)
    measured = LatencyModel.fit(infos, _measure(infos, [*sets, stage3, ("s3.15", "s3.16")], rng, 0.003, 0.003))
    assert query_sd(measured, query) < before / 2


def test_version_2_round_trip_and_version_1_still_loads(tmp_path):
    units, infos = _layout()
    sets = _design(units, infos)
    model = LatencyModel.fit(infos, _measure(infos, sets, np.random.default_rng(5), 0.004, 0.004))
    table = LatencyTable.from_model("m", [1, 3, 32, 32], {"name": "p"}, {"cpu": "x"}, model, {"sessions": []})
    table.save(tmp_path / "t.json")
    again = LatencyTable.load(tmp_path / "t.json")
    some = ["s1.0", "s2.6", "s3.13"]
    assert again.version == 2 and again.predict_ms(some) == pytest.approx(table.predict_ms(some), rel=1e-12)
    assert again.sd_ms(some) == pytest.approx(table.sd_ms(some), rel=1e-9) and table.sd_ms(some) > 0
    assert again.savings_ms == pytest.approx(table.savings_ms)
    v1 = {"model": "m", "input_shape": [1, 3, 32, 32], "profile": {}, "machine": {}, "baseline_ms": 2.0,
          "savings_ms": {"a": 0.1, "b": 0.3}, "stats": {}}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    old = LatencyTable.load(tmp_path / "v1.json")
    assert old.version == 1 and old.predict(["a", "b"]) == pytest.approx(1.6) and old.sd_ms(["a"]) == 0.0


def test_a_design_without_a_fit_is_fitted_on_load(tmp_path):
    """What measure.py writes on a device: the sessions and the units' groups; compressor fits the model."""
    units, infos = _layout()
    sets = _design(units, infos)
    rng = np.random.default_rng(6)
    rounds = 12
    base = list(2.0 + rng.normal(0, 0.002, rounds))
    session = {"id": 0, "device": "board", "sets": [[], *map(list, sets)],
               "stats": [{"median": 2.0, "iqr": 0.02}, *({"median": 2.0 * (1 - _saved(infos, s)), "iqr": 0.02}
                                                        for s in sets)],
               "round_medians": [base, *([b * (1 - _saved(infos, s)) for b in base] for s in sets)]}
    data = {"version": 2, "model": "m", "input_shape": [1, 3, 32, 32], "profile": {}, "machine": {},
            "baseline_ms": 2.0, "savings_ms": {}, "latency_model": None,
            "units": [vars(i) for i in infos], "design": {"min_per_stage": 1, "sessions": [session]}}
    (tmp_path / "results.json").write_text(json.dumps(data))
    table = LatencyTable.load(tmp_path / "results.json")
    assert table.savings_ms["s2.6"] == pytest.approx(2.0 * TRUTH["s2/projection"], rel=1e-6)
    assert table.design["fitted_on"] == "load" and set(table.savings_ms) == {u.name for u in units}


def test_aiming_past_uncertainty_asks_for_the_shortfall():
    savings = {"a": 1.0, "b": 1.0, "c": 1.0}
    sd = {("a",): 0.5, ("a", "b"): 0.3, ("a", "b", "c"): 0.2}
    asked, bounds = [], []

    def choose(required: float, below=None, exclude=()) -> Choice | None:  # the fewest units reaching `required`
        asked.append(required)
        bounds.append((below, tuple(exclude)))
        k = int(np.ceil(required - 1e-9))
        return None if k > 3 else Choice(tuple("abc"[:k]), 0.0, float(k))

    propose = aiming_past_uncertainty(choose, lambda s: sum(savings[n] for n in s), lambda s: sd[s], z=1.0)
    assert propose(0.9).removed == ("a", "b")  # a alone saves 1.0 < 0.9 + 0.5; a, b saves 2.0 >= 0.9 + 0.3
    assert asked == pytest.approx([0.9, 1.3])  # asked again for the shortfall: 0.9 + 0.5 - 1.0 more
    assert propose(2.9).removed == ("a", "b", "c")  # 3.0 < 2.9 + 0.2, and nothing saves more: the last reached
    assert TAU_FLOOR > 0
    bounds.clear()
    propose(0.9, below=("a", "b", "c"), exclude=[("a",)])  # the search's bounds reach every ask
    assert bounds and all(b == (("a", "b", "c"), (("a",),)) for b in bounds)


def test_branches_of_one_block_are_never_one_group():
    """Where a signature describes a whole block, its branch units still fall into groups of their own kind."""
    units = [Unit(f"blocks.{b}/{part}", "identity", "s", 2 * b + i) for b in range(2)
             for i, part in enumerate(("attn", "mlp"))]
    infos = unit_infos(units, dict.fromkeys((u.name for u in units), "same"))
    groups = {i.name: i.group for i in infos}
    assert groups["blocks.0/attn"] == groups["blocks.1/attn"] != groups["blocks.0/mlp"] == groups["blocks.1/mlp"]


def _slimmed(share: float | None) -> tuple[list[UnitInfo], list[UnitInfo]]:
    """Two blocks of one structure and a 50% width level of each, its channel counts timed at `share`."""
    from compressor.graph.units import Slim

    slim = Slim(("conv1",), (16,), (tuple(range(8)),), 0.5, share)
    units = [Unit("b.0", "identity", "s", 0), Unit("b.1", "identity", "s", 1),
             Unit("b.0@50%", "width", "s", 0, slim=slim), Unit("b.1@50%", "width", "s", 1, slim=slim)]
    infos = unit_infos(units, {u.name: "w" if "@" in u.name else "r" for u in units})
    return units, infos


def test_a_width_group_measured_by_few_sets_is_drawn_to_its_timed_share():
    """Width units' savings are small differences of noisy medians; the channel counts' own timing says what
    share of the block's removal a slimming saves. The fit takes it as a prior: a width group never measured
    gets that share of the removal's saving with a finite sd, one measured precisely keeps what it measured,
    and without a timed share nothing changes."""
    _, infos = _slimmed(0.6)
    assert {i.name: (i.share_of, i.timed_share) for i in infos if "@" in i.name} == {
        "b.0@50%": ("b.0", 0.6), "b.1@50%": ("b.1", 0.6)}
    removals = [SetMeasurement(s, 0.05 * len(s), 0.001, 0, 1.9, 2.0) for s in [("b.0",), ("b.1",), ("b.0", "b.1")]]
    unmeasured = LatencyModel.fit(infos, removals, 2.0, interactions=False)
    savings, sd = unmeasured.unit_savings_ms(), unmeasured.unit_sd_ms()
    assert savings["b.0@50%"] == pytest.approx(0.6 * savings["b.0"], rel=1e-6)
    assert sd["b.0@50%"] == pytest.approx(0.3 * savings["b.0@50%"], rel=0.05)  # the prior's own spread

    precise = [*removals, *(SetMeasurement((n,), 0.01, 0.0005, 1, 1.98, 2.0) for n in ("b.0@50%", "b.1@50%"))]
    measured = LatencyModel.fit(infos, precise, 2.0, interactions=False).unit_savings_ms()
    # 0.02 ms measured, not the prior's 0.06: the measurement's sd (0.002, the floor between sessions) weighs 20
    # times the prior's (0.3 x 0.6 x 0.05 = 0.009), which moves it 5% of the way
    assert measured["b.0@50%"] == pytest.approx(0.01 * 2.0, rel=0.1)

    _, untimed = _slimmed(None)
    assert all(i.share_of == "" and i.timed_share is None for i in untimed)
    assert np.isinf(LatencyModel.fit(untimed, removals, 2.0, interactions=False).unit_sd_ms()["b.0@50%"])
