"""CKA similarity (Pons et al. 2024): importance = 1 - linear CKA between the penultimate
features of the model and of the model with the unit removed.

A model without a classifier layer (a detector's conv heads) has no penultimate features: its
importance is the mean over its outputs of 1 - CKA of each output, so that every head counts (in
one concatenation the largest map's Gram matrix drowns the others: a unit feeding only the
stride-16 head of a two-head detector scored 5e-12 there, against 1.5e-4 on its own head).

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
    base: list[list[torch.Tensor]] = []
    removed: dict[str, list[list[torch.Tensor]]] = {u.name: [] for u in ctx.units}

    def compared(features: torch.Tensor, outputs: object) -> list[torch.Tensor]:
        if runner.has_classifier:
            return [features.flatten(1)]
        return [o.flatten(1) for o in torch.utils._pytree.tree_leaves(outputs)]

    with torch.no_grad():
        for x, *_ in ctx.calibration:
            if ctx.use_cache:
                features, outputs, inputs = runner.capture(x)
            else:
                (features, outputs), inputs = runner.full(x), {}
            base.append(compared(features, outputs))
            for unit in ctx.units:
                out = (runner.removed(unit, inputs[unit.name], x) if ctx.use_cache
                       else runner.naive(unit, x))
                removed[unit.name].append(compared(*out))
    references = [ctx.group.cat([b[i] for b in base]) for i in range(len(base[0]))]
    return {name: 1.0 - sum(linear_cka(ref, ctx.group.cat([f[i] for f in batches]))
                            for i, ref in enumerate(references)) / len(references)
            for name, batches in removed.items()}
