"""How much a lossy step (INT8 quantization) changed a model's logits, and the floor below which it is refused.

Measured on held-out images against the fp32 model the artifact was made from, on the logits
alone (no features: an artifact gives only its outputs):

- top-1 agreement (%): images whose top-1 class is the same; also over the images the fp32 model
  is confident about (top-1 probability >= fidelity.CONFIDENT), where a near tie cannot flip;
- KL(fp32 || quantized) of the softmax outputs, nats per image (mean);
- SQNR of the logits in dB: 10 log10(sum r^2 / sum (r - q)^2) over every logit of every image, the
  definition of ONNX Runtime's qdq_loss_debug and NNCF (20 dB: the error's RMS is a tenth of the
  logits' RMS);
- top-1 accuracy (%) of both, where the images are labelled.

The floor: see `Floor` and docs/quantization.md for the default and the figures behind it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from compressor.errors import InputError
from compressor.metrics.fidelity import CONFIDENT
from compressor.metrics.similarity import kl_per_item


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `other` against `reference`, in dB (inf when identical)."""
    r, o = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    noise = float(np.sum((r - o) ** 2))
    signal = float(np.sum(r ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


@dataclass
class LossyFidelity:
    """A lossy artifact against its fp32 model on the same `images` (accuracy only where labelled)."""

    images: int
    top1_agreement: float  # %
    kl_divergence: float  # KL(fp32 || quantized), nats, mean per image
    sqnr_db: float  # of the logits, dB
    confident_images: int = 0  # images whose fp32 top-1 probability is >= CONFIDENT
    confident_agreement: float | None = None  # top-1 agreement over those, % (None: there are none)
    labelled_images: int = 0
    reference_accuracy: float | None = None  # top-1 accuracy of the fp32 model, %
    accuracy: float | None = None  # top-1 accuracy of the lossy artifact, %

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sqnr_db"] = None if math.isinf(self.sqnr_db) else self.sqnr_db  # JSON has no Infinity
        return out


def lossy_fidelity(reference: np.ndarray, logits: np.ndarray, labels: Sequence[int] | np.ndarray | None = None
                   ) -> LossyFidelity:
    """Fidelity of `logits` (N x classes) to the fp32 `reference` logits of the same images in the same
    order; `labels` (N, -1 = unlabelled) adds top-1 accuracy of both over the labelled images."""
    r, q = np.asarray(reference, np.float64), np.asarray(logits, np.float64)
    if r.shape != q.shape or r.ndim != 2 or len(r) == 0:
        msg = f"logits must be two matrices of the same N x classes shape, got {r.shape} and {q.shape}"
        raise InputError(msg)
    agree = r.argmax(1) == q.argmax(1)
    kl = kl_per_item(torch.from_numpy(r), torch.from_numpy(q)).numpy()
    shifted = np.exp(r - r.max(1, keepdims=True))
    confident = shifted.max(1) / shifted.sum(1) >= CONFIDENT
    result = LossyFidelity(
        images=len(r), top1_agreement=100.0 * float(agree.mean()), kl_divergence=max(0.0, float(kl.mean())),
        sqnr_db=sqnr_db(r, q), confident_images=int(confident.sum()),
        confident_agreement=100.0 * float(agree[confident].mean()) if confident.any() else None)
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        if len(y) != len(r):
            msg = f"{len(y)} labels for {len(r)} images"
            raise InputError(msg)
        labelled = y >= 0
        if labelled.any():
            result.labelled_images = int(labelled.sum())
            result.reference_accuracy = 100.0 * float((r.argmax(1) == y)[labelled].mean())
            result.accuracy = 100.0 * float((q.argmax(1) == y)[labelled].mean())
    return result


# The default floor (docs/quantization.md has the figures): every healthy INT8 artifact measured here
# clears it with margin (lowest: efficientnet_lite0 on the photo crops, 78-85% agreement, 14-16 dB;
# resnet56 on digits32 100%, 22-38 dB); a collapsed one does not.
MIN_TOP1_AGREEMENT = 70.0  # %
MIN_SQNR_DB = 10.0  # dB


@dataclass(frozen=True)
class Floor:
    """The least fidelity a lossy artifact must keep to be written: top-1 agreement >= `min_top1_agreement`
    (%) AND logit SQNR >= `min_sqnr_db` (dB) AND, where labelled, an accuracy drop of at most
    `max_accuracy_drop` points (None: not checked)."""

    min_top1_agreement: float = MIN_TOP1_AGREEMENT
    min_sqnr_db: float = MIN_SQNR_DB
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_top1_agreement <= 100.0:
            msg = f"the minimum top-1 agreement is a percentage (0-100), got {self.min_top1_agreement}"
            raise InputError(msg)
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            msg = f"the maximum accuracy drop must be >= 0 points, got {self.max_accuracy_drop}"
            raise InputError(msg)

    def shortfalls(self, fidelity: LossyFidelity) -> list[str]:
        """Why `fidelity` is below this floor, one phrase per criterion missed (empty: it passes)."""
        out = []
        if not fidelity.top1_agreement >= self.min_top1_agreement:  # `not >=`: NaN fails
            out.append(f"top-1 agreement {fidelity.top1_agreement:.1f}% < {self.min_top1_agreement:g}%")
        if not fidelity.sqnr_db >= self.min_sqnr_db:
            out.append(f"SQNR {fidelity.sqnr_db:.1f} dB < {self.min_sqnr_db:g} dB")
        if (self.max_accuracy_drop is not None and fidelity.accuracy is not None
                and not fidelity.reference_accuracy - fidelity.accuracy <= self.max_accuracy_drop):
            out.append(f"accuracy {fidelity.reference_accuracy:.2f} -> {fidelity.accuracy:.2f}% "
                       f"(a drop over {self.max_accuracy_drop:g} points)")
        return out

    def to_dict(self) -> dict:
        return asdict(self)
