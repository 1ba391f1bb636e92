"""Width options: which inner channels of a kept block or branch may shrink, and width units at levels.

For every residual unit the search may keep (a one-addition block, one branch of a
multi-branch block) the block is traced alone by Torch-Pruning's dependency graph
(graph/slim.py), and each group of coupled channels rooted at a conv or linear layer
is an inner group of the unit when:

- it never reaches the block's output (the residual stream keeps its width) and lies
  on the unit's branch (not in the projection shortcut, not in the other branch);
- it holds no grouped convolution other than a depthwise one (a grouped conv drops
  channels only in whole groups);
- slimming it to half its channels equals muting them (graph/slim.py): a group whose
  channels a LayerNorm or an attention's head size couples fails here, with the reason.

A ResNet basic block has one inner group (conv1's outputs), a bottleneck two, an
inverted residual one (the expansion, through its depthwise conv), a transformer's
MLP branch one (the hidden size). A width unit slims every inner group of its unit
to one level (a share of the channels, rounded to a measured channel step:
latency/steps.py): "layer2.0@50%", "blocks.3/mlp@25%". It has its block's path, so
the search takes at most one of {remove the block, remove a branch, slim to a level}.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from compressor.errors import CompressorError
from compressor.graph.capture import structure_key
from compressor.graph.heads import attention_paths, attention_qkv_layers, head_count
from compressor.graph.slim import block_input, dependency_graph, slim_error, slim_in_place
from compressor.graph.units import LEVEL_MARK, Slim, Unit

LEVELS = (0.75, 0.5, 0.25)  # shares of a group's channels the width units keep, before rounding to a step
CHECK_LEVEL = 0.5  # the share kept when a group is checked against the muted reference
CACHE_SIZE = 256  # blocks' checked groups kept per process, by the block's structure
ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class WidthGroup:
    """A group of coupled inner channels: `root` (a layer's path relative to the block) roots it, `channels`
    of them; `layers`: the layers whose weights it prunes; `heads`: the group is an attention's whole heads
    (root: the attention's path; channels: its head count)."""

    root: str
    channels: int
    layers: tuple[str, ...]
    heads: bool = False


@dataclass(frozen=True)
class WidthOption:
    """A unit the search may keep slimmer: `unit` (the block or branch unit it slims) and its inner groups."""

    unit: Unit
    groups: tuple[WidthGroup, ...]

    @property
    def name(self) -> str:
        """The block's (or branch's) name, which the width units' names extend: "blocks.3/mlp"."""
        return self.unit.name


def level_name(option_name: str, level: float) -> str:
    """A width unit's name: "layer2.0@50%"."""
    return f"{option_name}{LEVEL_MARK}{round(level * 100)}%"


def width_unit(option: WidthOption, level: float, keep: tuple[tuple[int, ...], ...],
               timed_share: float | None = None, fill: tuple = ()) -> Unit:
    """The width unit of `option` keeping channels `keep` (one tuple per group) at `level` (`timed_share`, `fill`:
    Slim's)."""
    unit = option.unit
    slim = Slim(tuple(g.root for g in option.groups), tuple(g.channels for g in option.groups),
                tuple(tuple(sorted(k)) for k in keep), level, timed_share, fill,
                tuple(g.root for g in option.groups if g.heads))
    return Unit(level_name(option.name, level), "width", unit.stage, unit.order, unit.shortcut,
                input_shape=unit.input_shape, members=unit.members, slim=slim)


def _grouped(module: nn.Module) -> bool:
    groups = getattr(module, "groups", 1)
    return groups > 1 and groups != getattr(module, "in_channels", groups)


def _on_branch(unit: Unit, layers: list[str]) -> bool:
    if unit.kind == "branch":
        return all(name.split(".")[0] in unit.members for name in layers)
    if unit.shortcut:
        return not any(name == unit.shortcut or name.startswith(unit.shortcut + ".") for name in layers)
    return True


def _groups(block: nn.Module, unit: Unit) -> tuple[list[WidthGroup], str | None]:
    """The unit's inner groups (candidates, not yet checked) and, where there are none, why."""
    from torch_pruning import ops

    graph = dependency_graph(block, block_input(unit.input_shape))
    names = {m: n for n, m in block.named_modules()}
    found, reasons = _head_groups(block, unit), []
    in_heads = {layer for g in found for layer in g.layers}
    attentions = attention_qkv_layers(block)
    reasons += [f"{path}: an attention whose heads this surgery does not slim (it needs Linear qkv and proj and a "
                "head count attribute)" for path in attentions
                if path not in {g.root for g in found} and _on_branch(unit, [f"{path}.qkv"])
                and (head_count(block.get_submodule(path)) or 0) != 1]
    for group in graph.get_all_groups(root_module_types=ROOT_TYPES, ignored_layers=list(attentions.values())):
        nodes = [dep.target for dep, _ in group]
        if any(isinstance(n.module, ops._OutputOp) for n in nodes):
            continue  # the group reaches the block's output: the residual stream
        modules = [n.module for n in nodes if isinstance(n.module, nn.Module) and n.module in names]
        layers = list(dict.fromkeys(names[m] for m in modules if any(True for _ in m.parameters(recurse=False))))
        if not _on_branch(unit, layers) or in_heads.intersection(layers):
            continue  # another branch's, or an attention's inner width (slimmed by whole heads)
        if any(_grouped(m) for m in modules):
            reasons.append(f"{layers[0]}: a grouped convolution couples its channels in groups")
            continue
        roots = [names[dep.target.module] for dep, _ in group if isinstance(dep.target.module, ROOT_TYPES)
                 and graph.is_out_channel_pruning_fn(dep.handler) and not _depthwise(dep.target.module)]
        if not roots:
            continue
        root = min(roots, key=list(names.values()).index)
        module = block.get_submodule(root)
        channels = getattr(module, "out_channels", getattr(module, "out_features", 0))
        if channels < 2:
            reasons.append(f"{root}: {channels} channel")
            continue
        found.append(WidthGroup(root, channels, tuple(layers)))
    found.sort(key=lambda g: list(names.values()).index(g.root))
    why = None if found else ("; ".join(reasons) or "every channel group of its branch reaches the block's output "
                              "(the residual stream, whose width is never cut)")
    return found, why


def _head_groups(block: nn.Module, unit: Unit) -> list[WidthGroup]:
    """A group of whole heads (graph/heads.py) for each multi-head attention on the unit's branch with 2+ heads."""
    found = []
    for path, heads in attention_paths(block).items():
        layers = [f"{path}.qkv", f"{path}.proj"]
        if heads >= 2 and _on_branch(unit, layers):
            found.append(WidthGroup(path, heads, tuple(layers), heads=True))
    return found


def _depthwise(module: nn.Module) -> bool:
    groups = getattr(module, "groups", 1)
    return groups > 1 and groups == getattr(module, "in_channels", None) == getattr(module, "out_channels", None)


def _check(block: nn.Module, unit: Unit, group: WidthGroup) -> str | None:
    """Why slimming `group` alone to CHECK_LEVEL is not what muting those channels computes (None: it is)."""
    import copy

    count = max(1, round(group.channels * CHECK_LEVEL))
    keep = tuple(range(0, group.channels, 2))[:count] if count * 2 <= group.channels else tuple(range(count))
    slim = Slim((group.root,), (group.channels,), (keep,), CHECK_LEVEL)
    try:
        error = slim_error(block, slim_in_place(copy.deepcopy(block), unit.input_shape, slim), unit.input_shape, slim)
    except CompressorError as e:
        return str(e)
    except Exception as e:  # a slimmed block that does not even run (a size computed from another width)
        return f"slimmed, it fails: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not error <= 1e-5:
        return (f"slimmed, it differs from the block with those channels muted by {error:.3g} of its range "
                "(something between the layers mixes the channels, e.g. a LayerNorm over them)")
    return None


_CACHE: OrderedDict[tuple, tuple[tuple[WidthGroup, ...], str | None]] = OrderedDict()


def inner_groups(block: nn.Module, unit: Unit) -> tuple[tuple[WidthGroup, ...], str | None]:
    """The unit's inner groups that slim exactly, and why the others (or all) are left out (None: none is).
    Cached by the block's structure, so the blocks of a stage are traced once."""
    key = (structure_key(block, tuple(unit.input_shape)), unit.kind, unit.members, unit.shortcut)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    try:
        groups, why = _groups(block, unit)
    except Exception as e:  # Torch-Pruning cannot trace the block
        groups, why = [], f"Torch-Pruning cannot trace it: {type(e).__name__}: {str(e).splitlines()[0]}"
    checked, problems = [], []
    for group in groups:
        problem = _check(block, unit, group)
        if problem is None:
            checked.append(group)
        else:
            problems.append(f"{group.root}: {problem}")
    result = tuple(checked), ("; ".join(problems) or why) if problems or not checked else None
    _CACHE[key] = result
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def find_width_options(model: nn.Module, units: list[Unit]) -> tuple[list[WidthOption], dict[str, str]]:
    """A WidthOption for every block or branch unit with an inner group that slims exactly; and, by unit name,
    why a unit has none, or why some of its groups are left out ("blocks.3/attn": "qkv: slimmed, it fails: ...")."""
    options: list[WidthOption] = []
    refused: dict[str, str] = {}
    for unit in units:
        if unit.kind not in ("identity", "projection", "branch"):
            continue
        groups, why = inner_groups(model.get_submodule(unit.path), unit)
        if groups:
            options.append(WidthOption(unit, groups))
        if why is not None:
            refused[unit.name] = why
    return options, refused
