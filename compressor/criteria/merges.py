"""Importance of merge units on the scale the criterion gives removals, so the search can
weigh "remove this block" against "merge it into one conv"."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from compressor.criteria.registry import ScoringContext
from compressor.errors import InputError
from compressor.graph.units import Unit

# criteria that score a block *replaced* by another module, so merges and removals share one scale
REPLACEMENT_CRITERIA = ("cka", "random")


def check_criterion(name: str) -> None:
    if name not in REPLACEMENT_CRITERIA:
        msg = (f"merge units need a criterion that scores a replaced block ({', '.join(REPLACEMENT_CRITERIA)}); "
               f"got {name!r}")
        raise InputError(msg)


def _merged_on_its_device(block: torch.nn.Module, merge: Callable) -> torch.nn.Module:
    """`merge(block)` (rewrite.block.merge_block: one conv) done on the CPU, where the rewrite is checked,
    then put where the block is."""
    device = next(block.parameters()).device
    source = block if device.type == "cpu" else copy.deepcopy(block).cpu()
    return merge(source).module.to(device).eval()


def score_merge_units(criterion: str, ctx: ScoringContext, merges: list[Unit]) -> dict[str, float]:
    """Importance of each merge unit (higher = keep the block as it is), on the scale the
    criterion gives removals: cka = 1 - linear CKA of penultimate features with the block
    merged; random = seeded uniform."""
    check_criterion(criterion)
    if criterion == "random":
        g = torch.Generator().manual_seed(ctx.seed + 1)
        return {u.name: float(torch.rand(1, generator=g)) for u in merges}
    from compressor.graph.prefix import SuffixRunner
    from compressor.graph.units import units_by_name
    from compressor.metrics.similarity import linear_cka
    from compressor.rewrite.block import merge_block

    blocks = units_by_name(ctx.units, [u.path for u in merges])
    runner = SuffixRunner(ctx.model, blocks, ctx.example)
    merged = {u.path: _merged_on_its_device(ctx.model.get_submodule(u.path),
                                            lambda b, u=u: merge_block(b, u.input_shape or None)) for u in merges}
    base: list[torch.Tensor] = []
    outputs: dict[str, list[torch.Tensor]] = {u.name: [] for u in merges}
    with torch.no_grad():
        for x, *_ in ctx.calibration:
            features, _, inputs = runner.capture(x)
            base.append(features.flatten(1))
            for unit, block in zip(merges, blocks, strict=True):
                out = runner.with_block(block, merged[unit.path], inputs[block.name], x)
                outputs[unit.name].append(out[0].flatten(1))
    reference = ctx.group.cat(base)
    return {name: 1.0 - linear_cka(reference, ctx.group.cat(f)) for name, f in outputs.items()}
