"""What every data source gives: a train/validation pair (DataBundle) and its normalisation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

SPLIT_SEED = 0
VAL_FRACTION = 0.2
UNLABELLED = -1  # the label of every item of an unlabelled source


@dataclass(frozen=True)
class Preprocessing:
    """Per-channel normalisation of RGB inputs on the 0..255 scale: (x - mean) / std."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, raw: dict) -> Preprocessing:
        return cls(tuple(float(v) for v in raw["mean"]), tuple(float(v) for v in raw["std"]))


# torchvision's ImageNet statistics (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), on 0..255
IMAGENET_PREPROCESSING = Preprocessing((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))

def _as_is(batch: object) -> object:
    """collate_fn for datasets whose __getitems__ already returns a batch."""
    return batch


# rebuilds a source's (train, val) at H = W = size pixels with a normalisation
Rebuild = Callable[[int, Preprocessing], tuple[Dataset, Dataset]]


@dataclass
class DataBundle:
    """A train/validation pair with what a model needs to know about it.

    labelled: False for sources without labels (every label is UNLABELLED, -1):
    they serve distillation and fidelity, never accuracy. preprocessing: the
    normalisation the images carry, where it is a fixed one; rebuild: set for
    sources that can be rebuilt at another resolution and normalisation. digest: set for
    the user's own batches (spec "batches"), so that --resume knows other data from it.
    """

    spec: str
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W
    labelled: bool = True
    preprocessing: Preprocessing | None = None
    rebuild: Rebuild | None = None
    digest: str | None = None  # sha256 of the images and labels read, where the spec does not name them

    def fit_to(self, size: int, preprocessing: Preprocessing) -> bool:
        """Rebuild in place at H = W = `size` pixels with `preprocessing`, if this source can;
        returns whether the bundle now matches (False: a fixed source that does not)."""
        if self.input_shape[1:] == (size, size) and self.preprocessing == preprocessing:
            return True
        if self.rebuild is None:
            return False
        self.train, self.val = self.rebuild(size, preprocessing)
        self.input_shape = (self.input_shape[0], size, size)
        self.preprocessing = preprocessing
        return True

    def loader(self, split: str, batch_size: int = 128, shuffle: bool = False,
               limit: int | None = None, seed: int = 0) -> DataLoader:
        """A DataLoader over `split` ("train"/"val"), optionally the first `limit` items
        of a seeded permutation (a fixed calibration subset)."""
        dataset = self.train if split == "train" else self.val
        if limit is not None and limit < len(dataset):
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
            dataset = Subset(dataset, order[:limit].tolist())
        generator = torch.Generator().manual_seed(seed)
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        collate = _as_is if getattr(base, "collates_itself", False) else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=collate)


def stratified_split(labels: np.ndarray, val_fraction: float = VAL_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified train/validation indices."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction,
                                          stratify=labels, random_state=seed)
    return np.sort(train_idx), np.sort(val_idx)
