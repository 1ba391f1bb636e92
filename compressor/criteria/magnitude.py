"""Weight magnitude of a unit's residual branch, normalised by parameter count:
`magnitude` = mean |w| (L1 / n), `magnitude_l2` = sqrt(mean w^2) (L2 / sqrt(n)),
over the branch's conv and linear weights. Cost: no forward pass."""

from __future__ import annotations

import math

import torch
from torch import nn

from compressor.criteria.registry import ScoringContext, register
from compressor.graph.units import Unit

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def branch_parameters(block: nn.Module, shortcut: str | None, weights_only: bool = True,
                      members: tuple[str, ...] = ()) -> list[torch.Tensor]:
    """Parameters of `block` outside its shortcut (or, given `members`, of those children and own parameters
    only: a transformer branch's): conv/linear weights, or all of them."""
    skip = f"{shortcut}." if shortcut else None
    found = []
    if members:
        own = dict(block.named_parameters(recurse=False))
        found += [own[m] for m in members if m in own and not weights_only]
    for name, module in block.named_modules():
        if skip and (name + ".").startswith(skip):
            continue
        if members and name.split(".")[0] not in members:
            continue
        if weights_only:
            if isinstance(module, WEIGHTED):
                found.append(module.weight)
        else:
            found += list(module.parameters(recurse=False))
    return found


def _per_unit(ctx: ScoringContext, reduce: callable) -> dict[str, float]:
    scores = {}
    for unit in ctx.units:
        weights = branch_parameters(ctx.model.get_submodule(unit.path), unit.shortcut, members=unit.members)
        count = sum(w.numel() for w in weights)
        scores[unit.name] = reduce(weights, count) if count else 0.0
    return scores


@register("magnitude", cost="no forward pass (weights only)")
def magnitude_l1(ctx: ScoringContext) -> dict[str, float]:
    return _per_unit(ctx, lambda ws, n: sum(w.abs().sum().item() for w in ws) / n)


@register("magnitude_l2", cost="no forward pass (weights only)")
def magnitude_l2(ctx: ScoringContext) -> dict[str, float]:
    return _per_unit(ctx, lambda ws, n: math.sqrt(sum(w.pow(2).sum().item() for w in ws) / n))


def unit_parameters(model: nn.Module, unit: Unit) -> list[torch.Tensor]:
    """All parameters of the unit's residual branch (what removing the unit deletes)."""
    return branch_parameters(model.get_submodule(unit.path), unit.shortcut, weights_only=False, members=unit.members)
