"""SR-init, stochastic re-initialisation (Tang, Lu, Xuan 2023): importance = top-1 accuracy
drop (percentage points) on the calibration set when all of a unit's parameters,
shortcut included (a transformer branch: its modules'), are re-initialised (Kaiming-normal convs and linears, BatchNorm
gamma 1, beta 0, running statistics 0/1), averaged over ScoringContext.repeats seeds.

SR-init measures sensitivity to re-initialisation, not to removal: a block whose
residual branch is zeroed (removable at no cost) can still score as important,
because re-initialising its last BatchNorm switches the branch back on.

Cost: 1 forward pass + U x repeats suffix passes (prefix caching); naive: U x repeats + 1.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from compressor.criteria.registry import ScoringContext, register
from compressor.graph.prefix import SuffixRunner
from compressor.metrics.outputs import first_logits


@torch.no_grad()
def reinitialised(block: nn.Module, seed: int, members: tuple[str, ...] = ()) -> nn.Module:
    """A copy of `block` with every parameter and BatchNorm statistic freshly initialised; only those of
    the children named in `members` where given (a transformer branch's modules)."""
    fresh = copy.deepcopy(block).eval()
    g = torch.Generator().manual_seed(seed)
    chosen = [m for name, m in fresh.named_children() if name in members] if members else [fresh]
    for module in (sub for part in chosen for sub in part.modules()):
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            fan_out = module.weight.shape[0] * module.weight[0, 0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2.0 / fan_out) ** 0.5)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()  # gamma 1, beta 0, running mean 0, running var 1
    return fresh


@register("sr_init", cost="1 forward pass + U x repeats suffix passes; naive: U x repeats + 1")
def sr_init_importance(ctx: ScoringContext) -> dict[str, float]:
    runner = SuffixRunner(ctx.model, ctx.units, ctx.example)
    blocks = {u.name: [reinitialised(ctx.model.get_submodule(u.path), ctx.seed + r, u.members)
                        for r in range(ctx.repeats)] for u in ctx.units}
    correct_base = 0
    correct = {u.name: 0 for u in ctx.units}
    total = 0
    for x, y in ctx.calibration:
        if ctx.use_cache:
            _, logits, inputs = runner.capture(x)
        else:
            logits, inputs = runner.full(x)[1], {}
        logits = first_logits(logits, why="sr_init")
        correct_base += (logits.argmax(1) == y).sum().item()
        total += len(y)
        for unit in ctx.units:
            for block in blocks[unit.name]:
                out = (runner.with_block(unit, block, inputs[unit.name], x) if ctx.use_cache
                       else runner.naive_with_block(unit, block, x))
                correct[unit.name] += (first_logits(out[1]).argmax(1) == y).sum().item()
    correct_base, correct, total = ctx.group.total((correct_base, correct, total))
    base = 100.0 * correct_base / max(total, 1)
    return {name: base - 100.0 * c / max(total * ctx.repeats, 1) for name, c in correct.items()}
