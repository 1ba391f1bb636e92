"""Find the removable units of a model in its captured graph (capture.py).

A unit is something the search may remove, found by what the graph computes, not
by architecture tables:

- a *block* whose forward is ``act(branch(x) + shortcut(x))`` with one addition,
  the shortcut the identity or a child module (a projection): removing it leaves
  ``act(shortcut(x))`` (kind "identity" or "projection", named by its module path,
  "layer2.0"; a ResNet block, a MobileNetV2 inverted residual, a bottleneck inside
  a C2f split-concat block, which then passes its input to the concat unchanged);
- a *branch* of a block with several residual additions or more than the addition
  (a pre-norm transformer block, ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``):
  any addition ``y = s + f(s)`` whose shortcut reads ``s`` or a projection of it
  (branches.py); removing it leaves ``y = s`` (kind "branch", named by the block's
  path and the branch's main child module, "blocks.3/attn");
- a whole multi-branch block whose branches are all removable (kind "block", named
  by its path), so the search can take both branches at once;
- a kept block or branch with fewer inner channels (kind "width", named by the block or
  branch and the level, "layer2.0@50%", "blocks.3/mlp@25%"; graph/width.py finds them,
  graph/slim.py makes them): the residual stream keeps its width.

Units of one block path are alternatives: the search takes at most one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn

from compressor.errors import InputError
from compressor.graph.activations import IDEMPOTENT_AFTER, SIGN_PRESERVING_MODULES, activation_of, is_add
from compressor.graph.branches import Branch, analyse_add, block_additions, branch_members, branch_name
from compressor.graph.capture import capture
from compressor.graph.nodes import outputs_of, tensor_inputs

MERGE_SUFFIX = "/merge"  # a merge unit's name: its block's path + this
BLOCK_KINDS = ("identity", "projection", "block")  # kinds whose removal takes the whole block out
LEVEL_MARK = "@"  # a width unit's name: its block (or branch) + this + the level, "layer2.0@50%"


@dataclass(frozen=True)
class Slim:
    """What a width unit keeps: for each coupled channel group of its block (Torch-Pruning's dependency graph,
    graph/width.py), the layer whose output channels root the group (its path relative to the block), the
    group's channel count, and the channel indices kept (ascending); `level`: the share of channels asked for
    (0.5), before the count was rounded to a measured channel step; `timed_share`: the share of the block's
    own latency the slimming saved where its channel counts were timed alone (latency/steps.py; None where
    untimed), which the latency model takes as a prior (not part of what the unit is: not compared); `fill`: per
    dense layer of the block (its path relative to the block), the mean of each of its input channels on
    calibration images, so that a dropped channel is replaced by its mean where that layer reads it (graph/slim.py);
    empty: dropped channels read as zero; `head_roots`: the roots that are attentions slimmed by whole heads
    (graph/heads.py), whose counts are heads, not channels (what the unit says of itself; surgery reads the module)."""

    roots: tuple[str, ...]
    channels: tuple[int, ...]
    keep: tuple[tuple[int, ...], ...]
    level: float
    timed_share: float | None = field(default=None, compare=False)
    fill: tuple[tuple[str, tuple[float, ...]], ...] = ()
    head_roots: tuple[str, ...] = field(default=(), compare=False)

    @property
    def kept(self) -> tuple[int, ...]:
        """The number of channels (or heads) each group keeps."""
        return tuple(len(k) for k in self.keep)

    def describe(self) -> str:
        """Each group's kept count of all, in its own unit: "attn 3 of 4 heads, mlp.fc1 96 of 128 channels"."""
        return ", ".join(f"{root} {k} of {c} {'heads' if root in self.head_roots else 'channels'}"
                         for root, k, c in zip(self.roots, self.kept, self.channels, strict=True))


@dataclass(frozen=True)
class Unit:
    """Something the search may remove: a residual block, one residual branch of a block, or (kind "merge")
    a block linearised and merged into one conv.

    name: "layer2.0" (a block), "blocks.3/attn" (a branch), "layer2.0/merge" (a merge unit);
    kind: "identity" or "projection" (a one-addition block removed to its shortcut), "branch", "block"
    (every branch of a multi-branch block), "merge", or "width" (the block kept with fewer inner channels,
    `slim` says which); shortcut: the projection's path relative to the
    block; post_add: activations after the addition that the replacement keeps; stage: the block's output
    shape, e.g. "32x16x16" (blocks of one stage share it); order: position in the graph; branches: which of
    the block's own additions (in graph order) a branch or block unit removes; members: the block's
    children and own parameters (relative names) that a branch or block unit removes with its branches;
    input_shape: the block's input shape without the batch dimension (what rebuilding it captures on).
    """

    name: str
    kind: str
    stage: str
    order: int
    shortcut: str | None = None
    post_add: tuple[str, ...] = ()
    anchored: bool = False  # its stage also has a block that is not a unit (that block always stays)
    branches: tuple[int, ...] = ()
    input_shape: tuple[int, ...] = ()
    members: tuple[str, ...] = ()
    slim: Slim | None = None  # kind "width": the channels it keeps

    @property
    def removable_to(self) -> str:
        if self.kind == "width" and self.slim is not None:
            return f"its block slimmed ({self.slim.describe()})"
        if self.kind == "merge":
            return "one merged convolution"
        if self.kind == "branch":
            return f"its block without the {self.name.partition('/')[2]} branch"
        if self.kind == "block":
            return "its block without any residual branch"
        return "its projection shortcut" if self.kind == "projection" else "identity"

    @property
    def path(self) -> str:
        """The block's module path."""
        return self.name.partition(LEVEL_MARK)[0].partition("/")[0]

    @property
    def acts_on(self) -> str:
        """The block or branch the unit acts on, without a width level: "blocks.3/mlp" for "blocks.3/mlp@25%"
        and for the branch unit "blocks.3/mlp" itself."""
        return self.name.partition(LEVEL_MARK)[0]

    @property
    def removes_block(self) -> bool:
        """Whether removing the unit takes its whole block out of its stage."""
        return self.kind in BLOCK_KINDS


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(d) for d in shape[1:]) if shape is not None else None


def _stage(node: fx.Node) -> str:
    shape = _shape(node)
    return "x".join(str(d) for d in shape) if shape is not None else "?"


def _producer_activation(gm: fx.GraphModule, block_nodes: list[fx.Node]) -> str | None:
    """The activation producing the block's input (through pooling, dropout and the like), if any."""
    modules = dict(gm.named_modules())
    source = tensor_inputs(block_nodes)[0]
    while (source.op == "call_module" and isinstance(modules[source.target], SIGN_PRESERVING_MODULES)
           and len(source.all_input_nodes) == 1):
        source = source.all_input_nodes[0]
    return activation_of(source, modules)


def find_units(model: nn.Module, example_input: torch.Tensor) -> list[Unit]:
    """Every removable unit of `model`, in graph order (module docstring).

    A post-add activation is dropped from a block's replacement when the block's input
    was produced by an activation that makes it a no-op (ReLU after ReLU), so
    an identity unit becomes a true nn.Identity.
    """
    return find_units_explained(model, example_input)[0]


def _post_add(add: fx.Node, out: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node] | None:
    """The activations from the addition to the block's output, or None if anything else is there."""
    chain, node = [], add
    while node is not out:
        users = list(node.users)
        if len(users) != 1 or activation_of(users[0], modules) is None:
            return None
        node = users[0]
        chain.append(node)
    return chain


def _one_addition_block(branch: Branch, block_nodes: list[fx.Node], source: fx.Node, out: fx.Node,
                        modules: dict[str, nn.Module]) -> list[fx.Node] | None:
    """The post-add activations if the block is exactly act(branch(x) + shortcut(x)) on its input, else None."""
    if branch.source is not source:
        return None
    post = _post_add(branch.add, out, modules)
    if post is None:
        return None
    covered = branch.nodes | branch.projection | {branch.add, *post}
    return post if set(block_nodes) == covered else None


def find_units_explained(model: nn.Module, example_input: torch.Tensor) -> tuple[list[Unit], dict[str, str]]:
    """(the units, as find_units; {module path: why it is not a unit} for every module with an addition
    that gave no unit)."""
    gm = capture(model, example_input)
    nodes = list(gm.graph.nodes)
    modules = dict(gm.named_modules())
    keys = {k for n in nodes for k in (n.meta.get("nn_module_stack") or {})}
    calls: dict[str, str] = {}  # call key -> path of every module whose own forward adds
    for n in nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if stack and is_add(n):
            key = next(reversed(stack))
            calls.setdefault(key, stack[key][0])
    units: list[Unit] = []
    rejected: dict[str, str] = {}
    for key, path in calls.items():
        if key != path or f"{path}@1" in keys:
            rejected.setdefault(path, "it is called more than once")
            continue
        found = _block_units(model, gm, nodes, modules, key, path, len(units))
        if isinstance(found, str):
            rejected[path] = found
        else:
            units += found
    anchored = _anchored_stages(units, nodes)
    return [replace(u, anchored=u.stage in anchored) for u in units], rejected


def _block_units(model: nn.Module, gm: fx.GraphModule, nodes: list[fx.Node], modules: dict[str, nn.Module],
                 key: str, path: str, order: int) -> list[Unit] | str:
    """The units of one block call (a one-addition block, or its branches and the whole block), or why none."""
    block_nodes = [n for n in nodes if key in (n.meta.get("nn_module_stack") or {})]
    inputs, outs = tensor_inputs(block_nodes), outputs_of(block_nodes)
    if len(inputs) != 1:
        return f"in the model it reads {len(inputs)} inputs, not one"
    if len(outs) != 1:
        return "in the model more than one of its values is read outside it"
    block = model.get_submodule(path)
    adds = block_additions(block_nodes, key)
    analysed = [analyse_add(a, set(block_nodes), block, key) for a in adds]
    valid = [(i, b) for i, b in enumerate(analysed) if isinstance(b, Branch)]
    if not valid:
        return next(r for r in analysed if isinstance(r, str))
    stage, input_shape = _stage(outs[0]), _shape(inputs[0]) or ()
    if len(adds) == 1:
        post_nodes = _one_addition_block(valid[0][1], block_nodes, inputs[0], outs[0], modules)
        if post_nodes is not None:
            branch = valid[0][1]
            post = tuple(activation_of(n, modules) for n in post_nodes)
            if not branch.projection and all((p, _producer_activation(gm, block_nodes)) in IDEMPOTENT_AFTER
                                             for p in post):
                post = ()
            kind = "projection" if branch.projection else "identity"
            return [Unit(path, kind, stage, order, branch.projection_child, post, branches=(0,),
                         input_shape=input_shape)]
    units, names, every = [], set(), set()
    for i, branch in valid:
        name = branch_name(branch, block, key, i)
        name = name if name not in names else f"{name}{i}"
        names.add(name)
        members = branch_members(branch, key, path)
        every |= set(members)
        units.append(Unit(f"{path}/{name}", "branch", stage, order + len(units), branch.projection_child,
                          branches=(i,), input_shape=input_shape, members=members))
    if len(valid) == len(adds) > 1:
        units.append(Unit(path, "block", stage, order + len(units), branches=tuple(range(len(adds))),
                          input_shape=input_shape, members=tuple(sorted(every))))
    return units


def _anchored_stages(units: list[Unit], nodes: list[fx.Node]) -> set[str]:
    """Stages whose first block unit is fed, at the stage's shape, by a sibling block that is not a
    unit (EfficientNet's and MobileNetV2's first, non-residual block of a stage), or by the module
    that holds it, computing at the stage's shape itself (a C2f or C3 splitting its cv1's output for
    its bottlenecks): that block or module survives any removal, so the stage keeps its layers even
    with all its units gone."""
    firsts: dict[str, Unit] = {}
    for u in units:
        if u.removes_block:
            firsts.setdefault(u.stage, u)
    paths = {u.path for u in units}
    anchored = set()
    for stage, first in firsts.items():
        inside = {n for n in nodes if first.path in (n.meta.get("nn_module_stack") or {})}
        feeds = [a for n in inside for a in n.all_input_nodes if a not in inside and a.op != "get_attr"]
        if not feeds or _stage(feeds[0]) != stage:
            continue
        parent, depth = first.path.rpartition(".")[0], first.path.count(".")
        stack = list(feeds[0].meta.get("nn_module_stack") or {})
        for key in stack:
            sibling = key.count(".") == depth and key.rpartition(".")[0] == parent
            # a container that computes the feed in its own forward, e.g. a C2f's chunk of cv1 feeding its
            # bottlenecks; not one that merely holds the feeding module (ConvNeXt's `features` holds its stem)
            container = key == stack[-1] and first.path.startswith(f"{key}.")
            if (sibling or container) and key not in paths:
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
