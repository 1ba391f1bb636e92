"""Linearise-and-merge as a second unit kind for the search.

A merge unit turns one residual block into a single convolution (its inner
activations removed, its linear ops and identity shortcut composed; see
merge_block.py). Like a removal it is a pruning step: its accuracy cost is scored
by the criterion (the model with the block merged, against the original) and its
latency saving is measured on the runtime (latency.py), so the search weighs
"remove this block" against "merge this block" under one target. A block is
either kept, removed or merged (search.py keeps the choices exclusive).
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.criteria import ScoringContext
from compressor.errors import InputError, MergeRefused
from compressor.units import MERGE_SUFFIX, Unit, eval_pass

# criteria that score a block *replaced* by another module, so merges and removals share one scale
REPLACEMENT_CRITERIA = ("cka", "random")


class LinearisedBlock(nn.Module):
    """A block with its inner activations removed, BatchNorms still in place: what surgery puts in
    for a merge unit, so fine-tuning trains it in its original parameterisation (distilling into
    the merged conv directly diverged here: without BatchNorm its outputs start ~100x too large).
    `merge_linearised` turns it into the single conv before export."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        from compressor.merge_block import linearise

        self.block = linearise(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def merge_linearised(model: nn.Module) -> nn.Module:
    """`model` itself if it has no LinearisedBlock, else a copy with each merged into one conv
    (exact inside the merge's border ring; merge_block.check_merge)."""
    import copy

    from compressor.merge_block import merge_block

    names = [name for name, m in model.named_modules() if isinstance(m, LinearisedBlock)]
    if not names:
        return model
    merged = copy.deepcopy(model)
    for name in names:
        merged.set_submodule(name, merge_block(merged.get_submodule(name).block).module)
    return merged.train(model.training)


def find_merge_units(model: nn.Module, units: list[Unit]) -> tuple[list[Unit], dict[str, str]]:
    """A merge unit for every residual unit whose block merges into one conv; the others
    with the reason they were refused."""
    from compressor.merge_block import merge_block

    merges: list[Unit] = []
    refused: dict[str, str] = {}
    for unit in units:
        try:
            merge_block(model.get_submodule(unit.name))
        except MergeRefused as e:
            refused[unit.name] = e.reason
            continue
        merges.append(Unit(unit.name + MERGE_SUFFIX, "merge", unit.stage, unit.order, unit.shortcut, unit.post_add))
    return merges, refused


def with_merge_units(model: nn.Module, units: list[Unit]) -> list[Unit]:
    """`units` and the merge units of their blocks (for rebuilding a checkpoint)."""
    return units + find_merge_units(model, units)[0]


def check_criterion(name: str) -> None:
    if name not in REPLACEMENT_CRITERIA:
        msg = (f"merge units need a criterion that scores a replaced block ({', '.join(REPLACEMENT_CRITERIA)}); "
               f"got {name!r}")
        raise InputError(msg)


def score_merge_units(criterion: str, ctx: ScoringContext, merges: list[Unit]) -> dict[str, float]:
    """Importance of each merge unit (higher = keep the block as it is), on the scale the
    criterion gives removals: cka = 1 - linear CKA of penultimate features with the block
    merged; random = seeded uniform."""
    check_criterion(criterion)
    if criterion == "random":
        g = torch.Generator().manual_seed(ctx.seed + 1)
        return {u.name: float(torch.rand(1, generator=g)) for u in merges}
    from compressor.criteria.cka import linear_cka
    from compressor.merge_block import merge_block
    from compressor.suffix import SuffixRunner
    from compressor.units import units_by_name

    blocks = units_by_name(ctx.units, [u.path for u in merges])
    runner = SuffixRunner(ctx.model, blocks)
    merged = {u.path: merge_block(ctx.model.get_submodule(u.path)).module.eval() for u in merges}
    base: list[torch.Tensor] = []
    outputs: dict[str, list[torch.Tensor]] = {u.name: [] for u in merges}
    with torch.no_grad():
        for x, *_ in ctx.calibration:
            features, _, inputs = runner.capture(x)
            base.append(features.flatten(1))
            for unit, block in zip(merges, blocks, strict=True):
                out = runner.with_block(block, merged[unit.path], inputs[block.name], x)
                outputs[unit.name].append(out[0].flatten(1))
    reference = torch.cat(base)
    return {name: 1.0 - linear_cka(reference, torch.cat(f)) for name, f in outputs.items()}


@torch.no_grad()
def verify_merges(model: nn.Module, x: torch.Tensor, min_size: int = 16) -> dict[str, dict]:
    """Check the merge of every LinearisedBlock in `model` (merge_block.check_merge: the merged
    conv within MERGE_RTOL of the linearised block inside its border ring, else ValidationError;
    the ring's error reported). Keys: the blocks' module paths.

    Each block gets a seeded random input of its real shape, at least `min_size` pixels
    across so that a merge's border leaves an interior (the blocks are convolutional).
    """
    from compressor.merge_block import check_merge, merge_block

    blocks = {name: m for name, m in model.named_modules() if isinstance(m, LinearisedBlock)}
    shapes: dict[str, torch.Size] = {}

    def recorder(path: str):
        def record(_: nn.Module, args: tuple) -> None:
            shapes.setdefault(path, args[0].shape)
        return record

    eval_pass(model, x, [m.register_forward_pre_hook(recorder(name)) for name, m in blocks.items()])
    g = torch.Generator().manual_seed(0)
    checks = {}
    for name, block in blocks.items():
        _, c, h, w = shapes[name]
        block_input = torch.randn(1, c, max(h, min_size), max(w, min_size), generator=g)
        merged = merge_block(block.block)
        check = check_merge(block.block, merged, block_input)
        checks[name] = {"exact": merged.exact, "border_px": merged.border,
                        "interior_max_rel_error": check.interior_rel, "border_max_abs_error": check.border_abs,
                        "border_max_rel_error": check.border_rel, "tolerance_rel": check.tolerance,
                        "kernel": list(merged.merged.conv.kernel_size), "notes": list(merged.merged.notes)}
    return checks
