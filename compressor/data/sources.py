"""Data sources, named by a spec string: digits32, digit_canvas, photos, cifar10:DIR, imagefolder:DIR, npz:FILE.

Nothing is downloaded: every source reads what is bundled with an installed
package or what the user points at on disk. Sources of RGB photos (photos,
imagefolder) can be rebuilt for a model's resolution and normalisation
(`DataBundle.fit_to`); the others are fixed and the model must fit them.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from compressor.data.bundle import IMAGENET_PREPROCESSING, DataBundle, Preprocessing, stratified_split
from compressor.errors import InputError, first_line


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def load_digits32(_: str = "") -> DataBundle:
    """scikit-learn's bundled 8x8 digits, upsampled bilinearly to 3x32x32, standardised.

    1797 images, 10 classes; fixed stratified split: 1437 train / 360 validation.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear",
                                             align_corners=False)
    images = _normalise(images.repeat(1, 3, 1, 1))
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = stratified_split(digits.target)
    return DataBundle(
        spec="digits32",
        train=TensorDataset(images[train_idx], labels[train_idx]),
        val=TensorDataset(images[val_idx], labels[val_idx]),
        num_classes=10,
        input_shape=(3, 32, 32),
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python-format batches, refusing anything but numpy arrays."""

    _allowed = {(f"numpy{core}.{module}", name)
                for core in (".core", "._core")
                for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                                     ("numeric", "_frombuffer"))}
    _allowed |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        msg = f"refusing to unpickle {module}.{name} from a CIFAR batch file"
        raise InputError(msg)


class _ImageArrayDataset(Dataset):
    """uint8 NCHW images, standardised per channel on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: np.ndarray,
                 std: np.ndarray) -> None:
        self.images, self.labels = images, labels.astype(np.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[i]).float() / 255.0
        return (x - self.mean) / self.std, int(self.labels[i])


def _check_labels(images: np.ndarray, labels: np.ndarray, num_classes: int | None, where: str) -> None:
    """Images and labels must pair up, and labels must be class indices."""
    if len(images) != len(labels):
        msg = f"{where}: {len(images)} images but {len(labels)} labels"
        raise InputError(msg)
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
                        or (num_classes is not None and labels.max() >= num_classes)):
        allowed = f"0..{num_classes - 1}" if num_classes else "non-negative integers"
        msg = f"{where}: labels must be class indices {allowed}"
        raise InputError(msg)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"])
    except InputError:  # the unpickler's refusal, which is also a ValueError
        raise
    except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError, IndexError) as e:
        msg = f"{path} is not a CIFAR-10 python-format batch ({type(e).__name__})"
        raise InputError(msg) from e
    _check_labels(data, labels, 10, str(path))
    return data, labels


def load_cifar10(directory: str) -> DataBundle:
    """The CIFAR-10 python-format folder (data_batch_1..5, test_batch); no download."""
    root = Path(directory)
    if not root.is_dir():
        msg = f"cifar10 folder not found: {root}"
        raise InputError(msg)
    train_files = sorted(root.glob("data_batch_*"))
    test_file = root / "test_batch"
    if not train_files and not test_file.is_file():
        msg = f"{root} has no data_batch_* and test_batch files (CIFAR-10 python format)"
        raise InputError(msg)
    expected = [f"data_batch_{i}" for i in range(1, max(len(train_files), 1) + 1)]
    absent = [name for name in [*expected, "test_batch"] if not (root / name).is_file()]
    if absent or {p.name for p in train_files} != set(expected):
        names = absent or sorted({p.name for p in train_files} - set(expected))
        msg = f"{root}: CIFAR-10 batch file(s) missing or out of sequence: {', '.join(names)}"
        raise InputError(msg)
    parts = [_read_cifar_batch(p) for p in train_files]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_val, y_val = _read_cifar_batch(test_file)
    mean = x_train.mean(axis=(0, 2, 3)) / 255.0
    std = x_train.std(axis=(0, 2, 3)) / 255.0
    return DataBundle(f"cifar10:{root}", _ImageArrayDataset(x_train, y_train, mean, std),
                      _ImageArrayDataset(x_val, y_val, mean, std), 10, (3, 32, 32))


def _decode_image(path: str) -> object:
    """torchvision's image loader, with an InputError naming a file that cannot be decoded."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as e:  # PIL's UnidentifiedImageError, OSError for a truncated file, ...
        msg = f"cannot decode image {path}: {first_line(e)}"
        raise InputError(msg) from e


def _check_decodable(samples: list[tuple[str, int]]) -> None:
    """Every image's header parses (PIL's verify: no full decode), so a broken file is refused up front,
    not halfway through a run."""
    from PIL import Image

    for path, _ in samples:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as e:  # UnidentifiedImageError, SyntaxError for a broken PNG, OSError ...
            msg = f"cannot decode image {path}: {first_line(e)}"
            raise InputError(msg) from e


def _imagefolder_splits(root: Path, size: int, preprocessing: Preprocessing) -> tuple[Dataset, Dataset, int]:
    """(train, val, classes) of an ImageFolder tree, resized and centre-cropped to `size` pixels."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize([m / 255 for m in preprocessing.mean], [s / 255 for s in preprocessing.std]),
    ])
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train = datasets.ImageFolder(str(root / "train"), transform, loader=_decode_image)
            val = datasets.ImageFolder(str(root / "val"), transform, loader=_decode_image)
            _check_decodable([*train.samples, *val.samples])
            return train, val, len(train.classes)
        full = datasets.ImageFolder(str(root), transform, loader=_decode_image)
        _check_decodable(full.samples)
    except InputError:  # already says what is wrong (and is a ValueError too)
        raise
    except (FileNotFoundError, ValueError) as e:
        msg = f"{root} is not an image folder with one subfolder per class: {e}"
        raise InputError(msg) from e
    train_idx, val_idx = stratified_split(np.asarray(full.targets))
    return Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist()), len(full.classes)


def load_imagefolder(directory: str, image_size: int = 224) -> DataBundle:
    """A torchvision ImageFolder tree; uses train/ and val/ if present, else a stratified split.

    Resized and centre-cropped to `image_size` pixels with ImageNet normalisation
    until a model asks for another (DataBundle.fit_to).
    """
    root = Path(directory)
    if not root.is_dir():
        msg = f"image folder not found: {root}"
        raise InputError(msg)
    train, val, num_classes = _imagefolder_splits(root, image_size, IMAGENET_PREPROCESSING)

    def rebuild(size: int, preprocessing: Preprocessing) -> tuple[Dataset, Dataset]:
        return _imagefolder_splits(root, size, preprocessing)[:2]

    return DataBundle(f"imagefolder:{root}", train, val, num_classes, (3, image_size, image_size),
                      preprocessing=IMAGENET_PREPROCESSING, rebuild=rebuild)


def load_npz(file: str) -> DataBundle:
    """An .npz with x_train, y_train, x_val, y_val (float NCHW images, int labels)."""
    path = Path(file)
    if not path.is_file():
        msg = f"npz file not found: {path}"
        raise InputError(msg)
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            msg = f"{path} is a single array, not an npz with x_train, y_train, x_val, y_val"
            raise InputError(msg)
        with npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_val", "y_val")}
    except InputError:
        raise
    except Exception as e:  # numpy raises KeyError, ValueError, OSError, BadZipFile, EOFError ...
        msg = f"{path} is not an npz with x_train, y_train, x_val, y_val: {type(e).__name__}: {e}"
        raise InputError(msg) from e
    for split in ("train", "val"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 4 or not np.issubdtype(x.dtype, np.number):
            msg = f"{path}: x_{split} must be numeric N x C x H x W, got shape {x.shape} ({x.dtype})"
            raise InputError(msg)
        _check_labels(x, y, None, f"{path} ({split})")
    if arrays["x_train"].shape[1:] != arrays["x_val"].shape[1:]:
        msg = f"{path}: x_train and x_val image shapes differ"
        raise InputError(msg)
    x_train = torch.tensor(arrays["x_train"], dtype=torch.float32)
    y_train = torch.tensor(arrays["y_train"], dtype=torch.long)
    val = TensorDataset(torch.tensor(arrays["x_val"], dtype=torch.float32),
                        torch.tensor(arrays["y_val"], dtype=torch.long))
    num_classes = int(max(y_train.max(), val.tensors[1].max())) + 1
    return DataBundle(f"npz:{path}", TensorDataset(x_train, y_train), val, num_classes,
                      tuple(x_train.shape[1:]))


def load_photos(_: str = "") -> DataBundle:
    """scikit-image's bundled photos as seeded crops, split by source photo (compressor.data.photos)."""
    from compressor.data.photos import load_photos as build

    return build()


def load_digit_canvas(_: str = "") -> DataBundle:
    """scikit-learn's digits pasted on 3x64x64 canvases, unlabelled (compressor.data.canvas): det_digits' data."""
    from compressor.data.canvas import load_digit_canvas as build

    return build()


DATA_SOURCES: dict[str, Callable[[str], DataBundle]] = {
    "digits32": load_digits32,
    "digit_canvas": load_digit_canvas,
    "photos": load_photos,
    "cifar10": load_cifar10,
    "imagefolder": load_imagefolder,
    "npz": load_npz,
}


NO_PATH = ("digits32", "digit_canvas", "photos")  # sources bundled with an installed package


def load_data(spec: str) -> DataBundle:
    """Load a data source from its spec, e.g. "digits32", "photos" or "cifar10:/data/cifar-10-batches-py"."""
    kind, _, arg = spec.partition(":")
    if kind not in DATA_SOURCES:
        msg = f"unknown data source {spec!r}; known: {', '.join(sorted(DATA_SOURCES))}"
        raise InputError(msg)
    if kind not in NO_PATH and not arg:
        msg = f"data source {kind!r} needs a path: {kind}:PATH"
        raise InputError(msg)
    return DATA_SOURCES[kind](arg)
