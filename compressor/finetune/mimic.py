"""Feature mimicking for fine-tuning a pruned model from the unpruned one.

Logit distillation alone gives the student one 1000-way distribution per
image. Matching intermediate features as well gives it a target at every
block boundary and spatial position. The idea is MiR's (Wang et al. 2022,
"Compressing models with few samples: mimicking then replacing"), extended
from the penultimate features to every kept block's output. On
EfficientNet-Lite0 with 1024 unlabelled crops it recovered more held-out
agreement than logits alone, in a quarter of the time
(benchmarks/recovery_at_speedup.py).

The points matched are the blocks beside the units (the children of the
units' parent modules: every block of `blocks`, `layer1`...) that run after
the first changed unit and were not themselves removed, plus the input of the
last nn.Linear (the penultimate features). Each point's loss is the mean
squared error divided by the teacher's variance there, so every point weighs
the same whatever its scale; the loss is the mean over blocks plus the
penultimate term. Everything that runs before the first changed unit is the
same in both models: its parameters are frozen, which also spares their
backward pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from compressor.graph.activations import eval_pass
from compressor.graph.units import Unit

PENULTIMATE = "<penultimate>"


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def execution_events(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    """("start" | "end", module name) for every module call of one forward pass on `x`, in order."""
    events: list[tuple[str, str]] = []
    handles: list[RemovableHandle] = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda _m, _a, n=name: events.append(("start", n))))
        handles.append(module.register_forward_hook(lambda _m, _a, _o, n=name: events.append(("end", n))))
    eval_pass(model, x, handles)
    return events


@dataclass(frozen=True)
class MimicPlan:
    """Where the student mimics the teacher: `points` (module paths present in both models),
    whether to match the penultimate features, and the student's `frozen` parameter names."""

    points: tuple[str, ...]
    penultimate: str | None  # path of the last nn.Linear, whose input is matched
    frozen: tuple[str, ...]

    def describe(self) -> str:
        tail = " and the penultimate features" if self.penultimate else ""
        return f"{len(self.points)} block outputs{tail}; {len(self.frozen)} parameter tensors frozen before them"


def plan_mimic(student: nn.Module, changed: Iterable[Unit], x: torch.Tensor) -> MimicPlan:
    """The points and frozen prefix for `student`, in which the `changed` units were removed or
    replaced (their paths hold the replacements); `x` is an example input (one forward pass)."""
    changed_paths = {u.path for u in changed}
    events = execution_events(student, x)
    starts = [i for i, (kind, name) in enumerate(events) if kind == "start" and name in changed_paths]
    if not starts:
        return MimicPlan((), _last_linear(student), ())
    first = min(starts)
    # the prefix: modules every call of which ended before the first changed unit began
    ended_before = {name for kind, name in events[:first] if kind == "end"}
    runs_later = {name for _, name in events[first:]}
    prefix = ended_before - runs_later
    frozen = tuple(name for name, _ in student.named_parameters() if _owner(name) in prefix)
    parents = {_parent(p) for p in changed_paths}
    later = {name for kind, name in events[first:] if kind == "start"}
    points = tuple(name for name, _ in student.named_modules()
                   if name and _parent(name) in parents and name not in changed_paths and name in later)
    return MimicPlan(points, _last_linear(student), frozen)


def _owner(parameter: str) -> str:
    return parameter.rpartition(".")[0]


def _last_linear(model: nn.Module) -> str | None:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class Taps:
    """Forward hooks that keep the outputs of `plan.points` (and the penultimate input) of a model
    on its latest forward pass; use as a context manager."""

    def __init__(self, model: nn.Module, plan: MimicPlan) -> None:
        self.model = model
        self.plan = plan
        self.values: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Taps:
        for path in self.plan.points:
            module = self.model.get_submodule(path)
            self._handles.append(module.register_forward_hook(
                lambda _m, _a, out, p=path: self.values.__setitem__(p, out)))
        if self.plan.penultimate is not None:
            module = self.model.get_submodule(self.plan.penultimate)
            self._handles.append(module.register_forward_pre_hook(
                lambda _m, args: self.values.__setitem__(PENULTIMATE, args[0])))
        return self

    def __exit__(self, *_: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.values.clear()


def mimic_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over block points of MSE / Var(teacher), plus the same for the penultimate features."""
    blocks = [k for k in teacher if k != PENULTIMATE]
    loss = torch.zeros(())
    if blocks:
        loss = sum(F.mse_loss(student[k], teacher[k]) / teacher[k].var().clamp_min(1e-12) for k in blocks) / len(blocks)
    if PENULTIMATE in teacher:
        t = teacher[PENULTIMATE]
        loss = loss + F.mse_loss(student[PENULTIMATE], t) / t.var().clamp_min(1e-12)
    return loss


def freeze(model: nn.Module, names: Iterable[str]) -> None:
    """Stop gradients for the named parameters (requires_grad False)."""
    wanted = set(names)
    for name, p in model.named_parameters():
        if name in wanted:
            p.requires_grad_(False)
