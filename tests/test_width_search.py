"""Width units in the search: one option per block in the knapsack, the slimmest level in the most-pruned set,
channel counts chosen from timings, refused levels with their reasons, channel and unit criteria for width, and
--moves from the command line and from Python."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from compressor.errors import InputError
from compressor.graph.units import Slim, Unit
from compressor.latency.steps import StepChoice, candidate_counts, choose_count
from compressor.search.knapsack import choose_units, most_removable


def _width(path: str, stage: str, order: int, level: float, kept: int) -> Unit:
    slim = Slim(("conv1",), (32,), (tuple(range(kept)),), level)
    return Unit(f"{path}@{round(level * 100)}%", "width", stage, order, slim=slim)


def _blocks() -> list[Unit]:
    """Two stages of two blocks; each block: remove it, or slim it to 50% or 25%."""
    units = []
    for i, (path, stage) in enumerate([("a.0", "s1"), ("a.1", "s1"), ("b.0", "s2"), ("b.1", "s2")]):
        units += [Unit(path, "identity", stage, 3 * i), _width(path, stage, 3 * i, 0.5, 16),
                  _width(path, stage, 3 * i, 0.25, 8)]
    return units


def test_width_units_share_their_block_path():
    unit = _width("layer2.0", "s", 0, 0.5, 16)
    assert unit.path == "layer2.0" and not unit.removes_block
    assert Unit("blocks.3/mlp@25%", "width", "s", 0).path == "blocks.3"


@pytest.mark.parametrize("required", [0.35, 0.6, 0.9, 1.2, 1.45])
def test_the_knapsack_takes_one_option_per_block_and_is_exact(required):
    units = _blocks()
    savings = {u.name: (0.5 if u.kind == "identity" else 0.2 if "50" in u.name else 0.32) for u in units}
    importance = {u.name: (1.0 if u.kind == "identity" else 0.1 if "50" in u.name else 0.3) for u in units}
    importance["b.1"] = 0.05  # a weak block: removing it is cheaper than slimming it
    choice = choose_units(units, importance, savings, required, min_per_stage=1)
    paths = [n.split("@")[0] for n in choice.removed]
    assert len(paths) == len(set(paths)), f"two options of one block: {choice.removed}"
    # brute force over {keep, remove, 50%, 25%} per block, one block kept per stage
    options = {p: [None] + [u.name for u in units if u.path == p] for p in dict.fromkeys(u.path for u in units)}
    best = None
    for pick in itertools.product(*options.values()):
        chosen = [n for n in pick if n]
        if sum(n in ("a.0", "a.1") for n in chosen) > 1 or sum(n in ("b.0", "b.1") for n in chosen) > 1:
            continue
        if sum(savings[n] for n in chosen) >= required - 1e-9:
            cost = sum(importance[n] for n in chosen)
            best = cost if best is None else min(best, cost)
    assert choice.importance_lost == pytest.approx(best)


def test_the_most_pruned_set_slims_every_block_it_keeps():
    units = _blocks()
    floor = most_removable(units, 1)
    assert sorted(u.name for u in floor) == ["a.0@25%", "a.1", "b.0@25%", "b.1"]
    savings = {u.name: 0.1 for u in units} | {"a.0": 0.2, "a.1": 0.5, "b.0": 0.5, "b.1": 0.2, "a.0@50%": 0.3}
    assert sorted(u.name for u in most_removable(units, 1, savings)) == ["a.0@50%", "a.1", "b.0", "b.1@50%"]
    depth_only = [u for u in units if u.kind != "width"]
    assert [u.name for u in most_removable(depth_only, 1)] == ["a.1", "b.1"]


def test_candidate_counts_are_the_level_and_its_step_neighbours():
    assert candidate_counts(144, 0.5) == [64, 72, 80, 96]
    assert candidate_counts(64, 0.5) == [32]
    assert candidate_counts(16, 0.75) == [8, 12]
    assert candidate_counts(16, 0.25) == [4, 8]
    assert candidate_counts(3, 0.25) == [1]


def test_a_count_a_larger_one_runs_as_fast_as_is_not_chosen():
    # 72 runs slower than 80: 72 is dominated, and 64 and 80 are as near; the larger wins the tie
    assert choose_count({64: 1.0, 72: 1.2, 80: 1.05}, 72) == 80
    assert choose_count({64: 1.0, 72: 1.1, 80: 1.3}, 72) == 72
    assert choose_count({64: 1.0, 72: 1.1, 80: 1.3, 96: 1.5}, 86) == 80
    # within DOMINANCE_RTOL (2%): the larger count runs as fast
    assert choose_count({64: 1.0, 72: 1.015}, 64) == 72
    # no count runs faster than the full width: nothing to choose
    assert choose_count({8: 1.0, 12: 1.2}, 12, full=(16, 0.99)) is None


def test_levels_are_refused_with_their_reasons():
    from compressor.graph.width import WidthGroup, WidthOption
    from compressor.stages.width import level_units

    block = nn.Sequential(nn.Conv2d(4, 16, 1))
    base = Unit("blk", "identity", "s", 0, input_shape=(4, 8, 8))
    option = WidthOption(base, (WidthGroup("0", 16, ("0",)),))
    from compressor.graph.signature import module_cost_key

    key = f"{module_cost_key(block, (4, 8, 8))}|0"
    steps = {key: [StepChoice(0.75, 12, chosen=8), StepChoice(0.5, 8, chosen=8),
                   StepChoice(0.25, 4, chosen=None, note="no count near it runs faster")]}
    model = nn.Module()
    model.blk = block
    units, refused = level_units(model, [option], steps, {"blk": [torch.arange(16.0)]})
    assert [u.name for u in units] == ["blk@75%"]
    assert units[0].slim.keep == (tuple(range(8, 16)),), "the highest-scoring channels are kept"
    assert refused == {"blk@50%": "its measured channel counts (8,) are those of blk@75%",
                       "blk@25%": "0: no count near it runs faster"}


class _Dropped(nn.Module):
    """A block whose plain attribute (a stochastic-depth rate, idle in eval mode) differs per copy."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate
        self.inner = nn.Sequential(nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 8, 1))

    def forward(self, x):
        return x + self.inner(x)


def test_blocks_that_differ_only_in_an_idle_rate_are_timed_once():
    """ConvNeXt's blocks differ only in their stochastic-depth rate: their channel counts are timed once per
    shape, not once per block (18 timings instead of 4 on convnext_tiny)."""
    from compressor.graph.width import find_width_options
    from compressor.stages.width import step_structures

    model = nn.Sequential(_Dropped(0.0), _Dropped(0.1), _Dropped(0.2), nn.Conv2d(8, 16, 1), _Dropped(0.3))
    model[4].inner = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 16, 1))
    units = [Unit(str(i), "identity", "s", i, input_shape=(8 if i < 3 else 16, 6, 6)) for i in (0, 1, 2, 4)]
    options, refused = find_width_options(model, units)
    assert len(options) == 4, refused
    structures = step_structures(model, options)
    assert len(structures) == 2, [s.where for s in structures]
    assert structures[0].where == "0, 1, 2" and structures[1].where == "4"


def test_cli_moves_option_reaches_the_prune_options():
    from compressor.cli.commands import prune_options
    from compressor.cli.parser import build_parser

    base = ["prune", "--model", "resnet20", "--data", "digits32", "--profile", "ort-cpu", "--target-speedup", "1.5",
            "--out", "unused"]
    parser = build_parser()
    assert prune_options(parser.parse_args(base)).moves == "depth"
    options = prune_options(parser.parse_args([*base, "--moves", "depth+width", "--channel-criterion", "taylor"]))
    assert (options.moves, options.channel_criterion) == ("depth+width", "taylor")
    with pytest.raises(InputError, match="invalid choice: 'wide'"):
        parser.parse_args([*base, "--moves", "wide"])


@pytest.mark.parametrize(("options", "message"), [
    ({"moves": "wide"}, "unknown moves 'wide'"),
    ({"moves": "width", "criterion": "sr_init"}, "width moves need a criterion"),
    ({"moves": "depth+width", "criterion": "entropy"}, "width moves need a criterion"),
    ({"moves": "width", "channel_criterion": "l7"}, "unknown channel criterion"),
])
def test_width_options_are_checked_before_anything_runs(options, message):
    from compressor.stages.options import PruneOptions

    with pytest.raises(InputError, match=message):
        PruneOptions.from_kwargs(**options).check()


class TwoLayer(nn.Module):
    """x + conv2(relu(bn(conv1(x)))), with hand-set weights: channels 0-3 are live (BatchNorm scale 2 to 1),
    4-7 dead (no weights in conv1, scale 0, nothing read by conv2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.randn(8, 4, 1, 1, generator=torch.Generator().manual_seed(0)))
            self.conv1.weight[4:] = 0.0
            self.bn.weight.copy_(torch.tensor([2.0, 1.5, 1.2, 1.0, 0.0, 0.0, 0.0, 0.0]))
            self.bn.bias.zero_()
            self.conv2.weight.copy_(torch.randn(4, 8, 1, 1, generator=torch.Generator().manual_seed(1)))
            self.conv2.weight[:, 4:] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TwoLayer()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    from compressor.graph.units import find_units
    from compressor.graph.width import find_width_options

    torch.manual_seed(0)  # the head's weights
    model = Net().eval()
    x = torch.randn(2, 4, 6, 6)
    units = find_units(model, x)
    options, _ = find_width_options(model, units)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 4, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    return model, units, options, batches


@pytest.mark.parametrize("criterion", ["peel", "magnitude", "magnitude_l2", "taylor"])
def test_channel_criteria_keep_the_live_channels(net, criterion):
    from compressor.criteria.channels import ChannelContext, kept_channels, rank_channels

    model, _, options, batches = net
    scores = rank_channels(criterion, ChannelContext(model, options, batches))
    assert kept_channels(scores["block"][0], 4) == (0, 1, 2, 3)
    if criterion == "peel":  # PEEL's measure: the BatchNorm scale, in order
        assert kept_channels(scores["block"][0], 2) == (0, 1)


@pytest.mark.parametrize("criterion", ["cka", "magnitude", "magnitude_l2", "taylor"])
def test_dropping_dead_channels_costs_nothing_and_live_ones_cost_less_than_removal(net, criterion):
    from compressor.criteria import ScoringContext, score_units
    from compressor.criteria.width import score_width_units
    from compressor.graph.width import width_unit

    model, units, options, batches = net
    dead = width_unit(options[0], 0.5, ((0, 1, 2, 3),))
    live = width_unit(options[0], 0.25, ((0, 1, 4, 5),))  # drops two live channels of four
    ctx = ScoringContext(model, [dead, live], batches)
    scores = score_width_units(criterion, ctx)
    removal = score_units(criterion, ScoringContext(model, units, batches))["block"]
    assert scores[dead.name] == pytest.approx(0.0, abs=1e-6)
    assert 0 < scores[live.name] < removal
    if criterion.startswith("magnitude"):  # dropping every live channel deletes every nonzero weight: a removal
        every_live = width_unit(options[0], 0.5, ((4, 5, 6, 7),))
        assert score_width_units(criterion, ScoringContext(model, [every_live], batches))[every_live.name] == \
            pytest.approx(removal)


@pytest.mark.parametrize("min_per_stage", [0, 1])
def test_greedy_deepens_a_slimmed_block_instead_of_stranding_it(net, min_per_stage):
    """A block slimmed by an early step can be slimmed further and then removed in later steps, each option
    replacing the one before (never two options of one block in a set); a stage at its floor stops at the
    slimmest width."""
    from compressor.graph.width import width_unit
    from compressor.search.greedy import GreedyOrder

    model, units, options, batches = net
    half = width_unit(options[0], 0.5, ((0, 1, 2, 3),))  # drops the dead channels only: free
    quarter = width_unit(options[0], 0.25, ((0, 1),))
    block = units[0]
    savings = {half.name: 0.5, quarter.name: 0.9, block.name: 1.0}  # KL 0, 0.33, 0.54 nats
    order = GreedyOrder(model, [block, half, quarter], savings, batches[0][0], min_per_stage=min_per_stage)
    while order.extend():
        pass
    expected = [half.name, quarter.name, block.name][:3 - min_per_stage]
    assert [s.unit for s in order.steps] == expected
    assert [s.saving_ms for s in order.steps] == [0.5, 0.9, 1.0][:3 - min_per_stage]
    assert abs(order.steps[0].kl) < 1e-6 < order.steps[1].kl
    assert order.steps[1].kl == order.kl_of((quarter.name,))  # the set is the deeper option alone
    assert order.evaluations == 3 - min_per_stage  # each deeper option alone, already run at the first step
    assert order.choose(0.6).removed == (quarter.name,)
    assert order.choose(0.95, exclude=[(block.name,)]) is None  # no set holds two options of the block


def test_a_slimming_saves_the_share_its_channel_counts_timed():
    from compressor.stages.width import timed_share

    one = StepChoice(0.5, 72, {64: 0.6, 72: 0.7, 80: 0.75}, full_ms=1.0, chosen=72)
    other = StepChoice(0.5, 8, {8: 0.9}, full_ms=1.0, chosen=8)
    assert timed_share([one]) == pytest.approx(0.3)
    assert timed_share([one, other]) == pytest.approx(0.4)  # each group slimmed alone: the shares add
    assert timed_share([one, StepChoice(0.5, 8, chosen=8)]) is None  # a count not timed (a replayed table)
