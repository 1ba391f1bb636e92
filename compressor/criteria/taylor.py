"""First-order Taylor importance (Molchanov et al. 2019): sum over a unit's branch
parameters of |w * dL/dw|, the loss change its removal would cause to first order,
accumulated per batch with cross-entropy on the calibration labels.

Cost: one forward and one backward pass over the calibration set.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from compressor.criteria.magnitude import unit_parameters
from compressor.criteria.registry import ScoringContext, register
from compressor.metrics.outputs import first_logits


def saliency(ctx: ScoringContext) -> tuple[nn.Module, dict[str, torch.Tensor], int]:
    """(a copy of the model, {parameter name: sum over calibration batches of |w * dL/dw| per entry}, images):
    what a unit's Taylor importance sums over its parameters, kept per entry so a width unit (criteria/width.py)
    can sum it over the entries it deletes."""
    model = copy.deepcopy(ctx.model).eval()  # eval: BatchNorm uses its running statistics
    totals = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    n = 0
    for x, y in ctx.calibration:
        n += len(x)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(first_logits(model(x), why="taylor"), y, reduction="sum").backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.grad is not None:
                    totals[name] += (p * p.grad).abs()
    totals, n = ctx.group.total((totals, n))  # every rank's share of the batches
    return model, totals, n


@register("taylor", cost="1 forward + 1 backward pass")
def taylor_importance(ctx: ScoringContext) -> dict[str, float]:
    model, totals, n = saliency(ctx)
    names = {id(p): name for name, p in model.named_parameters()}
    return {u.name: sum(float(totals[names[id(p)]].sum()) for p in unit_parameters(model, u)) / max(n, 1)
            for u in ctx.units}
