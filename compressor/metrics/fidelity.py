"""How closely a pruned model follows the original on the same images.

Label-free, so they hold on unlabelled data (photos): top-1 agreement (%),
top-5 overlap (mean |top5 ∩ top5'| / 5, %), KL(original || pruned) in nats
per image, and linear CKA of the penultimate features (1 = the same up to a
rotation and scale). On labelled items also top-1 / top-5 accuracy (%) of both.

Top-1 agreement is also given over the items the original is confident about
(its top-1 probability >= CONFIDENT): on crops that show no ImageNet class
clearly, the original's own top-1 is a near tie, and any change flips it.
For scale, `shift_agreement` is the original's top-1 agreement with itself when
every image is moved by one pixel: no pruned model can be expected to agree with
the original more closely than the original agrees with itself under a change
that small (efficientnet_lite0 on the held-out photo crops: 86.7%).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from compressor.graph.prefix import features_and_logits
from compressor.metrics.outputs import OutputSpec, as_items, compare_outputs, named_outputs, output_spec
from compressor.metrics.similarity import kl_per_item, linear_cka

TOP_K = 5
CONFIDENT = 0.5  # the original's top-1 softmax probability for an item to count as confident


@dataclass
class Outputs:
    """A model's penultimate features and named outputs on every item of a loader, with the labels (-1: none).

    `named` holds every output tensor (metrics/outputs.py), `spec` which of them are class logits; `logits`
    is the first of those (None for a model without class logits, e.g. a detector's maps)."""

    features: torch.Tensor
    named: dict[str, torch.Tensor]
    labels: torch.Tensor
    spec: OutputSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.named, torch.Tensor):  # a classifier's logits alone
            self.named = named_outputs(self.named)
        if self.spec is None:
            self.spec = OutputSpec(tuple(self.named), tuple(n for n, t in self.named.items() if t.dim() == 2))

    @property
    def logits(self) -> torch.Tensor | None:
        first = self.spec.first_logits
        return self.named[first] if first is not None else None


@torch.no_grad()
def outputs(model: nn.Module, loader: DataLoader, logits: Sequence[str] | None = None) -> Outputs:
    """One pass of `model` (captured, eval mode) over `loader`; `logits` names the class-logit outputs
    (None: the 2-D ones)."""
    model.eval()
    example = next(iter(loader))[0]
    spec = output_spec(model(example[:1]), logits)
    traced = features_and_logits(model, example)
    features, named, labels = [], {n: [] for n in spec.names}, []
    for x, y in loader:
        f, *outs = traced(x)
        features.append(f.flatten(1).float())
        for name, out in zip(spec.names, outs, strict=True):
            named[name].append(out.float())
        labels.append(torch.as_tensor(y))
    return Outputs(torch.cat(features), {n: torch.cat(v) for n, v in named.items()}, torch.cat(labels), spec)


@dataclass
class Accuracy:
    """Top-1 and top-k accuracy in percent over `images` labelled items."""

    top1: float
    top5: float
    images: int


@dataclass
class Fidelity:
    """Pruned vs original on the same `images`; accuracy only where items are labelled. The top-1, top-5
    and KL figures are of the first class-logits output (None where the model has none); `per_output` has
    every output's figures (metrics/outputs.py: KL and agreement for logits, cosine and NMSE otherwise)."""

    images: int
    top1_agreement: float | None  # % of images whose top-1 class is the same
    top5_overlap: float | None  # mean |top5 ∩ top5'| / 5, % (k = the class count if below 5)
    kl_divergence: float | None  # KL(original || pruned) of the softmax outputs, nats, mean per image
    feature_cka: float  # linear CKA of the penultimate features, 0..1
    confident_images: int = 0  # items whose original top-1 probability is >= CONFIDENT
    confident_agreement: float | None = None  # top-1 agreement over those, % (None: there are none)
    original_accuracy: Accuracy | None = None
    pruned_accuracy: Accuracy | None = None
    per_output: dict[str, dict[str, float]] | None = None

    def summary(self) -> str:
        """The headline figures in words: agreement and KL of the logits, else each output's cosine."""
        if self.top1_agreement is not None:
            return f"top-1 agreement {self.top1_agreement:.1f}%, KL {self.kl_divergence:.4f} nats"
        return ", ".join(f"{name}: cosine {v['cosine_similarity']:.3f}, NMSE {v['normalised_mse']:.3f}"
                         for name, v in (self.per_output or {}).items())

    def to_dict(self) -> dict:
        return asdict(self)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> Accuracy | None:
    labelled = labels >= 0
    n = int(labelled.sum())
    if n == 0:
        return None
    logits, labels = logits[labelled], labels[labelled]
    top1 = (logits.argmax(1) == labels).float().mean().item()
    topk = (logits.topk(k, 1).indices == labels[:, None]).any(1).float().mean().item()
    return Accuracy(100.0 * top1, 100.0 * topk, n)


def compare(reference: Outputs, pruned: Outputs) -> Fidelity:
    """Fidelity of `pruned` to `reference`, both computed on the same items in the same order."""
    per_output = compare_outputs(reference.spec, reference.named, pruned.named)
    if reference.logits is None:
        return Fidelity(len(reference.labels), None, None, None, linear_cka(reference.features, pruned.features),
                        per_output=per_output)
    a, b = as_items(reference.logits).double(), as_items(pruned.logits).double()
    k = min(TOP_K, a.shape[1])
    top_a, top_b = a.topk(k, 1).indices, b.topk(k, 1).indices
    overlap = (top_a[:, :, None] == top_b[:, None, :]).any(2).double().sum(1) / k
    kl = kl_per_item(a, b)
    agree = top_a[:, 0] == top_b[:, 0]
    confident = F.softmax(a, 1).max(1).values >= CONFIDENT
    return Fidelity(
        images=len(a),
        top1_agreement=100.0 * agree.double().mean().item(),
        top5_overlap=100.0 * overlap.mean().item(),
        kl_divergence=max(0.0, kl.mean().item()),
        feature_cka=linear_cka(reference.features, pruned.features),
        confident_images=int(confident.sum()),
        confident_agreement=100.0 * agree[confident].double().mean().item() if confident.any() else None,
        original_accuracy=_accuracy(a, reference.labels, k) if a.shape[0] == len(reference.labels) else None,
        pruned_accuracy=_accuracy(b, reference.labels, k) if b.shape[0] == len(reference.labels) else None,
        per_output=per_output,
    )


def fidelity(original: nn.Module, pruned: nn.Module, loader: DataLoader,
             reference: Outputs | None = None, logits: Sequence[str] | None = None) -> Fidelity:
    """Fidelity of `pruned` to `original` on `loader` (not shuffled); pass `reference`
    (= outputs(original, loader)) to reuse the original's pass across several pruned models."""
    reference = outputs(original, loader, logits) if reference is None else reference
    return compare(reference, outputs(pruned, loader, reference.spec.logits))


@torch.no_grad()
def shift_agreement(model: nn.Module, loader: DataLoader, pixels: int = 1) -> float | None:
    """Top-1 agreement (%) of `model` on each image with itself on the image rolled by `pixels`
    along its width (eval mode): how stable its top-1 is under a change too small to see (None for a
    model without class logits)."""
    model.eval()
    same, n = 0, 0
    for x, _ in loader:
        spec = output_spec(model(x[:1]))
        if spec.first_logits is None:
            return None
        a = as_items(named_outputs(model(x))[spec.first_logits])
        b = as_items(named_outputs(model(torch.roll(x, pixels, dims=-1)))[spec.first_logits])
        same += int((a.argmax(1) == b.argmax(1)).sum())
        n += len(a)
    return 100.0 * same / n
