"""A model's outputs, whatever their structure: named tensors, some of them class logits.

A classifier returns one tensor; a detector returns a tuple of maps (per scale:
class scores, boxes), others a dict or a nested structure. Every step that
compares two models' outputs (fidelity, distillation, greedy selection, INT8)
flattens them with torch's pytree into named tensors: "logits" for a single
tensor, "output0", "output1" ... for a tuple, the keys for a dict ("0.boxes"
nested). Which of them are class logits is the user's to say (by name); by
default the 2-D ones (batch x classes). A logits output of more dimensions
(a detector's per-cell class map, batch x classes x H x W) has its classes on
dimension 1: each cell is compared as one item.

Logits are compared by KL divergence and top-1 agreement; the other outputs by
cosine similarity (per image, of the flattened output) and normalised mean
squared error (the mean squared difference over the reference's variance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from compressor.errors import InputError
from compressor.metrics.similarity import kl_per_item

SINGLE = "logits"  # the name of a model's only output


def _key_name(entry: object) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def named_outputs(value: object) -> dict[str, torch.Tensor]:
    """Every tensor in a model's output, by name (SINGLE for a lone tensor), in pytree order."""
    if isinstance(value, torch.Tensor):
        return {SINGLE: value}
    leaves, _ = pytree.tree_flatten_with_path(value)
    found: dict[str, torch.Tensor] = {}
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            name = ".".join(_key_name(p) for p in path)
            found[name if not name.isdigit() else f"output{name}"] = leaf
    if not found:
        msg = f"the model's output ({type(value).__name__}) holds no tensor"
        raise InputError(msg)
    return found


@dataclass(frozen=True)
class OutputSpec:
    """The names of a model's output tensors and which of them are class logits."""

    names: tuple[str, ...]
    logits: tuple[str, ...]

    def is_logits(self, name: str) -> bool:
        return name in self.logits

    @property
    def first_logits(self) -> str | None:
        return self.logits[0] if self.logits else None

    def to_dict(self) -> dict:
        return {"names": list(self.names), "logits": list(self.logits)}


def output_spec(value: object, logits: Sequence[str] | None = None) -> OutputSpec:
    """The spec of a model output `value`; `logits` names the class-logit outputs (None: the 2-D ones).
    InputError naming the outputs if a name is not one of them."""
    outputs = named_outputs(value)
    if logits is None:
        chosen = tuple(n for n, t in outputs.items() if t.dim() == 2)
    else:
        unknown = [n for n in logits if n not in outputs]
        if unknown:
            msg = f"no model output named {', '.join(unknown)}; its outputs: {', '.join(outputs)}"
            raise InputError(msg)
        chosen = tuple(n for n in outputs if n in logits)
    return OutputSpec(tuple(outputs), chosen)


def as_items(logits: torch.Tensor) -> torch.Tensor:
    """Class logits as items x classes: a 2-D output as it is, a map's cells as items (classes on dim 1)."""
    if logits.dim() == 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def logits_figures(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """KL(reference || other) in nats per item and top-1 agreement (%) of two logit tensors."""
    a, b = as_items(reference).double(), as_items(other).double()
    return {"kl_divergence": max(0.0, float(kl_per_item(a, b).mean())),
            "top1_agreement": 100.0 * float((a.argmax(1) == b.argmax(1)).double().mean())}


def map_figures(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Cosine similarity (mean over images of the flattened outputs) and normalised MSE (mean squared
    difference / variance of the reference) of two output tensors."""
    a, b = reference.double().flatten(1), other.double().flatten(1)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean()
    nmse = ((a - b) ** 2).mean() / a.var().clamp_min(1e-12)
    return {"cosine_similarity": float(cosine), "normalised_mse": float(nmse)}


def compare_outputs(spec: OutputSpec, reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]
                    ) -> dict[str, dict[str, float]]:
    """Per output name: logits_figures for logits, map_figures for the others."""
    figures = {}
    for name in spec.names:
        if reference[name].shape != other[name].shape:
            msg = (f"output {name!r} differs in shape: {tuple(reference[name].shape)} vs "
                   f"{tuple(other[name].shape)}")
            raise InputError(msg)
        figures[name] = (logits_figures if spec.is_logits(name) else map_figures)(reference[name], other[name])
    return figures


def divergence(spec: OutputSpec, reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]
               ) -> torch.Tensor:
    """One number for how far `other` is from `reference` per image (nats-like, 0 = the same): the mean
    over outputs of the KL per image for logits and the normalised squared error per image for the rest."""
    terms = []
    for name in spec.names:
        a, b = reference[name].double(), other[name].double()
        if spec.is_logits(name):
            per_item = kl_per_item(as_items(a), as_items(b))
            terms.append(per_item.reshape(a.shape[0], -1).mean(1))
        else:
            terms.append(((a - b) ** 2).flatten(1).mean(1) / a.var().clamp_min(1e-12))
    return torch.stack(terms).mean(0)


def first_logits(value: object, logits: Sequence[str] | None = None, why: str = "this") -> torch.Tensor:
    """The first class-logits output of a model output `value` (output_spec); InputError saying `why` it is
    needed where the model has none."""
    outputs = named_outputs(value)
    name = output_spec(value, logits).first_logits
    if name is None:
        msg = f"{why} needs a class-logits output; the model's outputs are {', '.join(outputs)} (none is 2-D)"
        raise InputError(msg)
    return outputs[name]
