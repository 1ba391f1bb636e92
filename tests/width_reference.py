"""The reference a width unit's surgery must equal: the model with the dropped channels zeroed.

Written independently of compressor/graph/slim.py's own check (which zeroes the consumers'
weight columns): here forward pre-hooks zero the dropped channels of the *activations*
where every dense layer of the group reads them (Torch-Pruning's in-channel dependencies),
and nothing is pruned.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from compressor.graph.units import Unit

DENSE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _zeroing_hook(dropped: list[int], means: Sequence[float] | None = None):
    index = torch.tensor(dropped)

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else x.dim() - 1
        if means is None:
            x.index_fill_(dim, index, 0.0)
        else:  # each dropped channel reads as its mean
            shape = [1] * x.dim()
            shape[dim] = len(dropped)
            x.index_copy_(dim, index, torch.tensor([means[i] for i in dropped], dtype=x.dtype).view(shape)
                          .expand(*[x.shape[d] if d != dim else len(dropped) for d in range(x.dim())]).contiguous())
        return (x, *args[1:])

    return hook


def width_muted(model: nn.Module, units: Sequence[Unit]) -> nn.Module:
    """A copy of `model` whose width units' dropped channels read as zero in every dense layer of their group, or
    as their mean where the unit's Slim has a `fill` for that layer."""
    import torch_pruning as tp

    reference = copy.deepcopy(model).eval()
    for unit in units:
        block = reference.get_submodule(unit.path)
        x = torch.randn(2, *unit.input_shape)
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(block, x, verbose=False)
        fill = dict(unit.slim.fill)
        names = {m: n for n, m in block.named_modules()}
        for root, channels, keep in zip(unit.slim.roots, unit.slim.channels, unit.slim.keep, strict=True):
            module = block.get_submodule(root)
            dropped = sorted(set(range(channels)) - set(keep))
            group = graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, dropped)
            for dep, idxs in group:
                layer = dep.target.module
                if (graph.is_in_channel_pruning_fn(dep.handler) and isinstance(layer, DENSE)
                        and getattr(layer, "groups", 1) == 1):
                    layer.register_forward_pre_hook(_zeroing_hook(list(idxs), fill.get(names[layer])))
    return reference


def random_widths(options, rng) -> list[Unit]:
    """A random width unit for about half of `options` (graph/width.py): a random level, random channels kept."""
    from compressor.graph.width import LEVELS, width_unit

    chosen = []
    for option in options:
        if rng.random() < 0.5:
            continue
        level = rng.choice(LEVELS)
        counts = [max(1, min(g.channels - 1, round(g.channels * level))) for g in option.groups]
        keep = tuple(tuple(sorted(rng.sample(range(g.channels), k)))
                     for g, k in zip(option.groups, counts, strict=True))
        chosen.append(width_unit(option, level, keep))
    return chosen
