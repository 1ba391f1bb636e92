"""Weight magnitude of a unit's residual branch: mean |w| over its conv and linear weights
(L1 normalised by parameter count). Cost: no forward pass."""

from __future__ import annotations

import torch
from torch import nn

from compressor.criteria import ScoringContext, register


def branch_weights(block: nn.Module, shortcut: str | None) -> list[torch.Tensor]:
    """Conv/linear weights of `block` that are not in its shortcut submodule."""
    skip = f"{shortcut}." if shortcut else None
    return [m.weight for name, m in block.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            and not (skip and (name + ".").startswith(skip))]


@register("magnitude")
def magnitude_importance(ctx: ScoringContext) -> dict[str, float]:
    scores = {}
    for unit in ctx.units:
        weights = branch_weights(ctx.model.get_submodule(unit.name), unit.shortcut)
        total = sum(w.abs().sum().item() for w in weights)
        count = sum(w.numel() for w in weights)
        scores[unit.name] = total / count if count else 0.0
    return scores
