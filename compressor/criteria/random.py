"""Random importance with a seed (ScoringContext.seed): the baseline every criterion must beat.
Cost: none."""

from __future__ import annotations

import torch

from compressor.criteria.registry import ScoringContext, register


@register("random", cost="none")
def random_importance(ctx: ScoringContext) -> dict[str, float]:
    g = torch.Generator().manual_seed(ctx.seed)
    values = torch.rand(len(ctx.units), generator=g, dtype=torch.float64)
    return {u.name: float(v) for u, v in zip(ctx.units, values, strict=True)}
