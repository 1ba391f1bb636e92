"""Remove units: a real, smaller nn.Module (submodules replaced), not masks."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from compressor.errors import ValidationError
from compressor.graph.activations import ACTIVATION_BUILDERS
from compressor.graph.capture import module_digest
from compressor.graph.derive import LINEAGE
from compressor.graph.units import Unit

REMOVED_ATTRIBUTE = "compressor_removed"  # on a pruned model: the names of the units surgery removed


def replacement_for(block: nn.Module, unit: Unit) -> nn.Module:
    """What `block` becomes when `unit` is removed: act(shortcut(x)) for a one-addition block; the block
    rebuilt without the unit's residual branches (graph/rebuild.py) for a branch or block unit; the block
    with fewer inner channels (graph/slim.py) for a width unit."""
    if unit.kind == "width":
        from compressor.graph.slim import slimmed_block

        return slimmed_block(block, unit.input_shape, unit.slim)
    if unit.kind in ("branch", "block"):
        from compressor.graph.rebuild import rebuilt_block

        return rebuilt_block(block, unit.input_shape, unit.branches)
    parts: list[nn.Module] = []
    if unit.kind == "projection":
        parts.append(copy.deepcopy(block.get_submodule(unit.shortcut)))
    parts += [ACTIVATION_BUILDERS[a]() for a in unit.post_add]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _by_block(units: Iterable[Unit]) -> list[tuple[str, list[Unit]]]:
    """Units grouped by their block, inner blocks first (an outer rebuild then captures them removed)."""
    groups: dict[str, list[Unit]] = {}
    for unit in units:
        groups.setdefault(unit.path, []).append(unit)
    return sorted(groups.items(), key=lambda item: -item[0].count("."))


def remove_units(model: nn.Module, units: Iterable[Unit],
                 example_input: torch.Tensor | None = None) -> nn.Module:
    """A copy of `model` with every unit in `units` removed: a one-addition block replaced by its shortcut,
    a block with branch units rebuilt without those branches (several branch units of one block together),
    a "merge" unit's block linearised (rewrite/linearised.py; merged into one conv at export), a "width"
    unit's block slimmed to the channels it keeps (graph/slim.py; before any other unit of its block).
    The copy records the removed names in its `compressor_removed` attribute, and where it came from (its
    lineage: capture then derives its graph from the model's instead of exporting it again, graph/derive.py).

    With `example_input`, the result is run once and must give outputs of the same shapes as the original
    (ValidationError otherwise).
    """
    units = list(units)
    pruned = copy.deepcopy(model)
    for path, group in _by_block(units):
        block = pruned.get_submodule(path)
        widths = [u for u in group if u.kind == "width"]
        if widths:  # slimmed first: a branch removed afterwards goes with its channels
            from compressor.graph.slim import slimmed_widths

            block = slimmed_widths(block, widths)
            pruned.set_submodule(path, block)
            group = [u for u in group if u.kind != "width"]
            if not group:
                continue
        merges = [u for u in group if u.kind == "merge"]
        if merges:
            from compressor.rewrite.linearised import LinearisedBlock

            pruned.set_submodule(path, LinearisedBlock(block, merges[0].input_shape))
        elif len(group) == 1:
            pruned.set_submodule(path, replacement_for(block, group[0]))
        else:
            branches = {i for u in group for i in u.branches}
            from compressor.graph.rebuild import rebuilt_block

            pruned.set_submodule(path, rebuilt_block(block, group[0].input_shape, branches))
    setattr(pruned, REMOVED_ATTRIBUTE, tuple(getattr(model, REMOVED_ATTRIBUTE, ())) + tuple(u.name for u in units))
    setattr(pruned, LINEAGE, (module_digest(model), tuple(path for path, _ in _by_block(units))))
    if example_input is not None:
        check_same_output_shape(model, pruned, example_input)
    return pruned


def _shapes(value: object) -> list[tuple[int, ...]] | None:
    """The shapes of every tensor in a (nested) output, or None if one is not finite."""
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if any(not torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
        return None
    return [tuple(t.shape) for t in tensors]


def check_same_output_shape(original: nn.Module, pruned: nn.Module, x: torch.Tensor) -> None:
    """Run both models once; the pruned one must produce finite outputs of the same shapes."""
    modes = original.training, pruned.training
    original.eval()
    pruned.eval()
    with torch.no_grad():
        expected, got = _shapes(original(x)), _shapes(pruned(x))
    original.train(modes[0])
    pruned.train(modes[1])
    if got != expected:
        msg = f"pruned model gives outputs of shapes {got}, expected {expected}"
        raise ValidationError(msg)
