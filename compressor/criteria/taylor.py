"""First-order Taylor importance (Molchanov et al. 2019): sum over a unit's branch
parameters of |w * dL/dw|, the loss change its removal would cause to first order,
accumulated per batch with cross-entropy on the calibration labels.

Cost: one forward and one backward pass over the calibration set.
"""

from __future__ import annotations

import copy

from torch.nn import functional as F

from compressor.criteria.magnitude import unit_parameters
from compressor.criteria.registry import ScoringContext, register
from compressor.metrics.outputs import first_logits


@register("taylor", cost="1 forward + 1 backward pass")
def taylor_importance(ctx: ScoringContext) -> dict[str, float]:
    model = copy.deepcopy(ctx.model).eval()  # eval: BatchNorm uses its running statistics
    params = {u.name: unit_parameters(model, u) for u in ctx.units}
    totals = dict.fromkeys(params, 0.0)
    n = 0
    for x, y in ctx.calibration:
        n += len(x)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(first_logits(model(x), why="taylor"), y, reduction="sum").backward()
        for name, ps in params.items():
            totals[name] += sum((p * p.grad).abs().sum().item() for p in ps if p.grad is not None)
    totals, n = ctx.group.total((totals, n))
    return {name: total / max(n, 1) for name, total in totals.items()}
