"""Criteria: known answers on hand-made cases, and prefix caching equals the naive path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.criteria import CRITERIA, ScoringContext, get_criterion, score_units
from compressor.criteria.cka import linear_cka
from compressor.errors import InputError
from compressor.units import find_units
from compressor.zoo import build
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
    assert {"cka", "magnitude", "random"} <= set(CRITERIA)
    with pytest.raises(InputError, match="known: .*cka"):
        get_criterion("nope")
