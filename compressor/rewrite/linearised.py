"""Linearised blocks: what surgery puts in for a merge unit, and their merge at export.

A merge unit (graph/merge_units.py) turns one residual block into a single
convolution (its inner activations removed, its linear ops and identity shortcut
composed; see block.py). Until export the block stays linearised with its
BatchNorms, so fine-tuning trains it in its original parameterisation;
`merge_linearised` merges every such block into one conv, and `verify_merges`
checks each merge numerically.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.graph.activations import eval_pass


class LinearisedBlock(nn.Module):
    """A block with its inner activations removed, BatchNorms still in place: what surgery puts in
    for a merge unit, so fine-tuning trains it in its original parameterisation (distilling into
    the merged conv directly diverged here: without BatchNorm its outputs start ~100x too large).
    `merge_linearised` turns it into the single conv before export."""

    def __init__(self, block: nn.Module, input_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        from compressor.rewrite.block import linearise

        self.input_shape = tuple(input_shape) if input_shape else None  # (C, H, W) it is captured on
        self.block = linearise(block, self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def merge_linearised(model: nn.Module) -> nn.Module:
    """`model` itself if it has no LinearisedBlock, else a copy with each merged into one conv
    (exact inside the merge's border ring; merge_block.check_merge)."""
    import copy

    from compressor.rewrite.block import merge_block

    names = [name for name, m in model.named_modules() if isinstance(m, LinearisedBlock)]
    if not names:
        return model
    merged = copy.deepcopy(model)
    for name in names:
        linearised = merged.get_submodule(name)
        merged.set_submodule(name, merge_block(linearised.block, linearised.input_shape).module)
    return merged.train(model.training)


@torch.no_grad()
def verify_merges(model: nn.Module, x: torch.Tensor, min_size: int = 16) -> dict[str, dict]:
    """Check the merge of every LinearisedBlock in `model` (merge_block.check_merge: the merged
    conv within MERGE_RTOL of the linearised block inside its border ring, else ValidationError;
    the ring's error reported). Keys: the blocks' module paths.

    Each block gets a seeded random input of its real shape, at least `min_size` pixels
    across so that a merge's border leaves an interior (the blocks are convolutional).
    """
    from compressor.rewrite.block import check_merge, merge_block

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
        merged = merge_block(block.block, block.input_shape)
        check = check_merge(block.block, merged, block_input)
        checks[name] = {"exact": merged.exact, "border_px": merged.border,
                        "interior_max_rel_error": check.interior_rel, "border_max_abs_error": check.border_abs,
                        "border_max_rel_error": check.border_rel, "tolerance_rel": check.tolerance,
                        "kernel": list(merged.merged.conv.kernel_size), "notes": list(merged.merged.notes)}
    return checks
