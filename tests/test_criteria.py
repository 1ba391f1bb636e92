"""Criteria: known answers on hand-made cases, and prefix caching equals the naive path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.criteria import CRITERIA, ScoringContext, get_criterion, score_units
from compressor.errors import InputError
from compressor.graph.units import find_units
from compressor.metrics.similarity import linear_cka
from compressor.models.zoo import build
from tests.helpers import randomise_batchnorm, zero_branch

X = torch.randn(1, 3, 32, 32)


def _context(model, digits, n=96, cache=True):
    units = find_units(model, X)
    return ScoringContext(model, units, digits.loader("train", batch_size=48, limit=n), use_cache=cache)


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(a, a) == pytest.approx(1.0)
    assert linear_cka(a, 3.0 * a @ q + 5.0) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, shift
    assert linear_cka(a, torch.randn(200, 16, generator=g)) < 0.2


def test_cka_cached_equals_naive(digits):
    model = randomise_batchnorm(build("resnet20", 10))
    cached = score_units("cka", _context(model, digits, cache=True))
    naive = score_units("cka", _context(model, digits, cache=False))
    assert cached.keys() == naive.keys()
    for name in cached:
        assert cached[name] == pytest.approx(naive[name], abs=1e-9)


@pytest.mark.parametrize("criterion", ["cka", "magnitude"])
def test_zeroed_block_is_least_important(digits, criterion):
    model = randomise_batchnorm(build("resnet20", 10))
    zero_branch(model, "layer2.2")
    if criterion == "magnitude":  # magnitude sees weights: zero the branch's convs too
        for m in model.get_submodule("layer2.2").modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.zero_()
    scores = score_units(criterion, _context(model, digits))
    assert min(scores, key=scores.get) == "layer2.2"
    assert scores["layer2.2"] == pytest.approx(0.0, abs=1e-9)


def test_random_is_seeded(digits):
    model = build("resnet20", 10)
    ctx = _context(model, digits)
    assert score_units("random", ctx) == score_units("random", ctx)
    ctx.seed = 1
    assert score_units("random", ctx) != score_units("random", _context(model, digits))


def test_registry():
    from compressor.criteria import COSTS

    assert {"cka", "sr_init", "entropy", "taylor", "magnitude", "magnitude_l2", "random"} <= set(CRITERIA)
    assert set(COSTS) == set(CRITERIA) and all(COSTS.values())
    with pytest.raises(InputError, match="known: .*cka"):
        get_criterion("nope")


# ---------------------------------------------------------------- known answers on the trained resnet56


def _self_labelled_context(model, digits, n=64):
    """Calibration images labelled by the model itself: base top-1 is 100% by construction."""
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.stack([digits.train[i][0] for i in range(n)])
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    return ScoringContext(model, find_units(model, x[:1]), DataLoader(TensorDataset(x, y), batch_size=64),
                          repeats=2)


def _rank(scores, name):
    """0 = most important."""
    return sorted(scores, key=scores.get, reverse=True).index(name)


@pytest.fixture
def trained_resnet56(digits):
    from compressor.models.sources import load_model

    return load_model("resnet56", digits).model


@pytest.mark.parametrize("criterion", ["cka", "magnitude", "sr_init"])
def test_dominant_branch_ranks_high(trained_resnet56, digits, criterion):
    with torch.no_grad():
        trained_resnet56.get_submodule("layer2.4").conv2.weight.mul_(10)  # branch output x10
    scores = score_units(criterion, _self_labelled_context(trained_resnet56, digits))
    assert _rank(scores, "layer2.4") <= 2


def test_sr_init_calls_a_free_to_remove_block_important(trained_resnet56, digits):
    """Zero the branch: removal then changes nothing (CKA importance 0), yet re-initialising
    the block turns the branch back on with random weights, so SR-init reports a large drop
    and ranks the free block above blocks whose removal does change the model."""
    zero_branch(trained_resnet56, "layer2.4")
    ctx = _self_labelled_context(trained_resnet56, digits)
    cka = score_units("cka", ctx)
    sr = score_units("sr_init", ctx)
    assert cka["layer2.4"] == pytest.approx(0.0, abs=1e-9)
    assert min(cka, key=cka.get) == "layer2.4"
    assert sr["layer2.4"] > 10.0  # percentage points lost for a block that costs nothing to remove
    outranked = [u for u in sr if u != "layer2.4" and sr[u] < sr["layer2.4"] and cka[u] > 0.01]
    assert outranked, "SR-init should rank the free block above some block that matters"


def test_sr_init_cached_equals_naive(digits):
    model = randomise_batchnorm(build("resnet20", 10))
    ctx = _context(model, digits, n=48)
    ctx.repeats = 2
    cached = score_units("sr_init", ctx)
    ctx.use_cache = False
    assert score_units("sr_init", ctx) == pytest.approx(cached, abs=1e-9)


def test_taylor_of_zeroed_branch_is_zero(digits):
    model = randomise_batchnorm(build("resnet20", 10))
    zero_branch(model, "layer1.1")
    for m in model.get_submodule("layer1.1").modules():  # no gradient path left through the branch
        if isinstance(m, nn.Conv2d):
            m.weight.data.zero_()
    scores = score_units("taylor", _context(model, digits, n=48))
    assert scores["layer1.1"] == pytest.approx(0.0, abs=1e-12)
    assert all(v > 0 for k, v in scores.items() if k != "layer1.1")


# ---------------------------------------------------------------- entropy


def test_binary_entropy_values():
    from compressor.criteria.entropy import binary_entropy

    h = binary_entropy(torch.tensor([0.0, 1.0, 0.5, 0.25]))
    assert h.tolist() == pytest.approx([0.0, 0.0, 1.0, 0.8112781244591328])


class TwoRectifiers(nn.Module):
    """relu_on sees an always-positive input, relu_half a half-positive one."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.shift.weight.fill_(1.0)
            self.shift.bias.fill_(10.0)
        self.relu_on = nn.ReLU()
        self.relu_half = nn.ReLU()
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        a = self.relu_on(self.shift(x))
        b = self.relu_half(x)
        return self.head(torch.cat([a, b], 1).mean((2, 3)))


def test_entropy_always_positive_is_zero_and_half_positive_is_one_bit():
    from torch.utils.data import DataLoader, TensorDataset

    from compressor.criteria.entropy import activation_entropies

    base = torch.rand(4, 1, 6, 6) + 0.1  # |x| in [0.1, 1.1]: never zero
    x = torch.cat([base, -base])  # exactly half of the values positive
    layers = activation_entropies(TwoRectifiers(), DataLoader(TensorDataset(x, torch.zeros(8)), batch_size=3))
    assert layers["relu_on"]["entropy"] == 0.0
    assert layers["relu_half"]["entropy"] == pytest.approx(1.0)
