"""Entropy-guided importance (EGP, Liao et al. 2023): how often each rectifier is on.

For every activation node (ReLU-like module or function) the input is tapped;
per channel p = share of positive values over batch and spatial positions,
H(p) = -(p log2 p + (1 - p) log2 (1 - p)) bits, layer entropy = mean over
channels. H = 0: the activation is always on (linear) or always off (dead).
A unit's importance is the mean entropy of the activations inside it (0 if it
has none; a transformer branch's are those of the modules on the branch, e.g. the
MLP's GELU, whose share of positive inputs is read like a rectifier's, as EGP does
on Swin-T): low entropy marks a block that is nearly linear, hence removable or
foldable. `activation_entropies` exposes the per-activation values, which the
folding work uses to pick activations to linearise.

Cost: 1 forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx, nn
from torch.utils.data import DataLoader

from compressor.compute.group import World
from compressor.criteria.registry import ScoringContext, register
from compressor.graph.activations import activation_of
from compressor.graph.capture import capture
from compressor.graph.prefix import _subgraph


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) in bits, with H(0) = H(1) = 0."""
    p = p.double()
    q = 1 - p
    terms = torch.where(p > 0, -p * torch.log2(p.clamp_min(1e-300)), 0.0)
    return terms + torch.where(q > 0, -q * torch.log2(q.clamp_min(1e-300)), 0.0)


RECTIFIERS = ("relu", "relu6")
# gated activations that are near zero for negative inputs and near the identity for positive ones: the share
# of positive inputs says how often they pass, as for a rectifier (EGP measures GELU layers of Swin-T this way)
GATES = ("gelu", "silu", "hardswish")


def _activation_nodes(gm: fx.GraphModule, kinds: tuple[str, ...]) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if activation_of(n, modules) in kinds and len(n.all_input_nodes) == 1]


def _channel_dim(node: fx.Node, gm: fx.GraphModule) -> int:
    """Where an activation's channels are: last for tokens (after a Linear or LayerNorm), else dimension 1."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Linear, nn.LayerNorm)):
        return -1
    return 1


def _node_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


@torch.no_grad()
def activation_entropies(model: nn.Module, loader: DataLoader | Iterable, kinds: tuple[str, ...] = RECTIFIERS,
                         group: World | None = None) -> dict[str, dict]:
    """Per rectifier: {"entropy": mean bits over channels, "unit_path": module path, "channels": C}.

    Keys are module paths (call_module) or fx node names (functional calls); a
    module called twice (e.g. torchvision's shared `relu`) appears under each call's node name.
    In a process `group`, `loader` is this rank's share and the counts are summed over the ranks.
    """
    example = next(iter(loader))[0]
    gm = capture(model.eval(), example)
    nodes = _activation_nodes(gm, kinds)
    if not nodes:
        return {}
    calls: dict[str, int] = {}
    for n in nodes:
        calls[_node_name(n)] = calls.get(_node_name(n), 0) + 1
    names = [_node_name(n) if calls[_node_name(n)] == 1 else n.name for n in nodes]
    tap = _subgraph(gm, None, [n.all_input_nodes[0] for n in nodes])
    channel_dims = [_channel_dim(n.all_input_nodes[0], gm) for n in nodes]
    positive: list[torch.Tensor | None] = [None] * len(nodes)
    counts = [0] * len(nodes)
    for x, *_ in loader:
        for i, pre in enumerate(tap(x)):
            dim = channel_dims[i] % pre.dim() if pre.dim() > 1 else 0
            flat = pre.movedim(dim, 0).reshape(pre.shape[dim], -1) if pre.dim() > 1 else pre.reshape(1, -1)
            on = (flat > 0).sum(1).double()
            positive[i] = on if positive[i] is None else positive[i] + on
            counts[i] += flat.shape[1]
    if group is not None:
        positive, counts = group.total((positive, counts))
    result = {}
    for name, node, on, count in zip(names, nodes, positive, counts, strict=True):
        stack = list(node.meta.get("nn_module_stack") or {})
        result[name] = {"entropy": float(binary_entropy(on / count).mean()), "channels": len(on),
                        "module_stack": stack}
    return result


@register("entropy", cost="1 forward pass")
def entropy_importance(ctx: ScoringContext) -> dict[str, float]:
    layers = activation_entropies(ctx.model, ctx.calibration, RECTIFIERS + GATES, ctx.group)
    scores = {}
    for unit in ctx.units:  # a branch: the activations in the modules on it ("blocks.3/mlp": blocks.3.mlp)
        keys = [f"{unit.path}.{m}" for m in unit.members] if unit.members else [unit.path]
        inside = [v["entropy"] for v in layers.values()
                  if any(k == key or k.startswith(key + ".") for k in v["module_stack"] for key in keys)]
        scores[unit.name] = sum(inside) / len(inside) if inside else 0.0
    return scores
