"""CKA similarity (Pons et al. 2024): importance = 1 - linear CKA between the penultimate
features of the model and of the model with the unit removed.

Cost: one forward pass over the calibration set, then per unit only the
network suffix after that unit (about half of |units| + 1 full passes).
"""

from __future__ import annotations

import torch

from compressor.criteria.registry import ScoringContext, register
from compressor.graph.prefix import SuffixRunner
from compressor.metrics.similarity import linear_cka


@register("cka", cost="1 forward pass + U suffix passes (about U/2 full passes); naive: U + 1")
def cka_importance(ctx: ScoringContext) -> dict[str, float]:
    runner = SuffixRunner(ctx.model, ctx.units, ctx.example)
    base: list[torch.Tensor] = []
    removed: dict[str, list[torch.Tensor]] = {u.name: [] for u in ctx.units}
    with torch.no_grad():
        for x, *_ in ctx.calibration:
            if ctx.use_cache:
                features, _, inputs = runner.capture(x)
            else:
                features, inputs = runner.full(x)[0], {}
            base.append(features.flatten(1))
            for unit in ctx.units:
                out = (runner.removed(unit, inputs[unit.name], x) if ctx.use_cache
                       else runner.naive(unit, x))
                removed[unit.name].append(out[0].flatten(1))
    reference = ctx.group.cat(base)
    return {name: 1.0 - linear_cka(reference, ctx.group.cat(f)) for name, f in removed.items()}
