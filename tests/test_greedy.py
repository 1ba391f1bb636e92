"""Greedy set selection: measured set-level KL where single-unit scores add up wrongly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.graph.surgery import remove_units
from compressor.graph.units import Unit
from compressor.search.greedy import GreedyOrder, greedy_proposer, kl_from, least_kl, logits_of
from compressor.search.knapsack import choose_units
from compressor.search.loop import search_under_target
from compressor.search.target import Measured, Target


class AddConstant(nn.Module):
    """A residual block adding a fixed vector to the stream: x + v."""

    def __init__(self, v: list[float]) -> None:
        super().__init__()
        self.register_buffer("v", torch.tensor(v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.v


class Saturating(nn.Module):
    """Blocks a, b, c, then clamp(max=1) and a linear head. a and b each push dimension 0 past the
    clamp, so removing one of them changes nothing and removing both changes the logits; c moves
    dimension 1 a little, wherever it goes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = AddConstant([1.0, 0.0])
        self.b = AddConstant([1.0, 0.0])
        self.c = AddConstant([0.0, 0.1])
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(self.b(self.a(x))).clamp(max=1.0))


UNITS = [Unit(name, "identity", "2", order) for order, name in enumerate("abc")]
SAVINGS = {"a": 1.0, "b": 1.0, "c": 1.0}


@pytest.fixture
def inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, 2, generator=g) * torch.tensor([1.0, 0.5])


def set_kl(model: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> float:
    removed = [u for u in UNITS if u.name in names]
    return kl_from(logits_of(model, x), logits_of(remove_units(model, removed), x))


def set_kl_of(order: GreedyOrder, names: tuple[str, ...]) -> float:
    return kl_from(order.reference, logits_of(remove_units(order.model, [u for u in order.units if u.name in names]),
                                              order.x))


class Drifting(nn.Module):
    """Blocks u0..u5, each moving the stream by its own vector, then a linear head: removals interact in the
    logits, so what a removal costs can rise or fall after others."""

    DELTAS = ((0.0, 0.2), (0.47, 0.06), (0.0, 0.02), (0.1, 0.17), (0.24, 0.08), (0.07, 0.14))

    def __init__(self) -> None:
        super().__init__()
        for i, d in enumerate(self.DELTAS):
            self.add_module(f"u{i}", AddConstant(list(d)))
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.DELTAS)):
            x = getattr(self, f"u{i}")(x)
        return self.head(x)


DRIFTING = [Unit(f"u{i}", "identity", "2", i) for i in range(len(Drifting.DELTAS))]


def test_greedy_sees_what_single_unit_scores_add_up_wrong(inputs):
    model = Saturating().eval()
    single = {u.name: set_kl(model, inputs, (u.name,)) for u in UNITS}
    assert single["a"] == single["b"] == 0.0 < single["c"]  # each of a, b alone is free

    knapsack = choose_units(UNITS, single, SAVINGS, 1.9).removed
    greedy = GreedyOrder(model, UNITS, SAVINGS, inputs).choose(1.9)
    assert knapsack == ("a", "b")
    assert greedy.removed == ("a", "c")
    assert greedy.importance_lost == pytest.approx(set_kl(model, inputs, ("a", "c")))
    assert set_kl(model, inputs, greedy.removed) < set_kl(model, inputs, knapsack) / 10


def test_order_is_lazy_and_proposals_complete_a_prefix(inputs):
    order = GreedyOrder(Saturating().eval(), UNITS, SAVINGS, inputs, min_per_stage=0)
    assert order.choose(0.0).removed == ()
    assert order.choose(0.5).removed == ("a",)  # any single unit reaches 0.5 ms: the least KL
    assert (len(order.steps), order.evaluations) == (0, 3)  # every unit tried once, no step taken
    assert order.choose(3.0).removed == ("a", "b", "c")
    assert order.evaluations == 3 + 2 + 1
    assert [s.unit for s in order.steps] == ["a", "c"]
    assert order.choose(2.0).removed == ("a", "c")  # a completed by c, already evaluated
    assert order.evaluations == 6
    assert order.choose(3.5) is None
    assert [s.saving_ms for s in order.steps] == [1.0, 2.0, 3.0]


def test_completion_fills_the_gap_between_two_prefixes(inputs):
    """Needing more than one step saves but less than two: the prefix is completed by the unit
    that reaches the requirement at the least KL, not by the next step of the order."""
    savings = {"a": 1.0, "b": 1.0, "c": 3.0}
    order = GreedyOrder(Saturating().eval(), UNITS, savings, inputs, min_per_stage=0)
    assert order.choose(1.5).removed == ("c",)  # only c reaches 1.5 ms alone
    assert order.choose(3.5).removed == ("a", "c")  # a is the first step; c completes it
    assert set(order.choose(4.5).removed) == {"a", "b", "c"}


def test_stage_floor_block_exclusivity_useless_units_and_fallback(inputs):
    merge_a = Unit("a/merge", "merge", "2", 0)
    units = [*UNITS, merge_a]
    savings = {**SAVINGS, "a/merge": 0.5, "c": 0.0}
    order = GreedyOrder(Saturating().eval(), units, savings, inputs, min_per_stage=2)
    assert order.choose(1.0).removed == ("a",)  # free, and first in order among the free
    # then b would take the stage below two blocks, a's merge is its own block's alternative and c
    # saves nothing: greedy is stranded, though merging a and removing b saves 1.5 ms
    assert order.choose(1.5) is None
    assert order.evaluations == 3

    def knapsack(required_ms: float, below=None, exclude=()):
        return choose_units(units, {u.name: 5.0 for u in units}, savings, required_ms, 2, below, exclude)

    choose = least_kl(order, [knapsack])
    assert choose(1.0).removed == ("a",)  # the knapsack's (a/merge, b) would also do, at a higher KL
    fallback = choose(1.5)
    assert fallback.removed == ("b", "a/merge")
    assert fallback.importance_lost == pytest.approx(set_kl_of(order, fallback.removed))  # KL, not summed scores
    assert choose(2.5) is None


def test_search_uses_the_greedy_proposals(inputs):
    """search_under_target measures what greedy proposes (the knapsack would take a and b)."""
    model = Saturating().eval()
    order = GreedyOrder(model, UNITS, SAVINGS, inputs)
    single = {u.name: set_kl(model, inputs, (u.name,)) for u in UNITS}
    measured: list[tuple[str, ...]] = []

    def measure(removed: tuple[str, ...]) -> Measured:
        measured.append(removed)
        return Measured(4.0, 4.0 - sum(SAVINGS[n] for n in removed), 0.0)

    result = search_under_target(UNITS, single, SAVINGS, 4.0, Target(speedup=1.9), measure, 0.01,
                                 choose=order.choose)
    assert result.best is not None and result.best.choice.removed == ("a", "c")
    assert ("a", "b") not in measured


def test_proposer_keeps_the_least_kl_of_greedy_and_knapsacks(inputs):
    """The knapsack over single-unit KL takes a and b (each free alone); the greedy order takes a
    and c; the proposal is the one whose whole-set KL is least, and sets are run once each."""
    order = GreedyOrder(Saturating().eval(), UNITS, SAVINGS, inputs)
    chosen = greedy_proposer(order, importance={"a": 1.0, "b": 1.0, "c": 5.0})(1.9)
    assert chosen.removed == ("a", "c")
    assert chosen.importance_lost == pytest.approx(set_kl_of(order, ("a", "c")))
    assert order.kl_of(("a", "b")) > 10 * chosen.importance_lost
    assert order.evaluations == 3 + 2  # singles, then a + b and a + c: the knapsacks' (a, b) was one of them


def test_greedy_proposes_no_set_already_measured_and_respects_the_upper_bound(inputs):
    """The search's rule holds for greedy proposals too: a set already measured is not proposed again, and
    after an overshoot only sets saving less than it are."""
    order = GreedyOrder(Saturating().eval(), UNITS, SAVINGS, inputs, min_per_stage=0)
    assert order.choose(0.5).removed == ("a",)
    assert order.choose(0.5, exclude=[("a",)]).removed == ("b",)  # b alone is as free as a
    assert order.choose(0.5, exclude=[("a",), ("b",)]).removed == ("c",)
    assert order.choose(1.5, below=("a", "b")) is None  # every set reaching 1.5 ms saves 2 ms or more
    assert order.choose(1.5, exclude=[("a", "c")]).removed == ("a", "b")
    choose = greedy_proposer(order, importance={"a": 1.0, "b": 1.0, "c": 5.0})
    first = choose(1.9)
    again = choose(1.9, exclude=[first.removed])
    assert again is not None and set(again.removed) != set(first.removed)
    assert choose(1.9, exclude=[("a", "b"), ("a", "c"), ("b", "c")]).removed == ("a", "b", "c")
    assert choose(1.9, below=("a", "b", "c"), exclude=[("a", "b"), ("a", "c"), ("b", "c")]) is None


def test_lazy_evaluation_takes_the_same_steps_and_proposals_with_fewer_sets(inputs):
    """Trying units in the order of their last KL per ms, and stopping where the next one's last figure cannot
    beat the best tried, takes here the steps that evaluating every unit takes, with 12 passes instead of 21, and
    proposes the same sets. At some step the first unit tried is not the one taken: the stop rule is what finds
    it."""
    model = Drifting().eval()
    savings = {"u0": 0.5, "u1": 1.5, "u2": 1.0, "u3": 0.5, "u4": 1.5, "u5": 2.0}
    lazy = GreedyOrder(model, DRIFTING, savings, inputs, min_per_stage=0)
    full = GreedyOrder(model, DRIFTING, savings, inputs, min_per_stage=0, lazy=False)
    for order in (lazy, full):
        while order.extend():
            pass
    assert [s.unit for s in lazy.steps] == [s.unit for s in full.steps] == ["u2", "u5", "u4", "u3", "u0", "u1"]
    assert (lazy.evaluations, full.evaluations) == (12, 6 + 5 + 4 + 3 + 2 + 1)
    assert any(next(iter(lazy._kls[k])) != s.unit for k, s in enumerate(lazy.steps) if k)
    lazy_again = GreedyOrder(model, DRIFTING, savings, inputs, min_per_stage=0)
    for required in (0.4, 0.9, 1.4, 2.1, 2.9, 3.6, 4.4, 5.5, 6.5):
        want = full.choose(required)
        assert lazy_again.choose(required).removed == want.removed, required
