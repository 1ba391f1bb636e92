"""Find the removable residual units of a model by tracing its graph.

A unit is a submodule whose forward computes ``act(branch(x) + shortcut(x))``
(``act`` optional, elementwise) where ``shortcut`` is the identity or a child
submodule (a projection). Removing it means the branch outputs zero, so the
unit becomes ``act(shortcut(x))``. Nothing here is specific to an
architecture: any module that torch.fx can trace works.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from compressor.errors import InputError, first_line
from compressor.graph.activations import IDEMPOTENT_AFTER, SIGN_PRESERVING_MODULES, activation_of, is_add, trace

MERGE_SUFFIX = "/merge"  # a merge unit's name: its block's path + this


@dataclass(frozen=True)
class Unit:
    """A residual block the search may remove, or (kind "merge") linearise and merge into one conv.

    name: qualified module path ("layer2.0"; "layer2.0/merge" for a merge unit);
    kind: "identity" or "projection" (removal to the shortcut), or "merge";
    shortcut: the projection's path relative to the block; post_add: activations
    applied after the add that the replacement keeps; stage: the block's output
    shape, e.g. "32x16x16" (units of one stage share it); order: position in the graph.
    """

    name: str
    kind: str
    stage: str
    order: int
    shortcut: str | None = None
    post_add: tuple[str, ...] = ()
    anchored: bool = False  # its stage also has a block that is not a unit (that block always stays)

    @property
    def removable_to(self) -> str:
        if self.kind == "merge":
            return "one merged convolution"
        return "its projection shortcut" if self.kind == "projection" else "identity"

    @property
    def path(self) -> str:
        """The block's module path."""
        return self.name.removesuffix(MERGE_SUFFIX) if self.kind == "merge" else self.name


def _through_identity(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """Skip nn.Identity calls (e.g. a shortcut that is an Identity module)."""
    while node.op == "call_module" and isinstance(modules[node.target], nn.Identity):
        node = node.all_input_nodes[0]
    return node


def _ancestors(node: fx.Node, stop: fx.Node) -> list[fx.Node]:
    """All nodes between `stop` (exclusive) and `node` (inclusive)."""
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n is stop or n in seen:
            continue
        seen[n] = None
        stack.extend(a for a in n.all_input_nodes)
    return list(seen)


@dataclass(frozen=True)
class _BlockShape:
    kind: str
    shortcut: str | None
    post_add: tuple[str, ...]


def _analyse_block(block: nn.Module) -> _BlockShape | str:
    """Recognise ``act(branch(x) + shortcut(x))`` in a block's own traced graph; else why not."""
    try:
        graph = fx.symbolic_trace(block).graph
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        return f"its forward cannot be traced on its own ({type(e).__name__})"
    modules = dict(block.named_modules())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = [n for n in graph.nodes if n.op == "output"]
    if len(placeholders) != 1:
        return f"its forward takes {len(placeholders)} inputs, not one"
    if len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
        return "it does not return one tensor"
    x, node = placeholders[0], outputs[0].args[0]
    post: list[str] = []
    while not is_add(node):
        act = activation_of(node, modules)
        if act is None or len(node.all_input_nodes) != 1:
            return "its output is not act(a + b): something other than an activation follows the addition"
        post.append(act)
        node = node.all_input_nodes[0]
    operands = [_through_identity(a, modules) for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2 or any(k != "alpha" for k in node.kwargs):
        return "its addition does not add two tensors"
    if x in operands:
        return _BlockShape("identity", None, tuple(reversed(post)))
    chains = sorted((_ancestors(a, x) for a in operands), key=len)
    shortcut_nodes, branch_nodes = chains
    if any(n.op != "call_module" for n in shortcut_nodes) or set(shortcut_nodes) & set(branch_nodes):
        return "neither side of its addition is the input or a projection module of the input"
    heads = {str(n.target).split(".")[0] for n in shortcut_nodes}
    if len(heads) != 1:
        return "its shortcut is not one child module"
    head = heads.pop()
    leaves = [n for n, m in block.get_submodule(head).named_modules() if not list(m.children())]
    if len(leaves) != len(shortcut_nodes):
        return "its shortcut module is not used whole"
    return _BlockShape("projection", head, tuple(reversed(post)))


def _producer_activation(gm: fx.GraphModule, block_nodes: set[fx.Node]) -> str | None | bool:
    """Activation producing the block's single external input; False if not single-input."""
    modules = dict(gm.named_modules())
    external = {a for n in block_nodes for a in n.all_input_nodes if a not in block_nodes}
    external = {a for a in external if a.op != "get_attr"}
    if len(external) != 1:
        return False
    source = external.pop()
    while (source.op == "call_module" and isinstance(modules[source.target], SIGN_PRESERVING_MODULES)
           and len(source.all_input_nodes) == 1):
        source = source.all_input_nodes[0]
    return activation_of(source, modules)


def find_units(model: nn.Module, example_input: torch.Tensor) -> list[Unit]:
    """Every removable residual block of `model`, in graph order.

    A post-add activation is dropped from the replacement when the block's input
    was produced by an activation that makes it a no-op (ReLU after ReLU), so
    an identity unit becomes a true nn.Identity.
    """
    return find_units_explained(model, example_input)[0]


def _traced_with_shapes(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    gm = trace(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as e:
        msg = (f"{type(model).__name__} fails on a {list(example_input.shape)} input: "
               f"{type(e).__name__}: {first_line(e)}")
        raise InputError(msg) from e
    finally:
        model.train(was_training)
    return gm


def find_units_explained(model: nn.Module, example_input: torch.Tensor) -> tuple[list[Unit], dict[str, str]]:
    """(the units, as find_units; {module path: why it is not a unit} for every module with an addition
    that was not recognised)."""
    gm = _traced_with_shapes(model, example_input)
    units: dict[str, Unit] = {}
    rejected: dict[str, str] = {}
    nodes = list(gm.graph.nodes)
    for node in nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if not is_add(node) or not stack:
            continue
        path = list(stack)[-1]
        if path in units or path in rejected:
            continue
        shape = _analyse_block(model.get_submodule(path))
        if isinstance(shape, str):
            rejected[path] = shape
            continue
        block_nodes = {n for n in nodes if path in (n.meta.get("nn_module_stack") or {})}
        producer = _producer_activation(gm, block_nodes)
        users_outside = [n for n in block_nodes if any(u not in block_nodes for u in n.users)]
        if producer is False or len(users_outside) != 1:
            rejected[path] = "in the model it reads more than one input or feeds more than one consumer"
            continue
        meta = users_outside[0].meta.get("tensor_meta")
        stage = "x".join(str(d) for d in meta.shape[1:]) if meta is not None else "?"
        post = shape.post_add
        if shape.kind == "identity" and all((p, producer) in IDEMPOTENT_AFTER for p in post):
            post = ()
        units[path] = Unit(path, shape.kind, stage, len(units), shape.shortcut, post)
    anchored = _anchored_stages(list(units.values()), nodes)
    return [replace(u, anchored=u.stage in anchored) for u in units.values()], rejected


def _anchored_stages(units: list[Unit], nodes: list[fx.Node]) -> set[str]:
    """Stages whose first unit is fed, at the stage's shape, by a sibling block that is not a
    unit (EfficientNet's and MobileNetV2's first, non-residual block of a stage): that block
    survives any removal, so the stage keeps a block even with all its units gone."""
    firsts: dict[str, Unit] = {}
    for u in units:
        firsts.setdefault(u.stage, u)
    names = {u.name for u in units}
    anchored = set()
    for stage, first in firsts.items():
        inside = {n for n in nodes if first.name in (n.meta.get("nn_module_stack") or {})}
        feeds = [a for n in inside for a in n.all_input_nodes if a not in inside]
        if not feeds:
            continue
        meta = feeds[0].meta.get("tensor_meta")
        if meta is None or "x".join(str(d) for d in meta.shape[1:]) != stage:
            continue
        parent, depth = first.name.rpartition(".")[0], first.name.count(".")
        for path in feeds[0].meta.get("nn_module_stack") or {}:
            if path.count(".") == depth and path.rpartition(".")[0] == parent and path not in names:
                anchored.add(stage)
    return anchored


def units_by_name(units: list[Unit], names: list[str]) -> list[Unit]:
    """Look units up by name; unknown names are an InputError naming the known ones."""
    table = {u.name: u for u in units}
    missing = [n for n in names if n not in table]
    if missing:
        msg = f"unknown unit(s) {', '.join(missing)}; removable units: {', '.join(table)}"
        raise InputError(msg)
    return [table[n] for n in names]
