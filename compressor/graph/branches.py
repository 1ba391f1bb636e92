"""Residual branches in a captured graph: which additions are `y = s + f(s)` and which nodes `f` is.

A residual addition adds a *shortcut* and a *branch*. The shortcut reads a node `s`
directly (identity) or through one child module of the block used whole (a
projection, e.g. a 1x1 conv and its BatchNorm); the branch is every node between
`s` and the addition's other operand, all of them inside the block, reading nothing
from outside the branch but `s`, parameters and the symbolic batch size, and read by
nothing but the branch and the addition. Removing the branch leaves `y = s` (or the
projection of `s`): the branch outputs zero. Layer scale, drop-path and stochastic
depth sit on the branch, so they go with it.

Used on the whole model's graph (finding units) and on one block's own graph
(rebuilding the block without some of its branches), so the two agree on which
addition is which: additions are numbered in graph order within their block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from compressor.graph.activations import is_add
from compressor.graph.nodes import is_symbolic


@dataclass(frozen=True)
class Branch:
    """One residual addition of a block: `add` = shortcut(`source`) + the `nodes` of the branch.

    projection: the nodes of the shortcut's projection (empty: the shortcut is `source` itself);
    projection_child: the block's child module that is the projection (None: identity)."""

    add: fx.Node
    source: fx.Node
    nodes: frozenset[fx.Node]
    projection: frozenset[fx.Node] = frozenset()
    projection_child: str | None = None

    @property
    def shortcut_output(self) -> fx.Node:
        """The node that replaces the addition when the branch is removed."""
        if not self.projection:
            return self.source
        return next(n for n in self.add.args[:2] if isinstance(n, fx.Node) and n in self.projection)


def _is_leaf_value(node: fx.Node) -> bool:
    """Parameters and sizes a branch may read besides its source."""
    return node.op == "get_attr" or is_symbolic(node)


def _closure(end: fx.Node, source: fx.Node, inside: set[fx.Node]) -> set[fx.Node] | None:
    """The nodes from `source` (exclusive) up to `end` (inclusive), if all of them lie `inside` and they read
    nothing from outside but `source`, parameters and sizes; else None."""
    seen: set[fx.Node] = set()
    stack = [end]
    while stack:
        n = stack.pop()
        if n is source or n in seen or _is_leaf_value(n):
            continue
        if n not in inside or n.op == "placeholder":
            return None
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _reads(nodes: set[fx.Node], source: fx.Node) -> bool:
    """Whether the branch computes from `source` at all (adding a bias or a mask made of parameters
    alone is not a residual branch)."""
    return any(source in n.all_input_nodes for n in nodes)


def _contained(nodes: set[fx.Node], add: fx.Node) -> bool:
    """Nothing outside `nodes` but the addition reads them."""
    return all(u in nodes or u is add for n in nodes for u in n.users)


def _child_of(node: fx.Node, block_key: str | None) -> str | None:
    """The block's child module a node ran in (the first stack entry below the block's call), by its path
    relative to the block; None for the block's own operations."""
    stack = node.meta.get("nn_module_stack") or {}
    keys = list(stack)
    if block_key is None:
        start = 0
    elif block_key in keys:
        start = keys.index(block_key) + 1
    else:
        return None
    if start >= len(keys):
        return None
    path = stack[keys[start]][0]
    block_path = stack[block_key][0] if block_key is not None else ""
    return path[len(block_path) + 1:] if block_path else path


def _projection_child(nodes: set[fx.Node], block: nn.Module, block_key: str | None) -> str | None:
    """The child module whose whole call the nodes are, or None."""
    children = {_child_of(n, block_key) for n in nodes}
    if len(children) != 1 or None in children:
        return None
    child = children.pop()
    leaves = [m for _, m in block.get_submodule(child).named_modules() if not list(m.children())]
    calls = [n for n in nodes if n.op == "call_module"]
    return child if len(calls) >= len([m for m in leaves if any(True for _ in m.parameters())]) else None


def analyse_add(add: fx.Node, inside: set[fx.Node], block: nn.Module, block_key: str | None) -> Branch | str:
    """The Branch of a residual addition among the block's nodes `inside`, or why it is not one."""
    if set(add.kwargs) - {"alpha"} or add.kwargs.get("alpha", 1) != 1:
        return "its addition scales an operand (alpha)"
    operands = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2 or operands[0] is operands[1]:
        return "its addition does not add two different tensors"
    for source, other in (operands, operands[::-1]):
        if _is_leaf_value(source):
            continue
        nodes = _closure(other, source, inside)
        if nodes and _contained(nodes, add) and _reads(nodes, source):
            return Branch(add, source, frozenset(nodes))
    found = _projected(add, operands, inside, block, block_key)
    if found is not None:
        return found
    return "neither side of its addition is the input or a projection module of the input"


def _ancestors_in(node: fx.Node, inside: set[fx.Node]) -> list[fx.Node]:
    """`node` and every node it reads from, within `inside` or just outside it (the frontier)."""
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen or _is_leaf_value(n):
            continue
        seen[n] = None
        if n in inside and n.op != "placeholder":
            stack.extend(n.all_input_nodes)
    return list(seen)


def _projected(add: fx.Node, operands: list[fx.Node], inside: set[fx.Node], block: nn.Module,
               block_key: str | None) -> Branch | None:
    """shortcut = a child module of the block applied to `source`, branch = the rest from `source`."""
    a, b = operands
    common = set(_ancestors_in(a, inside)) & set(_ancestors_in(b, inside))
    if not common:
        return None
    order = {n: i for i, n in enumerate(add.graph.nodes)}
    source = max(common, key=lambda n: order[n])
    found = []
    for proj_end, branch_end in ((a, b), (b, a)):
        projection = _closure(proj_end, source, inside)
        branch = _closure(branch_end, source, inside)
        if not projection or not branch or projection & branch or not _reads(branch, source):
            continue
        if not (_contained(projection, add) and _contained(branch, add)):
            continue
        child = _projection_child(projection, block, block_key)
        if child is not None:
            found.append(Branch(add, source, frozenset(branch), frozenset(projection), child))
    return min(found, key=lambda f: len(f.projection)) if found else None


def block_additions(nodes: list[fx.Node], block_key: str | None) -> list[fx.Node]:
    """The additions a block's own forward performs (not its children's), in graph order; `block_key` is the
    block's call key in the model graph (None: `nodes` are a block's own captured graph)."""
    adds = []
    for n in nodes:
        if not is_add(n):
            continue
        stack = n.meta.get("nn_module_stack") or {}
        innermost = next(reversed(stack)) if stack else None
        if innermost == block_key:
            adds.append(n)
    return adds


def branch_name(branch: Branch, block: nn.Module, block_key: str | None, index: int) -> str:
    """The branch's name within its block: the child module on the branch with the most parameters
    ("attn", "mlp"), or "add<index>" for a branch of the block's own operations only."""
    children = {c for n in branch.nodes if (c := _child_of(n, block_key)) is not None}
    top = {c.split(".")[0] for c in children}
    if not top:
        return f"add{index}"
    return max(sorted(top), key=lambda c: sum(p.numel() for p in block.get_submodule(c).parameters()))


def branch_members(branch: Branch, block_key: str | None, block_path: str) -> tuple[str, ...]:
    """The block's children and own parameters (names relative to the block) that the branch's nodes use:
    what removing the branch deletes."""
    found = {c.split(".")[0] for n in branch.nodes if (c := _child_of(n, block_key)) is not None}
    prefix = f"{block_path}." if block_path else ""
    for node in branch.nodes:
        for a in node.all_input_nodes:
            if a.op == "get_attr" and str(a.target).startswith(prefix):
                found.add(str(a.target)[len(prefix):].split(".")[0])
    return tuple(sorted(found))
