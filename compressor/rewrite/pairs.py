"""Merge adjacent convs of a whole model where the merge is exact and no more costly.

Two convs in a row with nothing between them (BatchNorms already folded to Identity)
merge into one when `compressor.merge.compose` calls the result exact (e.g. a kxk conv
followed by a 1x1) and the merged conv needs at most the multiply-adds of the pair
(per output pixel; the first conv runs s2h*s2w times per output pixel of the second).
A linear bottleneck (32 -> 16 -> 96 channels, 1x1 each) is a low-rank factorisation:
merging it would cost more, so it stays. Used by `compressor fold` (exact merges only).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import fx, nn

from compressor.errors import MergeRefused
from compressor.graph.activations import trace_fx
from compressor.graph.capture import capture
from compressor.rewrite.compose import compose, conv_macs


def _producer(node: fx.Node, model: nn.Module) -> fx.Node | None:
    """The node feeding `node` through Identity modules only, each used once; None if not a module call."""
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    prev = node.args[0]
    while prev.op == "call_module" and type(model.get_submodule(prev.target)) is nn.Identity:
        if len(prev.users) != 1 or not isinstance(prev.args[0], fx.Node):
            return None
        prev = prev.args[0]
    return prev if prev.op == "call_module" and len(prev.users) == 1 else None


def merge_exact_pairs(model: nn.Module, replace: Callable[[str, nn.Module], None],
                      example_input: torch.Tensor | None = None) -> list[tuple[str, str]]:
    """Merge conv -> conv pairs of `model` that compose exactly and cost no more; returns (first, second) names.

    `replace(name, module)` installs a module (the second conv becomes the merged conv, the
    first nn.Identity); chains merge left to right. The graph is captured on `example_input` (torch.fx
    reads it without one).
    """
    graph = (capture(model, example_input) if example_input is not None else trace_fx(model)).graph
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    merged: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or type(model.get_submodule(node.target)) is not nn.Conv2d:
            continue
        prev = _producer(node, model)
        if prev is None or type(model.get_submodule(prev.target)) is not nn.Conv2d:
            continue
        if calls[node.target] != 1 or calls[prev.target] != 1:
            continue
        first, second = model.get_submodule(prev.target), model.get_submodule(node.target)
        try:
            result = compose(first, second)
        except MergeRefused:
            continue
        stride = second.stride[0] * second.stride[1]
        if not result.exact or conv_macs(result.conv) > conv_macs(first) * stride + conv_macs(second):
            continue
        replace(node.target, result.conv)
        replace(prev.target, nn.Identity())
        merged.append((prev.target, node.target))
    return merged
