"""Linearise a block and merge it into one conv (the DepthShrinker / EGP step; RepVGG for the shortcut).

The block's captured graph (graph/capture.py: torch.export, so any module works, no per-
architecture tables; torch.fx where no input shape is known) must become linear ops from
one input to one output once its activations are removed: Conv2d, BatchNorm2d, Identity
/ Dropout (eval), and additions (residual shortcuts, the identity folded into the kernel
centre, a projection added as a parallel branch). Activations at the very end (after the
residual add) stay, applied to the merged conv's output; every other activation is
removed. Anything else (pooling, squeeze-excite's multiply, concatenation) refuses the
merge, naming the node.

The merge is checked against the *linearised* block (activations removed, trailing
ones kept): interior within MERGE_RTOL, the border ring's error reported.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from compressor.errors import CompressorError, InputError, MergeRefused, ValidationError
from compressor.graph.activations import ACTIVATION_BUILDERS, activation_of, is_add, trace_fx
from compressor.graph.capture import capture
from compressor.rewrite.compose import MERGE_RTOL, Merged, add_identity, add_parallel, as_merged, bn_as_conv, compose

PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d)  # no-ops in eval mode


@dataclass(frozen=True)
class MergedBlock:
    """The single-conv replacement of a block.

    module: the conv, or nn.Sequential(conv, *activations kept after it);
    merged: the conv with its exactness and border (output pixels that may differ);
    linearised: graph nodes of the activations removed; post: activation nodes kept.
    """

    module: nn.Module
    merged: Merged
    linearised: tuple[str, ...]
    post: tuple[str, ...]

    @property
    def exact(self) -> bool:
        return self.merged.exact

    @property
    def border(self) -> int:
        return self.merged.border


@dataclass(frozen=True)
class MergeCheck:
    """Merged block vs its linearised original on one input.

    interior_rel: max |merged - linearised| / max |linearised| inside the border ring;
    border_abs, border_rel: the same maximum on the ring (absolute, and relative to the
    interior's max |linearised|); 0 when the merge is exact (no ring).
    """

    interior_rel: float
    border_abs: float
    border_rel: float
    border: int
    tolerance: float = MERGE_RTOL


@dataclass
class _Plan:
    graph: fx.GraphModule
    post: list[fx.Node]
    linearised: list[fx.Node]


def _activation(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """units.activation_of, but a function call with arguments other than `inplace` is not
    taken as a plain activation (e.g. gelu(approximate=...)): the merge stays conservative."""
    if node.op == "call_function" and set(node.kwargs) - {"inplace"}:
        return None
    return activation_of(node, modules)


def _captured(block: nn.Module, input_shape: Sequence[int] | None) -> fx.GraphModule:
    """A captured copy of `block` (eval mode): on an input of `input_shape` (C, H, W), else by torch.fx."""
    copied = copy.deepcopy(block).eval()
    try:
        if input_shape is not None:
            return capture(copied, torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0)))
        return trace_fx(copied)
    except CompressorError as e:
        raise MergeRefused(f"cannot capture {type(block).__name__}: {e}") from e


def _plan(block: nn.Module, input_shape: Sequence[int] | None = None) -> _Plan:
    """Capture a copy of `block` (eval mode); find the trailing activations and the ones to remove."""
    gm = _captured(block, input_shape)
    modules = dict(gm.named_modules())
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    out = outputs[0].args[0] if len(outputs) == 1 else None
    if isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    if not isinstance(out, fx.Node):
        raise MergeRefused(f"{type(block).__name__} does not return a single tensor")
    post, node = [], out
    while _activation(node, modules) is not None:
        post.append(node)
        node = node.args[0]
    linearised = [n for n in gm.graph.nodes if n not in post and _activation(n, modules) is not None]
    return _Plan(gm, list(reversed(post)), linearised)


def _single_input(node: fx.Node) -> fx.Node:
    if len(node.args) != 1 or node.kwargs and set(node.kwargs) != {"inplace"} or not isinstance(node.args[0], fx.Node):
        raise MergeRefused(f"{node.name} takes arguments other than one tensor; cannot merge it")
    return node.args[0]


def _add(a: Merged | None, b: Merged | None, node: fx.Node) -> Merged:
    """Sum of two linear maps of the block input (None = the input itself)."""
    if a is None and b is None:
        raise MergeRefused(f"{node.name} adds the block input to itself; nothing to merge")
    if a is None or b is None:
        return add_identity(b if a is None else a)
    return add_parallel(a, b)


def _linear_map(plan: _Plan) -> Merged:
    """Walk the graph, keeping each node's value as one conv of the block input (None = the input)."""
    modules = dict(plan.graph.named_modules())
    maps: dict[fx.Node, Merged | None] = {}
    skip = set(plan.post)
    result: Merged | None = None
    for node in plan.graph.graph.nodes:
        if node in skip:
            continue
        try:
            if node.op == "placeholder":
                if maps:
                    raise MergeRefused(f"{node.name}: the block takes more than one input")
                maps[node] = None
            elif node.op == "output":
                out = node.args[0][0] if isinstance(node.args[0], (tuple, list)) else node.args[0]
                last = plan.post[0].args[0] if plan.post else out
                result = maps[last]
            elif node in plan.linearised or node.op == "call_module" and isinstance(modules[node.target],
                                                                                    PASS_THROUGH):
                maps[node] = maps[_single_input(node)]
            elif node.op == "call_module" and type(modules[node.target]) in (nn.Conv2d, nn.BatchNorm2d):
                module = modules[node.target]
                op = module if type(module) is nn.Conv2d else bn_as_conv(module)
                src = maps[_single_input(node)]
                maps[node] = as_merged(op) if src is None else compose(src, op)
            elif is_add(node) and len(node.args) == 2 and not node.kwargs and all(
                    isinstance(a, fx.Node) for a in node.args):
                maps[node] = _add(maps[node.args[0]], maps[node.args[1]], node)
            else:
                what = type(modules[node.target]).__name__ if node.op == "call_module" else str(node.target)
                raise MergeRefused(f"{node.name} ({what}) is not a conv, BatchNorm, activation, identity or "
                                   "addition; it does not merge into a conv")
        except MergeRefused as e:
            if e.reason.startswith(f"{node.name}"):
                raise
            raise MergeRefused(f"{node.name}: {e.reason}") from e
    if result is None:
        raise MergeRefused("the block has no conv or BatchNorm to merge")
    return result


def merge_block(block: nn.Module, input_shape: Sequence[int] | None = None) -> MergedBlock:
    """`block` (eval mode, activations inside removed) as one conv, followed by its trailing activations;
    `input_shape` (C, H, W) is what the block is captured on (None: torch.fx traces it).

    MergeRefused names the node and why (e.g. squeeze-excite's multiply, a dilated conv).
    The result may be exact only away from the border: see `MergedBlock.border`.
    """
    plan = _plan(block, input_shape)
    merged = _linear_map(plan)
    modules = dict(plan.graph.named_modules())
    post: list[nn.Module] = []
    for node in plan.post:
        if node.op == "call_module":
            post.append(copy.deepcopy(modules[node.target]))
        else:
            post.append(ACTIVATION_BUILDERS[_activation(node, modules)]())
    module = merged.conv if not post else nn.Sequential(merged.conv, *post)
    return MergedBlock(module.eval(), merged, tuple(n.name for n in plan.linearised),
                       tuple(n.name for n in plan.post))


def linearise(block: nn.Module, input_shape: Sequence[int] | None = None) -> fx.GraphModule:
    """A captured copy of `block` (eval mode) with every activation removed except the trailing ones:
    what `merge_block` reproduces."""
    plan = _plan(block, input_shape)
    for node in plan.linearised:
        node.replace_all_uses_with(node.args[0])
        plan.graph.graph.erase_node(node)
    plan.graph.recompile()
    return plan.graph.eval()


@torch.no_grad()
def check_merge(original_block: nn.Module, merged: MergedBlock, x: torch.Tensor,
                rtol: float = MERGE_RTOL) -> MergeCheck:
    """Compare `merged` with the linearised `original_block` on `x`.

    ValidationError if the interior (inside the `merged.border` ring) differs by more than
    `rtol` of its max |value|, or the shapes differ; the border's error is reported, not
    bounded. InputError if `x` is too small to have an interior.
    """
    reference = linearise(original_block, tuple(x.shape[1:]))(x)
    got = merged.module.eval()(x)
    if got.shape != reference.shape:
        raise ValidationError(f"merged block gives shape {tuple(got.shape)}, the original {tuple(reference.shape)}")
    b = merged.border
    h, w = got.shape[-2:]
    if 2 * b >= min(h, w):
        raise InputError(f"output {h}x{w} is too small to have an interior inside a {b}-pixel border; "
                         "use a larger input")
    diff = (got - reference).abs()
    inner = (..., slice(b, h - b), slice(b, w - b))
    scale = reference[inner].abs().max().clamp_min(1e-12)
    interior_rel = float(diff[inner].max() / scale)
    ring = torch.ones(h, w, dtype=torch.bool, device=diff.device)
    ring[b:h - b, b:w - b] = False
    border_abs = float(diff[..., ring].max()) if b else 0.0
    if not interior_rel <= rtol:
        raise ValidationError(f"merged block differs from the linearised original by {interior_rel:.3g} of its "
                              f"range inside the {b}-pixel border (allowed {rtol:g})")
    return MergeCheck(interior_rel, border_abs, border_abs / float(scale), b, rtol)
