"""A block rebuilt without some of its residual branches: a real, smaller nn.Module, not a mask.

The block is captured on its own (capture.py), the chosen additions are replaced
by their shortcuts (branches.py), the branches' nodes deleted, and the calls of
the block's direct children that remain are lifted back to `call_module` nodes on
the block's own children (attention, MLP, norms), so the rebuilt block keeps their
parameters under the same names and trains them with their own forward. Only the
block's own operations between them (the additions, reshapes) stay ATen calls,
which run as they ran when captured in eval mode (no dropout of the block's own).
The parameters of a removed branch are gone with it.

Each rebuild is checked on a seeded input of the block's shape: it must equal the
captured block with the removed branches' outputs set to zero, within
REBUILD_RTOL. Rebuilt graphs are cached by the block's structure, input shape and
the branches removed, so rebuilding the same kind of block again costs no export.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import fx, nn

from compressor.errors import ValidationError
from compressor.graph.branches import Branch, analyse_add, block_additions
from compressor.graph.capture import ConstantHolder, capture, lift_calls, record_values, root_for, structure_key
from compressor.graph.nodes import has_attr, remove_dead

# |rebuilt - muted reference| <= REBUILD_RTOL * max|reference|: the same operations on the same values, only
# the summation order of a lifted child may differ from the captured ATen calls
REBUILD_RTOL = 1e-5
CACHE_SIZE = 64
_CACHE: OrderedDict[tuple[str, tuple[int, ...]], tuple[fx.Graph, dict[str, object]]] = OrderedDict()


def _outermost_key(stack: dict) -> tuple[str, str] | None:
    if not stack:
        return None
    key = next(iter(stack))
    return key, stack[key][0]


def _branches(gm: fx.GraphModule, block: nn.Module) -> list[Branch | str]:
    nodes = list(gm.graph.nodes)
    return [analyse_add(a, set(nodes), block, None) for a in block_additions(nodes, None)]


def _without(gm: fx.GraphModule, block: nn.Module, removed: set[int]) -> None:
    """Replace each removed addition by its shortcut and delete its branch (in place)."""
    found = _branches(gm, block)
    for i in sorted(removed):
        if i >= len(found) or not isinstance(found[i], Branch):
            why = found[i] if i < len(found) else f"it has {len(found)} residual additions"
            msg = f"cannot remove addition {i} of {type(block).__name__}: {why}"
            raise ValidationError(msg)
    for i in sorted(removed, reverse=True):
        branch = found[i]
        branch.add.replace_all_uses_with(branch.shortcut_output)
        gm.graph.erase_node(branch.add)
    remove_dead(gm.graph)


def _muted_reference(block: nn.Module, x: torch.Tensor, removed: set[int]) -> torch.Tensor:
    """The captured block with each removed branch's output replaced by zeros."""
    gm = capture(block, x)
    found = _branches(gm, block)
    for i in removed:
        branch = found[i]
        operand = next(a for a in branch.add.args[:2] if isinstance(a, fx.Node) and a in branch.nodes)
        with gm.graph.inserting_before(branch.add):
            zeros = gm.graph.call_function(torch.ops.aten.zeros_like.default, (operand,))
        branch.add.replace_input_with(operand, zeros)
    gm.recompile()
    with torch.no_grad():
        return gm(x)


def rebuilt_block(block: nn.Module, input_shape: Iterable[int], removed: Iterable[int]) -> nn.Module:
    """`block` without the residual additions numbered `removed` (graph order of its own additions), as an
    fx.GraphModule on `block`'s own children; checked against the muted reference (ValidationError)."""
    removed = set(removed)
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    block.eval()
    key = (structure_key(block, tuple(input_shape)), tuple(sorted(removed)))
    if key not in _CACHE:
        gm = capture(block, x)
        _without(gm, block, removed)
        gm.recompile()
        values = record_values(gm, x)
        children = {name: child for name, child in block.named_children()}
        lift_calls(gm, children, values, _outermost_key)
        remove_dead(gm.graph)
        constants = {n.target: getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"
                     and not has_attr(block, n.target)}
        _CACHE[key] = (copy.deepcopy(gm.graph), constants)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    graph, constants = copy.deepcopy(_CACHE[key][0]), _CACHE[key][1]
    rebuilt = fx.GraphModule(root_for(graph, block, ConstantHolder(constants)), graph,
                             f"{type(block).__name__}Rebuilt").eval()
    _check(block, rebuilt, x, removed)
    return rebuilt


def _check(block: nn.Module, rebuilt: nn.Module, x: torch.Tensor, removed: set[int]) -> None:
    expected = _muted_reference(block, x, removed)
    with torch.no_grad():
        got = rebuilt(x)
    scale = float(expected.abs().max().clamp_min(1e-12))
    error = float((got - expected).abs().max()) / scale if got.shape == expected.shape else float("inf")
    if not error <= REBUILD_RTOL:
        msg = (f"{type(block).__name__} rebuilt without additions {sorted(removed)} differs from the block with "
               f"those branches muted by {error:.3g} of its range (allowed {REBUILD_RTOL:g})")
        raise ValidationError(msg)
