"""Remove units: a real, smaller nn.Module (submodules replaced), not masks."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from compressor.errors import ValidationError
from compressor.graph.activations import ACTIVATION_BUILDERS
from compressor.graph.units import Unit

REMOVED_ATTRIBUTE = "compressor_removed"  # on a pruned model: the names of the units surgery removed


def replacement_for(block: nn.Module, unit: Unit) -> nn.Module:
    """What `block` becomes when its residual branch outputs zero: act(shortcut(x))."""
    parts: list[nn.Module] = []
    if unit.kind == "projection":
        parts.append(copy.deepcopy(block.get_submodule(unit.shortcut)))
    parts += [ACTIVATION_BUILDERS[a]() for a in unit.post_add]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def remove_units(model: nn.Module, units: Iterable[Unit],
                 example_input: torch.Tensor | None = None) -> nn.Module:
    """A copy of `model` with every unit in `units` replaced by its shortcut, or, for a
    "merge" unit, by its block linearised (merge_units.LinearisedBlock; merged into one
    conv by merge_units.merge_linearised, which export does).

    With `example_input`, the result is run once and must give an output of the
    same shape as the original (ValidationError otherwise).
    The copy records the removed names in its `compressor_removed` attribute.
    """
    units = list(units)
    pruned = copy.deepcopy(model)
    for unit in units:
        block = pruned.get_submodule(unit.path)
        if unit.kind == "merge":
            from compressor.rewrite.linearised import LinearisedBlock

            pruned.set_submodule(unit.path, LinearisedBlock(block))
        else:
            pruned.set_submodule(unit.path, replacement_for(block, unit))
    setattr(pruned, REMOVED_ATTRIBUTE, tuple(getattr(model, REMOVED_ATTRIBUTE, ())) + tuple(u.name for u in units))
    if example_input is not None:
        check_same_output_shape(model, pruned, example_input)
    return pruned


def check_same_output_shape(original: nn.Module, pruned: nn.Module, x: torch.Tensor) -> None:
    """Run both models once; the pruned one must produce the same, finite output shape."""
    modes = original.training, pruned.training
    original.eval()
    pruned.eval()
    with torch.no_grad():
        expected, got = original(x), pruned(x)
    original.train(modes[0])
    pruned.train(modes[1])
    if got.shape != expected.shape or not torch.isfinite(got).all():
        msg = f"pruned model gives shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        raise ValidationError(msg)
