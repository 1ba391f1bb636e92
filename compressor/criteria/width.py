"""Importance of width units on the scale the criterion gives removals, so the search can weigh
"slim this block" against "remove it" (or remove another) under one target.

- cka: 1 - linear CKA of the penultimate features with the block slimmed (the prefix
  cache runs only the suffix after it, as for a removal);
- magnitude, magnitude_l2: a removal scores the mean |w| (root-mean-square w) over its
  branch's conv and linear weights; a width unit the same sum taken over the entries it
  deletes only, divided by the same count, so removing the branch is the level 0%;
- taylor: a removal sums |w * dL/dw| over its branch's parameters; a width unit over the
  entries it deletes;
- random: a seeded draw.
SR-init and entropy score a block re-initialised or its activations' entropy, which has
no slimmed counterpart on their scale: width moves refuse them (check_criterion).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from compressor.criteria.registry import ScoringContext
from compressor.errors import InputError
from compressor.graph.slim import slim_in_place
from compressor.graph.units import Unit

WidthScorer = Callable[[ScoringContext], dict[str, float]]
WIDTH_SCORERS: dict[str, WidthScorer] = {}


def _scorer(name: str) -> Callable[[WidthScorer], WidthScorer]:
    def add(fn: WidthScorer) -> WidthScorer:
        WIDTH_SCORERS[name] = fn
        return fn

    return add


def check_criterion(name: str) -> None:
    """InputError unless width units can be scored by criterion `name` on its removals' scale."""
    if name not in WIDTH_SCORERS:
        msg = (f"width moves need a criterion that scores a slimmed block on the scale of a removal "
               f"({', '.join(sorted(WIDTH_SCORERS))}); got {name!r}")
        raise InputError(msg)


def score_width_units(criterion: str, ctx: ScoringContext) -> dict[str, float]:
    """{width unit name: importance} for the width units in `ctx.units` (higher = keep the block as it is)."""
    check_criterion(criterion)
    ctx.model.eval()
    return WIDTH_SCORERS[criterion](ctx)


@_scorer("cka")
def _cka(ctx: ScoringContext) -> dict[str, float]:
    from compressor.criteria.cka import cka_importance

    return cka_importance(ctx)  # the prefix cache replaces each block by its slimmed copy (surgery.replacement_for)


@_scorer("random")
def _random(ctx: ScoringContext) -> dict[str, float]:
    g = torch.Generator().manual_seed(ctx.seed + 2)
    return {u.name: float(torch.rand(1, generator=g, dtype=torch.float64)) for u in ctx.units}


def _branch_layers(block: nn.Module, unit: Unit, dense_only: bool) -> list[str]:
    from compressor.criteria.magnitude import WEIGHTED

    names = []
    skip = f"{unit.shortcut}." if unit.shortcut else None
    for name, module in block.named_modules():
        if unit.members and name.split(".")[0] not in unit.members:
            continue
        if skip and (name + ".").startswith(skip):
            continue
        if dense_only and not isinstance(module, WEIGHTED):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            names.append(name)
    return names


@torch.no_grad()
def deleted_sum(block: nn.Module, unit: Unit, values: dict[str, torch.Tensor], dense_only: bool) -> tuple[float, int]:
    """(sum of `values` (per parameter of `block`, by name, same shapes) over the entries the width unit
    deletes, count of the branch's entries). Each parameter of a copy of the block holds its entries' own
    indices, so what survives the slimming names what it kept; the sum is taken over the rest in float64."""
    layers = set(_branch_layers(block, unit, dense_only))
    work = copy.deepcopy(block)
    selected = {n: p for n, p in work.named_parameters() if n.rpartition(".")[0] in layers
                and (not dense_only or n.endswith("weight"))}
    for p in selected.values():
        p.copy_(torch.arange(p.numel(), dtype=torch.float32).view(p.shape))  # exact below 2**24 entries
    slim_in_place(work, unit.input_shape, unit.slim)
    after = dict(work.named_parameters())
    deleted = 0.0
    for name, p in selected.items():
        gone = torch.ones(p.numel(), dtype=torch.bool)
        gone[after[name].detach().flatten().long()] = False
        deleted += float(values[name].detach().double().flatten()[gone].sum())
    return deleted, sum(p.numel() for p in selected.values())


def _magnitude(ctx: ScoringContext, power: int) -> dict[str, float]:
    scores = {}
    for unit in ctx.units:
        block = ctx.model.get_submodule(unit.path)
        values = {n: p.detach().abs().pow(power) for n, p in block.named_parameters()}
        deleted, count = deleted_sum(block, unit, values, dense_only=True)
        scores[unit.name] = (deleted / count) ** (1 / power) if count else 0.0
    return scores


@_scorer("magnitude")
def _magnitude_l1(ctx: ScoringContext) -> dict[str, float]:
    return _magnitude(ctx, 1)


@_scorer("magnitude_l2")
def _magnitude_l2(ctx: ScoringContext) -> dict[str, float]:
    return _magnitude(ctx, 2)


@_scorer("taylor")
def _taylor(ctx: ScoringContext) -> dict[str, float]:
    from compressor.criteria.taylor import saliency

    model, totals, n = saliency(ctx)
    scores = {}
    for unit in ctx.units:
        block = model.get_submodule(unit.path)
        prefix = f"{unit.path}."
        values = {name[len(prefix):]: t for name, t in totals.items() if name.startswith(prefix)}
        deleted, _ = deleted_sum(block, unit, values, dense_only=False)
        scores[unit.name] = deleted / max(n, 1)
    return scores
