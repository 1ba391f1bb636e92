"""Structural signatures of units: units with the same signature cost the same on a runtime.

Two units whose removed parts compute the same operations on tensors of the same
shapes, with parameters of the same shapes, take the same time on any runtime
(the weights' values do not change a dense kernel's cost). The latency model
groups units by this signature and fits one saving per group.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from compressor.graph.activations import eval_pass
from compressor.graph.units import Unit


def block_io_shapes(model: nn.Module, paths: Sequence[str], x: torch.Tensor) -> dict[str, tuple[tuple, tuple]]:
    """{module path: (input shape, output shape)} of each module in `paths` on one forward pass of `x`
    (the first tensor argument and the first tensor output; batch dimension left out)."""
    shapes: dict[str, tuple[tuple, tuple]] = {}
    handles = []
    for path in dict.fromkeys(paths):
        module = model.get_submodule(path)

        def hook(_m, args, out, p=path) -> None:
            first_in = next((a for a in args if isinstance(a, torch.Tensor)), None)
            first_out = out if isinstance(out, torch.Tensor) else next(
                (o for o in (out if isinstance(out, (tuple, list)) else ()) if isinstance(o, torch.Tensor)), None)
            shapes.setdefault(p, (tuple(first_in.shape[1:]) if first_in is not None else (),
                                  tuple(first_out.shape[1:]) if first_out is not None else ()))

        handles.append(module.register_forward_hook(hook))
    eval_pass(model, x, handles)
    return shapes


def _module_description(module: nn.Module, skip: str | None, members: tuple[str, ...] = ()) -> list[str]:
    """Each submodule's type and its parameters' and buffers' shapes, in order (the shortcut left out; only
    the children in `members` where given: a transformer branch's modules)."""
    lines = []
    prefix = f"{skip}." if skip else None
    for name, sub in module.named_modules():
        if prefix and (name + ".").startswith(prefix):
            continue
        if members and name.split(".")[0] not in members:
            continue
        tensors = [f"{n}{tuple(t.shape)}" for n, t in [*sub.named_parameters(recurse=False),
                                                       *sub.named_buffers(recurse=False)]]
        extra = sub.extra_repr()
        lines.append(f"{name.count('.')}:{type(sub).__name__}({extra})[{','.join(tensors)}]")
    return lines


def module_cost_key(module: nn.Module, input_shape: tuple[int, ...]) -> str:
    """A short hash of `module`'s submodules (types, settings, parameter shapes) and its input shape: equal keys
    run the same kernels on the same shapes. Unlike capture's structure_key it leaves out plain attributes that
    do not reach an exported graph (ConvNeXt's per-block stochastic-depth rate, inactive in eval mode)."""
    text = "\n".join([repr(tuple(input_shape)), *_module_description(module, None)])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def unit_signatures(model: nn.Module, units: Sequence[Unit], x: torch.Tensor) -> dict[str, str]:
    """{unit name: structural signature}: a short hash of the unit's kind, what removing it leaves
    (shortcut, post-add activations, which of its block's additions), the removed part's modules with their
    settings and parameter shapes (a branch's own modules only), the shapes the unit reads and writes, and for
    a width unit the channel count each of its groups keeps (which channels does not change the cost).
    Equal signatures mean equal latency savings."""
    shapes = block_io_shapes(model, [u.path for u in units], x)
    signatures = {}
    for unit in units:
        block = model.get_submodule(unit.path)
        parts = [unit.kind, str(unit.shortcut), ",".join(unit.post_add), repr(shapes.get(unit.path)),
                 repr(unit.branches), *_module_description(block, unit.shortcut if unit.kind != "merge" else None,
                                                           unit.members)]
        if unit.slim is not None:  # a width level: the channels each group keeps tell the levels apart
            parts.append(f"slim {unit.slim.roots} {unit.slim.channels} -> {unit.slim.kept}")
        signatures[unit.name] = hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12]
    return signatures
