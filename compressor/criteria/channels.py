"""Channel importance within a block: which inner channels a width unit keeps (higher = keep).

A channel criterion maps a ChannelContext to, for every width option (graph/width.py)
and each of its channel groups, one score per channel; a width unit keeps the
highest-scoring channels of each group. They sit behind their own small registry,
beside the unit criteria's (registry.py), because they rank channels, not units:

- `peel`: PEEL (Hou et al. 2021) reallocates channels by how informative they are,
  measured as in network slimming, which its code builds on: the BatchNorm scaling
  factor |gamma| of each channel, averaged over the group's BatchNorms. A group
  without a BatchNorm (a transformer's MLP) is scored by what each channel adds to
  its consumers on the calibration images: mean |activation| times the norm of the
  consumer's weights that read it; an attention head by the sum of that over the
  columns of the output projection it writes.
- `magnitude`, `magnitude_l2`: the L1 (L2) norm of every weight the channel owns in the
  group (producer rows, consumer columns), Torch-Pruning's group magnitude; a head's
  are its q, k and v rows and its output projection columns.
- `taylor`: sum of |w * dL/dw| over those weights, gradients of cross-entropy on the
  calibration labels (Molchanov et al. 2019), Torch-Pruning's group Taylor.
- `random`: a seeded draw, the baseline.

The unit criterion a prune runs with chooses its channel criterion by default
(CHANNEL_CRITERION_FOR); `--channel-criterion` overrides it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from compressor.criteria.registry import NamedFunctions
from compressor.errors import InputError
from compressor.graph.heads import head_count, head_dim, head_sums
from compressor.graph.slim import block_input, dense_inputs, dependency_graph, group_of
from compressor.graph.width import WidthOption

# the unit criterion's own channel criterion (the rest use PEEL's)
CHANNEL_CRITERION_FOR = {"magnitude": "magnitude", "magnitude_l2": "magnitude_l2", "taylor": "taylor",
                         "random": "random"}


@dataclass
class ChannelContext:
    """What a channel criterion may use: the model, the width options, calibration batches, a seed."""

    model: nn.Module
    options: list[WidthOption]
    calibration: DataLoader | list
    seed: int = 0


ChannelScores = dict[str, list[torch.Tensor]]  # option name -> one score per channel, for each of its groups
ChannelCriterion = Callable[[ChannelContext], ChannelScores]
_CHANNEL_CRITERIA: NamedFunctions[ChannelCriterion] = NamedFunctions("channel criterion")
CHANNEL_CRITERIA = _CHANNEL_CRITERIA.functions
CHANNEL_COSTS = _CHANNEL_CRITERIA.costs
register_channel = _CHANNEL_CRITERIA.register
get_channel_criterion = _CHANNEL_CRITERIA.get


def channel_criterion_for(criterion: str, channel_criterion: str | None = None) -> str:
    """The channel criterion a prune with unit criterion `criterion` uses (`channel_criterion` if given)."""
    return channel_criterion or CHANNEL_CRITERION_FOR.get(criterion, "peel")


def _attention(model: nn.Module, option: WidthOption, index: int) -> nn.Module | None:
    """The attention whose heads the option's group `index` keeps (None: a channel group)."""
    module = model.get_submodule(option.unit.path).get_submodule(option.groups[index].root)
    return module if head_count(module) is not None else None


def _groups(model: nn.Module, option: WidthOption):
    """Torch-Pruning's groups of the option's roots, on the model's own block (all channels); None for a group
    of heads, which Torch-Pruning does not slim (graph/heads.py)."""
    block = model.get_submodule(option.unit.path)
    if all(_attention(model, option, i) is not None for i in range(len(option.groups))):
        return [None] * len(option.groups)
    graph = dependency_graph(block, block_input(option.unit.input_shape))
    return [None if _attention(model, option, i) is not None else group_of(graph, block, g.root, range(g.channels))
            for i, g in enumerate(option.groups)]


HeadImportance = Callable[[nn.Module], torch.Tensor | None]  # an attention -> one score per head (None: none)


def _tp_scores(ctx: ChannelContext, importance, heads: HeadImportance) -> ChannelScores:
    """Every group's scores: Torch-Pruning's `importance` of a channel group, `heads` of a group of heads."""
    scores: ChannelScores = {}
    for option in ctx.options:
        found = []
        for i, (spec, group) in enumerate(zip(option.groups, _groups(ctx.model, option), strict=True)):
            value = importance(group) if group is not None else heads(_attention(ctx.model, option, i))
            found.append(torch.zeros(spec.channels) if value is None else value.detach().float().cpu())
        scores[option.name] = found
    return scores


def _head_magnitude(p: int) -> HeadImportance:
    """Per head: the sum of |w|^p over its q, k and v rows of qkv and its columns of proj (Torch-Pruning's group
    magnitude, taken over whole heads)."""
    return lambda a: head_sums(a, a.qkv.weight.detach().abs().pow(p), a.proj.weight.detach().abs().pow(p))


def _head_taylor(a: nn.Module) -> torch.Tensor | None:
    """Per head: the sum of |w * dL/dw| over its q, k and v rows and its proj columns."""
    if a.qkv.weight.grad is None or a.proj.weight.grad is None:
        return None
    return head_sums(a, (a.qkv.weight * a.qkv.weight.grad).abs(), (a.proj.weight * a.proj.weight.grad).abs())


@register_channel("magnitude", cost="no forward pass (weights only)")
def magnitude_channels(ctx: ChannelContext) -> ChannelScores:
    from torch_pruning.pruner.importance import GroupMagnitudeImportance

    return _tp_scores(ctx, GroupMagnitudeImportance(p=1, normalizer=None), _head_magnitude(1))


@register_channel("magnitude_l2", cost="no forward pass (weights only)")
def magnitude_l2_channels(ctx: ChannelContext) -> ChannelScores:
    from torch_pruning.pruner.importance import GroupMagnitudeImportance

    return _tp_scores(ctx, GroupMagnitudeImportance(p=2, normalizer=None), _head_magnitude(2))


@register_channel("taylor", cost="1 forward + 1 backward pass")
def taylor_channels(ctx: ChannelContext) -> ChannelScores:
    from torch.nn import functional as F
    from torch_pruning.pruner.importance import GroupTaylorImportance

    from compressor.metrics.outputs import first_logits

    model = ctx.model.eval()
    model.zero_grad(set_to_none=True)
    try:
        for x, y in ctx.calibration:  # gradients summed over the calibration set
            F.cross_entropy(first_logits(model(x), why="taylor"), y, reduction="sum").backward()
        return _tp_scores(ctx, GroupTaylorImportance(normalizer=None), _head_taylor)
    finally:
        model.zero_grad(set_to_none=True)


@register_channel("random", cost="none")
def random_channels(ctx: ChannelContext) -> ChannelScores:
    g = torch.Generator().manual_seed(ctx.seed)
    return {o.name: [torch.rand(grp.channels, generator=g) for grp in o.groups] for o in ctx.options}


@register_channel("peel", cost="1 forward pass (none where every group has a BatchNorm)")
def peel_channels(ctx: ChannelContext) -> ChannelScores:
    from torch_pruning.pruner.importance import BNScaleImportance

    scores = _tp_scores(ctx, BNScaleImportance(normalizer=None), lambda _: None)  # heads have no BatchNorm
    missing = [(o, i) for o in ctx.options for i, s in enumerate(scores[o.name]) if not s.any()]
    if missing:
        contributions = _contributions(ctx, missing)
        for (option, i), value in zip(missing, contributions, strict=True):
            scores[option.name][i] = value
    return scores


def _consumers(model: nn.Module, option: WidthOption, index: int) -> list[nn.Module]:
    """The dense layers that read the group's channels (its in-channel dependencies; an attention's proj)."""
    attention = _attention(model, option, index)
    if attention is not None:
        return [attention.proj]
    block = model.get_submodule(option.unit.path)
    graph = dependency_graph(block, block_input(option.unit.input_shape))
    group = group_of(graph, block, option.groups[index].root, range(option.groups[index].channels))
    return [module for module, _ in dense_inputs(graph, group)]


@torch.no_grad()
def _contributions(ctx: ChannelContext, wanted: list[tuple[WidthOption, int]]) -> list[torch.Tensor]:
    """Per group: mean |input channel| of its consumers on the calibration images times the L2 norm of the
    consumer weights reading it, summed over consumers."""
    totals: list[torch.Tensor | None] = [None] * len(wanted)
    handles = []
    for k, (option, index) in enumerate(wanted):
        for layer in _consumers(ctx.model, option, index):
            norm = layer.weight.transpose(0, 1).flatten(1).norm(dim=1)

            def hook(module, args, k=k, norm=norm) -> None:
                a = args[0]
                dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else a.dim() - 1
                mean = a.abs().movedim(dim, 0).flatten(1).mean(1)
                value = mean[: len(norm)] * norm if mean.shape[0] == norm.shape[0] else torch.zeros_like(norm)
                totals[k] = value if totals[k] is None else totals[k] + value

            handles.append(layer.register_forward_pre_hook(hook))
    try:
        for x, *_ in ctx.calibration:
            ctx.model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    found = []
    for total, (option, i) in zip(totals, wanted, strict=True):
        attention = _attention(ctx.model, option, i)
        if total is None:
            total = torch.zeros(option.groups[i].channels)
        elif attention is not None:  # per input column of proj -> per head
            total = total.view(head_count(attention), head_dim(attention)).sum(1)
        found.append(total)
    return found


def rank_channels(name: str, ctx: ChannelContext) -> ChannelScores:
    """Every option's channel scores under channel criterion `name` (higher = keep)."""
    scores = get_channel_criterion(name)(ctx)
    for option in ctx.options:
        for spec, value in zip(option.groups, scores[option.name], strict=True):
            if value.shape != (spec.channels,):
                msg = f"channel criterion {name} gave {tuple(value.shape)} scores for {spec.channels} channels"
                raise InputError(msg)
    return scores


def kept_channels(scores: torch.Tensor, count: int) -> tuple[int, ...]:
    """The `count` highest-scoring channels, ascending (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return tuple(sorted(order[:count]))
