"""`digit_canvas`: scikit-learn's bundled digits pasted on 3x64x64 canvases, for the `det_digits` detector.

Each canvas holds 1 to 3 digits, each an 8x8 digit resized (bilinear) to a box of 12
to 30 pixels a side, tinted a random colour and alpha-blended onto a dark, noisy
background of random grey; boxes never overlap. Everything is drawn from a seed.
Canvases of the training split paste digits of digits32's training split only, the
held-out canvases digits of its validation split only (the same stratified split).

As a `--data` source the canvases are unlabelled (every label -1): they serve
scoring, distillation and fidelity. `draw_canvases` gives the same canvases with
their boxes, which is what the detector trains on (compressor.models.det_training).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from compressor.data.bundle import UNLABELLED, DataBundle

SIZE = 64  # canvas side, pixels
DIGITS = (1, 3)  # digits per canvas, inclusive
SIDE = (12, 30)  # digit box height, pixels, inclusive
ASPECT = (0.7, 1.0)  # box width / height
BACKGROUND = (0.0, 0.25)  # background grey, 0..1
NOISE = 0.04  # background noise standard deviation
MEAN, STD = 0.16, 0.13  # normalisation of the rendered 0..1 canvases (about their mean and spread)
TRAIN_CANVASES = 1024
VAL_CANVASES = 256
SEED = 0
NO_BOX = -1.0  # the class of an unused row of `boxes`


@dataclass(frozen=True)
class Canvases:
    """images: N x 3 x SIZE x SIZE, 0..1; boxes: N x 3 x 5 rows (class, x1, y1, x2, y2 in pixels, right and
    bottom edges exclusive), rows of class NO_BOX unused."""

    images: torch.Tensor
    boxes: torch.Tensor

    def normalised(self) -> torch.Tensor:
        return (self.images - MEAN) / STD


def digit_splits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train digits, labels), (held-out digits, labels)): 8x8 digits on 0..1, digits32's stratified split."""
    from sklearn.datasets import load_digits

    from compressor.data.bundle import stratified_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = stratified_split(digits.target)
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def _place(count: int, rng: np.random.Generator, tries: int = 50) -> list[tuple[int, int, int, int]]:
    """Up to `count` non-overlapping boxes (x1, y1, x2, y2), drawn by rejection; at least one."""
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(tries):
        if len(boxes) == count:
            break
        h = int(rng.integers(SIDE[0], SIDE[1] + 1))
        w = round(h * rng.uniform(*ASPECT))
        x1, y1 = int(rng.integers(0, SIZE - w + 1)), int(rng.integers(0, SIZE - h + 1))
        box = (x1, y1, x1 + w, y1 + h)
        if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
            boxes.append(box)
    return boxes


def draw_canvases(digits: torch.Tensor, labels: torch.Tensor, n: int, seed: int) -> Canvases:
    """`n` canvases pasting digits drawn from (`digits`, `labels`), from `seed`."""
    rng = np.random.default_rng(seed)
    grey = rng.uniform(*BACKGROUND, size=(n, 1, 1, 1))
    images = torch.from_numpy((grey + NOISE * rng.standard_normal((n, 3, SIZE, SIZE))).clip(0, 1)).float()
    boxes = torch.full((n, DIGITS[1], 5), NO_BOX)
    for i in range(n):
        canvas = images[i]
        for j, (x1, y1, x2, y2) in enumerate(_place(int(rng.integers(DIGITS[0], DIGITS[1] + 1)), rng)):
            k = int(rng.integers(len(digits)))
            alpha = F.interpolate(digits[k][None, None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                  align_corners=False)[0].clamp(0, 1)
            colour = torch.from_numpy(rng.uniform(0.4, 1.0, (3, 1, 1))).float()
            canvas[:, y1:y2, x1:x2] = canvas[:, y1:y2, x1:x2] * (1 - alpha) + colour * alpha
            boxes[i, j] = torch.tensor([float(labels[k]), x1, y1, x2, y2])
    return Canvases(images, boxes)


class CanvasImages(Dataset):
    """Canvases as unlabelled images: normalised, label -1 (UNLABELLED)."""

    collates_itself = True  # DataBundle.loader skips collation: __getitems__ returns the batch

    def __init__(self, canvases: Canvases) -> None:
        self.images = canvases.normalised()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], UNLABELLED

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.images[torch.as_tensor(indices, dtype=torch.long)]
        return batch, torch.full((len(indices),), UNLABELLED, dtype=torch.long)


def split_canvases(split: str, n: int, seed: int = SEED) -> Canvases:
    """The `digit_canvas` source's canvases of `split` ("train" or "val"), with their boxes."""
    train, val = digit_splits()
    digits, labels = train if split == "train" else val
    return draw_canvases(digits, labels, n, seed * 2 + (split != "train"))


def load_digit_canvas(_: str = "") -> DataBundle:
    """The `digit_canvas` source: TRAIN_CANVASES training and VAL_CANVASES held-out canvases, unlabelled."""
    return DataBundle("digit_canvas", CanvasImages(split_canvases("train", TRAIN_CANVASES)),
                      CanvasImages(split_canvases("val", VAL_CANVASES)), num_classes=10,
                      input_shape=(3, SIZE, SIZE), labelled=False)
