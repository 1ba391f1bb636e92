"""Torch-Pruning's magnitude channel pruning as the reference the benchmarks compare against.

One uniform ratio per layer group, channels ranked by L1 weight magnitude, the final
classifier kept whole; `round_to` makes every pruned layer's channel count a multiple
of it (8 and 16 suit vectorised kernels). A multi-head attention (graph/heads.py) is
pruned by whole heads at the same ratio (Torch-Pruning's num_heads / prune_num_heads,
as in its ViT examples), and the module is told its new head count. Ratios are found by bisection: to match our
pruned model's FLOPs, or, with a measuring function, its measured latency.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.metrics.flops import count_cost

FLOP_TOLERANCE = 0.01  # bisection stops within 1% of the target FLOPs
FLOP_ACCEPT = 0.03  # a match worse than this is flagged in the results
MAX_BISECTIONS = 16
MAX_RATIO = 0.9
ROUND_TO = (1, 8, 16)
METHOD = ("torch_pruning BasePruner, MagnitudeImportance(p=1) (L1), local uniform ratio, "
          "final Linear kept, no fine-tuning unless stated")


def _classifier(model: nn.Module) -> list[nn.Module]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def tp_prune(model: nn.Module, example: torch.Tensor, ratio: float, round_to: int = 1) -> nn.Module:
    """A copy of `model` with `ratio` of every prunable group's channels removed (L1 ranking)."""
    import torch_pruning as tp

    from compressor.graph.heads import attention_paths, set_head_count

    pruned = copy.deepcopy(model).eval()
    if ratio <= 0:
        return pruned
    counts = {pruned.get_submodule(path): count for path, count in attention_paths(pruned).items()}
    attentions = list(counts)
    # Torch-Pruning removes ceil(ratio x heads) heads of each attention: past (heads - 1) / heads that is every head,
    # and the attention is left with none. Each keeps one head at least, as our head levels do.
    heads = {"num_heads": {a.qkv: n for a, n in counts.items()}, "prune_num_heads": True, "prune_head_dims": False,
             "head_pruning_ratio": ratio,
             "head_pruning_ratio_dict": {a.qkv: min(ratio, (n - 1) / n) for a, n in counts.items()}} if counts else {}
    pruner = tp.pruner.BasePruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=_classifier(pruned),
                                  round_to=None if round_to <= 1 else round_to, **heads)
    pruner.step()
    for attention in attentions:  # Torch-Pruning cut whole heads of qkv and proj; the module must read the new count
        set_head_count(attention, pruner.num_heads[attention.qkv], attention.proj.in_features)
    return pruned.eval()


@dataclass
class TPModel:
    """A Torch-Pruning result: the model, its ratio and FLOPs, and every (ratio, value) tried."""

    model: nn.Module
    ratio: float
    round_to: int
    flops: int
    tried: list[tuple[float, float]] = field(default_factory=list)
    matched: bool = True

    def describe(self) -> dict:
        return {"ratio": self.ratio, "round_to": self.round_to, "flops": self.flops, "matched": self.matched,
                "bisection": [{"ratio": r, "value": v} for r, v in self.tried]}


def bisect_ratio(model: nn.Module, example: torch.Tensor, round_to: int, value_of: Callable[[nn.Module], float],
                 target: float, tolerance: float, steps: int = MAX_BISECTIONS) -> TPModel:
    """The ratio whose `value_of(pruned)` (decreasing in the ratio: FLOPs, latency) is closest to
    `target`, by bisection; stops once within `tolerance` (relative)."""
    lo, hi = 0.0, MAX_RATIO
    best: tuple[float, TPModel] | None = None
    tried: list[tuple[float, float]] = []
    for _ in range(steps):
        ratio = (lo + hi) / 2
        candidate = tp_prune(model, example, ratio, round_to)
        value = value_of(candidate)
        tried.append((ratio, value))
        mismatch = abs(value / target - 1)
        if best is None or mismatch < best[0]:
            best = (mismatch, TPModel(candidate, ratio, round_to, count_cost(candidate, example).flops))
        if mismatch <= tolerance:
            break
        if value > target:
            lo = ratio
        else:
            hi = ratio
    assert best is not None
    mismatch, found = best
    found.tried = tried
    found.matched = mismatch <= max(tolerance, FLOP_ACCEPT)
    return found


def tp_matching_flops(model: nn.Module, example: torch.Tensor, target_flops: int, round_to: int = 1) -> TPModel:
    """Torch-Pruning at (nearly) `target_flops`; FLOPs move in whole-channel steps, so it may miss."""
    return bisect_ratio(model, example, round_to, lambda m: float(count_cost(m, example).flops),
                        float(target_flops), FLOP_TOLERANCE)
