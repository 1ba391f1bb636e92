"""The reference a width unit's surgery must equal: the model with the dropped channels zeroed, or read as
their means where the unit carries them.

Written independently of compressor/graph/slim.py's own check (which zeroes the consumers'
weight columns and puts the means into their biases): here forward pre-hooks set the dropped
channels of the *activations* where every dense layer of the group reads them (Torch-Pruning's
in-channel dependencies; for an attention's dropped heads, the inputs of its output projection
that those heads write) to zero or to their means, and nothing is pruned. A mean-filled
channel reads as that constant at a zero-padded conv's border too (the hook pads).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from compressor.graph.units import Unit

DENSE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _explicit_padding(layer: nn.Module) -> list[int] | None:
    """F.pad's amounts (last dimension first) for `layer`'s own zero padding, or None where it pads nothing."""
    if not isinstance(layer, nn.modules.conv._ConvNd) or layer.padding_mode != "zeros":
        return None
    if layer.padding == "valid":
        return None
    pads: list[int] = []
    for d in reversed(range(len(layer.kernel_size))):
        if layer.padding == "same":  # what torch pads for "same": the odd one on the right
            total = layer.dilation[d] * (layer.kernel_size[d] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [layer.padding[d], layer.padding[d]]
    return pads if any(pads) else None


def _reading_hook(layer: nn.Module, dropped: list[int], means: Sequence[float] | None):
    """A pre-hook setting `dropped` input channels to zero, or to their `means`. With means, a zero-padded conv
    pads here instead (its own padding set to 0) with each dropped channel's mean: the channel reads as a
    constant everywhere, the border too, which is what a mean carried in the bias computes."""
    index = torch.tensor(dropped)
    conv = isinstance(layer, nn.modules.conv._ConvNd)
    pads = _explicit_padding(layer) if means is not None else None
    if pads is not None:
        layer.padding = (0,) * len(layer.kernel_size)

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        dim = 1 if conv else x.dim() - 1
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        kept = torch.ones(x.shape[dim], dtype=x.dtype)
        kept[index] = 0.0
        value = torch.zeros(x.shape[dim], dtype=x.dtype)
        if means is not None:
            value[index] = torch.tensor([means[i] for i in dropped], dtype=x.dtype)
        value = value.view(shape)
        x = x * kept.view(shape) + value
        if pads is not None:
            x = torch.nn.functional.pad(x - value, pads) + value
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
        dropped_at: dict[nn.Module, set[int]] = {}
        for root, channels, keep in zip(unit.slim.roots, unit.slim.channels, unit.slim.keep, strict=True):
            module = block.get_submodule(root)
            dropped = sorted(set(range(channels)) - set(keep))
            if not isinstance(module, DENSE):  # an attention slimmed by heads: its heads' inputs to proj
                size = module.proj.in_features // channels
                columns = [h * size + i for h in dropped for i in range(size)]
                dropped_at.setdefault(module.proj, set()).update(columns)
                continue
            group = graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, dropped)
            for dep, idxs in group:
                layer = dep.target.module
                if (graph.is_in_channel_pruning_fn(dep.handler) and isinstance(layer, DENSE)
                        and getattr(layer, "groups", 1) == 1):
                    dropped_at.setdefault(layer, set()).update(idxs)
        for layer, dropped in dropped_at.items():
            layer.register_forward_pre_hook(_reading_hook(layer, sorted(dropped), fill.get(names[layer])))
    return reference


def random_fill(block: nn.Module, rng) -> tuple:
    """Random means (standard normal) for every input channel of every dense layer in `block`: a Slim's fill."""
    fill = []
    for name, layer in block.named_modules():
        if isinstance(layer, DENSE) and getattr(layer, "groups", 1) == 1:
            inputs = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
            fill.append((name, tuple(rng.gauss(0.0, 1.0) for _ in range(inputs))))
    return tuple(fill)


def random_widths(options, rng, model: nn.Module | None = None) -> list[Unit]:
    """A random width unit for about half of `options` (graph/width.py): a random level, random channels kept;
    given the `model`, about half of them read their dropped channels as random means (random_fill)."""
    from compressor.graph.width import LEVELS, width_unit

    chosen = []
    for option in options:
        if rng.random() < 0.5:
            continue
        level = rng.choice(LEVELS)
        counts = [max(1, min(g.channels - 1, round(g.channels * level))) for g in option.groups]
        keep = tuple(tuple(sorted(rng.sample(range(g.channels), k)))
                     for g, k in zip(option.groups, counts, strict=True))
        filled = model is not None and rng.random() < 0.5
        fill = random_fill(model.get_submodule(option.unit.path), rng) if filled else ()
        chosen.append(width_unit(option, level, keep, fill=fill))
    return chosen
