"""The images quantization needs from a data source: a calibration set, a held-out set, a selection set.

Calibration comes from the source's calibration split (its training split, where prune scores units
and fine-tunes), held-out images from its validation split, which calibration never sees. The
fallback chooses the layers it keeps in fp32 on selection images from the calibration split, never on
the held-out images that then judge the result (a choice made on the judging images would bias the
judgement upward). All are the DataBundle's own tensors, so they are preprocessed exactly as at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compressor.errors import InputError

CALIBRATION_SIZE = 300  # images: what ONNX Runtime's and NNCF's examples use (NNCF's default subset_size)
SELECTION_SIZE = 64  # calibration-split images beyond the calibration set that the fallback ranks layers on


@dataclass
class QuantizationImages:
    """`calibration` and `held_out` (N x C x H x W float32, preprocessed as at inference), the held-out
    `labels` (-1 = unlabelled; None: no labels at all) and `selection`, the images the fallback ranks layers
    on (never held-out ones; None: the calibration images)."""

    calibration: np.ndarray
    held_out: np.ndarray
    labels: np.ndarray | None = None
    selection: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("calibration", "held_out", "selection"):
            x = getattr(self, name)
            if x is None and name == "selection":
                continue
            if not isinstance(x, np.ndarray) or x.ndim != 4 or len(x) == 0:
                shape = getattr(x, "shape", type(x).__name__)
                msg = f"{name} images must be a non-empty N x C x H x W array, got {shape}"
                raise InputError(msg)
            if not np.all(np.isfinite(x)):
                msg = f"{name} images hold NaN or Inf values"
                raise InputError(msg)
            setattr(self, name, np.ascontiguousarray(x, np.float32))
        for name in ("held_out", "selection"):
            x = getattr(self, name)
            if x is not None and self.calibration.shape[1:] != x.shape[1:]:
                msg = f"calibration images are {self.calibration.shape[1:]}, {name} images {x.shape[1:]}"
                raise InputError(msg)
        if self.labels is not None and len(self.labels) != len(self.held_out):
            msg = f"{len(self.labels)} labels for {len(self.held_out)} held-out images"
            raise InputError(msg)

    def ranking_images(self) -> np.ndarray:
        """What the fallback ranks layers on: `selection`, else the calibration images; never held-out ones."""
        return self.calibration if self.selection is None else self.selection


def _stack(loader) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for x, y in loader:
        xs.append(np.asarray(x, np.float32))
        ys.append(np.asarray(y).reshape(-1))
    return np.concatenate(xs), np.concatenate(ys)


def quantization_images(data, calibration_size: int = CALIBRATION_SIZE, held_out_size: int | None = None,
                        seed: int = 0, selection_size: int = SELECTION_SIZE) -> QuantizationImages:
    """Calibration images (the first `calibration_size` of a seeded order of `data`'s training split), selection
    images (the next `selection_size` there; where the split has no more, None: the fallback then ranks on the
    calibration images) and held-out images (its validation split, the first `held_out_size` of a seeded
    order, default all) of a DataBundle."""
    if calibration_size <= 0:
        msg = f"the calibration size must be a positive number of images, got {calibration_size}"
        raise InputError(msg)
    train, _ = _stack(data.loader("train", batch_size=128, limit=calibration_size + selection_size, seed=seed))
    held_out, labels = _stack(data.loader("val", batch_size=128, limit=held_out_size, seed=seed))
    selection = train[calibration_size:] if len(train) > calibration_size else None
    return QuantizationImages(train[:calibration_size], held_out, labels if (labels >= 0).any() else None, selection)
