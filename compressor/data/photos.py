"""`photos`: the natural photos bundled with scikit-image, as seeded random crops for ImageNet models.

Unlabelled (every label is -1): the source serves distillation, importance
scoring and fidelity against the unpruned model, not accuracy. Split by source
photo: crops of a held-out photo never reach scoring or fine-tuning. Crops are
drawn once from a seed in the photo's own pixel coordinates, so the same crops
are rendered at whatever resolution the model takes (224 px for
efficientnet_lite0, 240 for lite1): area-averaged resampling (roi_align), then
flips and, for training crops, brightness / contrast / saturation jitter.
Rendered crops are kept as uint8 and normalised on access.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from compressor.data.bundle import IMAGENET_PREPROCESSING, UNLABELLED, DataBundle, Preprocessing

SEED = 0
TRAIN_CROPS = 1024  # fine-tuning sees each once per epoch (prune's 4 epochs: 128 steps of 32)
VAL_CROPS = 128
DEFAULT_SIZE = 224  # pixels, until a model asks for another (DataBundle.fit_to)
MIN_SIDE = 0.35  # smallest crop side, as a fraction of the photo's shorter side
ASPECT = (3 / 4, 4 / 3)  # crop width / height range
JITTER = 0.2  # brightness, contrast and saturation factors drawn from 1 +- JITTER (training crops)
GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, for contrast and saturation

# Every photograph or micrograph in skimage.data that ships inside the wheel (no pooch download):
# cat() is the same photo as chelsea(); stereo_motorcycle() gives two views of one scene (the left
# is used). Left out: synthetic images (binary_blobs, checkerboard, horse, logo, shepp_logan_phantom),
# thumbnails (lfw_subset 25 px, microaneurysms 102 px), and those that need a download (brain,
# cells3d, eagle, human_mitosis, kidney, lily, nickel_solidification, palisades_of_vogt,
# protein_transport, skin, vortex).
TRAIN_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "colorwheel", "grass",
                "hubble_deep_field", "moon", "page", "retina", "text")
VAL_PHOTOS = ("coffee", "rocket", "motorcycle", "coins", "gravel", "immunohistochemistry")


def read_photo(name: str) -> torch.Tensor:
    """A bundled scikit-image photo as a uint8 3 x H x W RGB tensor (grey repeated, alpha dropped)."""
    import skimage.data

    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255 if image.max() <= 1 else image), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class CropPlan:
    """Seeded crops: source photo index, box (x1, y1, x2, y2 in source pixels), flip, jitter factors."""

    photo: np.ndarray  # int, per crop
    boxes: np.ndarray  # float, crops x 4
    flip: np.ndarray  # bool
    jitter: np.ndarray  # crops x 3: brightness, contrast, saturation (1.0 = unchanged)


def draw_plan(shapes: list[tuple[int, int]], n: int, seed: int, jitter: bool) -> CropPlan:
    """`n` crops spread evenly over photos of `shapes` (H, W): side MIN_SIDE..1 of the shorter side,
    aspect ratio in ASPECT, uniform position, flip with p = 0.5, jitter 1 +- JITTER if asked."""
    rng = np.random.default_rng(seed)
    photo = np.arange(n) % len(shapes)
    hw = np.array(shapes, dtype=np.float64)[photo]
    side = rng.uniform(MIN_SIDE, 1.0, n) * hw.min(axis=1)
    aspect = np.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1]), n))
    w = np.minimum(side * np.sqrt(aspect), hw[:, 1])
    h = np.minimum(side / np.sqrt(aspect), hw[:, 0])
    x1 = rng.uniform(0, 1, n) * (hw[:, 1] - w)
    y1 = rng.uniform(0, 1, n) * (hw[:, 0] - h)
    flip = rng.uniform(0, 1, n) < 0.5
    factors = rng.uniform(1 - JITTER, 1 + JITTER, (n, 3))
    return CropPlan(photo, np.stack([x1, y1, x1 + w, y1 + h], axis=1), flip,
                    factors if jitter else np.ones((n, 3)))


def colour_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness b, then contrast c around each crop's mean grey m, then saturation s towards grey;
    x: crops x 3 x H x W on 0..255, factors: crops x (b, c, s).

    All three are affine in the RGB vector, so they compose into one map per crop:
    out = c b (s I + (1 - s) 1 w^T) x + (1 - c) m 1, with w the luma weights (sum 1) and m = b w.mean(x).
    """
    w = torch.tensor(GREY, dtype=x.dtype)
    b, c, s = factors.to(x.dtype).unbind(1)
    mix = s.view(-1, 1, 1) * torch.eye(3, dtype=x.dtype) + (1 - s).view(-1, 1, 1) * w.view(1, 1, 3)
    mean_grey = b * (x.mean((2, 3)) @ w)
    out = torch.einsum("nij,njhw->nihw", (c * b).view(-1, 1, 1) * mix, x)
    return out + ((1 - c) * mean_grey).view(-1, 1, 1, 1)


def render(photos: list[torch.Tensor], plan: CropPlan, size: int) -> torch.Tensor:
    """The planned crops at `size` x `size` pixels: uint8, crops x 3 x size x size."""
    from torchvision.ops import roi_align

    out = torch.empty(len(plan.photo), 3, size, size, dtype=torch.uint8)
    for p, photo in enumerate(photos):
        index = np.flatnonzero(plan.photo == p)
        if not len(index):
            continue
        image = photo.float()[None]
        # shrink large photos first (area-averaged), so the smallest crop still has >= size pixels a side
        scale = min(1.0, size / (MIN_SIDE * min(photo.shape[1:])))
        if scale < 1.0:
            target = [max(1, round(d * scale)) for d in photo.shape[1:]]
            image = F.interpolate(image, size=target, mode="bilinear", antialias=True, align_corners=False)
            scale = target[0] / photo.shape[1]
        boxes = torch.from_numpy(plan.boxes[index] * scale).float()
        crops = roi_align(image, [boxes], (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        flip = torch.from_numpy(plan.flip[index])
        crops[flip] = crops[flip].flip(-1)
        factors = torch.from_numpy(plan.jitter[index]).float()
        if not torch.all(factors == 1):
            crops = colour_jitter(crops, factors)
        out[torch.from_numpy(index)] = crops.round().clamp(0, 255).to(torch.uint8)
    return out


class PhotoCrops(Dataset):
    """One split's crops, rendered on first use at `size` pixels, normalised on access; label -1.

    sources: the photos this split draws from; crop_sources: the photo of every crop.
    """

    collates_itself = True  # DataBundle.loader skips collation: __getitems__ returns the batch

    def __init__(self, sources: tuple[str, ...], plan: CropPlan, size: int, preprocessing: Preprocessing,
                 render_at: Callable[[int], torch.Tensor]) -> None:
        self.sources = sources
        self.crop_sources = [sources[p] for p in plan.photo]
        self.size = size
        self.mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
        self.std = torch.tensor(preprocessing.std).view(3, 1, 1)
        self._render_at = render_at
        self._images: torch.Tensor | None = None

    @property
    def images(self) -> torch.Tensor:
        """uint8 crops x 3 x size x size (rendered once per resolution, shared across normalisations)."""
        if self._images is None:
            self._images = self._render_at(self.size)
        return self._images

    def __len__(self) -> int:
        return len(self.crop_sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return (self.images[i].float() - self.mean) / self.std, UNLABELLED

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch (images, labels) normalised at once: one allocation, no per-crop copies."""
        batch = (self.images[torch.as_tensor(indices, dtype=torch.long)].float() - self.mean) / self.std
        return batch, torch.full((len(indices),), UNLABELLED, dtype=torch.long)


class _Split:
    """A split's photos and crop plan, with its rendered crops cached per resolution."""

    def __init__(self, names: tuple[str, ...], n: int, seed: int, jitter: bool) -> None:
        self.names = names
        self.photos = [read_photo(name) for name in names]
        self.plan = draw_plan([tuple(p.shape[1:]) for p in self.photos], n, seed, jitter)
        self._rendered: dict[int, torch.Tensor] = {}

    def render_at(self, size: int) -> torch.Tensor:
        if size not in self._rendered:
            self._rendered = {size: render(self.photos, self.plan, size)}  # keep one resolution
        return self._rendered[size]

    def crops(self, size: int, preprocessing: Preprocessing) -> PhotoCrops:
        return PhotoCrops(self.names, self.plan, size, preprocessing, self.render_at)


def load_photos(train_crops: int = TRAIN_CROPS, val_crops: int = VAL_CROPS, size: int = DEFAULT_SIZE,
                preprocessing: Preprocessing = IMAGENET_PREPROCESSING, seed: int = SEED) -> DataBundle:
    """The `photos` bundle: `train_crops` crops of TRAIN_PHOTOS (calibration and fine-tuning) and
    `val_crops` of the held-out VAL_PHOTOS, at `size` pixels; a model rebuilds it at its own
    resolution and normalisation (DataBundle.fit_to)."""
    train = _Split(TRAIN_PHOTOS, train_crops, seed * 2, jitter=True)
    val = _Split(VAL_PHOTOS, val_crops, seed * 2 + 1, jitter=False)

    def rebuild(new_size: int, new_preprocessing: Preprocessing) -> tuple[Dataset, Dataset]:
        return train.crops(new_size, new_preprocessing), val.crops(new_size, new_preprocessing)

    return DataBundle("photos", train.crops(size, preprocessing), val.crops(size, preprocessing),
                      num_classes=0, input_shape=(3, size, size), labelled=False,
                      preprocessing=preprocessing, rebuild=rebuild)
