"""Linearise-and-merge as a second unit kind for the search.

A merge unit turns one residual block into a single convolution (its inner
activations removed, its linear ops and identity shortcut composed; see
rewrite/block.py). Like a removal it is a pruning step: its accuracy cost is scored
by the criterion (criteria/merges.py) and its latency saving is measured on the
runtime, so the search weighs "remove this block" against "merge this block" under
one target. A block is either kept, removed or merged (the knapsack keeps the
choices exclusive).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from compressor.errors import MergeRefused
from compressor.graph.units import MERGE_SUFFIX, Unit


def find_merge_units(model: nn.Module, units: list[Unit]) -> tuple[list[Unit], dict[str, str]]:
    """A merge unit for every residual unit whose block merges into one conv; the others
    with the reason they were refused."""
    from compressor.rewrite.block import merge_block

    merges: list[Unit] = []
    refused: dict[str, str] = {}
    for unit in units:
        if unit.kind not in ("identity", "projection"):
            continue  # a transformer's branch or block is not a conv block
        try:
            merge_block(model.get_submodule(unit.name), unit.input_shape or None)
        except MergeRefused as e:
            refused[unit.name] = e.reason
            continue
        merges.append(replace(unit, name=unit.name + MERGE_SUFFIX, kind="merge"))
    return merges, refused


def with_merge_units(model: nn.Module, units: list[Unit]) -> list[Unit]:
    """`units` and the merge units of their blocks (for rebuilding a checkpoint)."""
    return units + find_merge_units(model, units)[0]
