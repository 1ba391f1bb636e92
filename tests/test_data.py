"""Data sources: digits32, cifar10:DIR, npz:FILE, imagefolder:DIR, and their refusals."""

import os
import pickle

import numpy as np
import pytest
import torch

from compressor.data import load_data, stratified_split
from compressor.errors import InputError


@pytest.fixture(scope="module")
def digits():
    return load_data("digits32")


def _tensors(dataset):
    return dataset.tensors


def test_digits32_shapes_and_split_sizes(digits):
    assert digits.input_shape == (3, 32, 32)
    assert digits.num_classes == 10
    assert len(digits.train) == 1437
    assert len(digits.val) == 360
    x, y = digits.train[0]
    assert tuple(x.shape) == (3, 32, 32)
    assert x.dtype == torch.float32
    assert 0 <= int(y) < 10


def test_digits32_split_is_stratified(digits):
    y_train = _tensors(digits.train)[1].numpy()
    y_val = _tensors(digits.val)[1].numpy()
    total = len(y_train) + len(y_val)
    for c in range(10):
        n_c = int((y_train == c).sum() + (y_val == c).sum())
        expected_val = n_c * len(y_val) / total
        assert abs(int((y_val == c).sum()) - expected_val) <= 1, c


def test_stratified_split_partitions_the_indices():
    labels = np.array([0] * 10 + [1] * 5)
    train_idx, val_idx = stratified_split(labels, val_fraction=0.2, seed=0)
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(15))
    assert list(train_idx) == sorted(train_idx)
    assert np.bincount(labels[val_idx]).tolist() == [2, 1]
    again = stratified_split(labels, val_fraction=0.2, seed=0)
    np.testing.assert_array_equal(again[1], val_idx)


def test_digits32_is_deterministic(digits):
    again = load_data("digits32")
    for a, b in ((digits.train, again.train), (digits.val, again.val)):
        xa, ya = _tensors(a)
        xb, yb = _tensors(b)
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)


# ---------------------------------------------------------------- cifar10


def _write_cifar(folder, n_train=6, n_test=4, protocol=4, labels=None, data=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", n_train), ("test_batch", n_test)):
        batch = {
            b"data": data if data is not None else rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": labels if labels is not None else [i % 10 for i in range(n)],
        }
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return folder


def test_cifar10_folder_loads(tmp_path):
    root = _write_cifar(tmp_path / "cifar", n_train=6, n_test=4)
    bundle = load_data(f"cifar10:{root}")
    assert bundle.num_classes == 10
    assert bundle.input_shape == (3, 32, 32)
    assert len(bundle.train) == 6
    assert len(bundle.val) == 4
    x, y = bundle.train[3]
    assert tuple(x.shape) == (3, 32, 32)
    assert x.dtype == torch.float32
    assert y == 3
    # standardised with the training set's channel statistics
    stacked = torch.stack([bundle.train[i][0] for i in range(6)])
    assert torch.allclose(stacked.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_cifar10_several_train_batches_are_concatenated(tmp_path):
    root = _write_cifar(tmp_path / "cifar", n_train=3, n_test=2)
    with (root / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": np.zeros((5, 3072), np.uint8), b"labels": [7] * 5}, f, protocol=4)
    bundle = load_data(f"cifar10:{root}")
    assert len(bundle.train) == 8
    assert [bundle.train[i][1] for i in range(3, 8)] == [7] * 5


@pytest.mark.parametrize("protocol", [
    3,
    4,
    5,
    2,
])
def test_cifar10_accepts_numpy_arrays_of_any_pickle_protocol(tmp_path, protocol):
    root = _write_cifar(tmp_path / "cifar", protocol=protocol)
    assert len(load_data(f"cifar10:{root}").train) == 6


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_cifar10_pickle_with_foreign_global_is_refused_without_running_it(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = _Evil(os.system, f"touch {marker}")
    else:
        payload = _Evil(eval, f"open({str(marker)!r}, 'w').close()")
    root = _write_cifar(tmp_path / "cifar")
    with (root / "data_batch_1").open("wb") as f:
        pickle.dump({b"data": payload, b"labels": [0]}, f, protocol=4)
    with pytest.raises(InputError, match="refusing to unpickle"):
        load_data(f"cifar10:{root}")
    assert not marker.exists()


def test_cifar10_missing_folder(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_data(f"cifar10:{tmp_path / 'absent'}")


def test_cifar10_folder_without_batches(tmp_path):
    (tmp_path / "README").write_text("not cifar")
    with pytest.raises(InputError, match="data_batch"):
        load_data(f"cifar10:{tmp_path}")


def test_cifar10_folder_without_test_batch(tmp_path):
    root = _write_cifar(tmp_path / "cifar")
    (root / "test_batch").unlink()
    with pytest.raises(InputError, match="test_batch"):
        load_data(f"cifar10:{root}")


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not a pickle", pickle.dumps([1, 2, 3])])
def test_cifar10_corrupt_batch(tmp_path, content):
    root = _write_cifar(tmp_path / "cifar")
    (root / "test_batch").write_bytes(content)
    with pytest.raises(InputError):
        load_data(f"cifar10:{root}")


def test_cifar10_batch_with_wrong_row_length(tmp_path):
    root = _write_cifar(tmp_path / "cifar", data=np.zeros((4, 3000), np.uint8), labels=[0, 1, 2, 3])
    with pytest.raises(InputError, match="not a CIFAR-10"):
        load_data(f"cifar10:{root}")


def test_cifar10_labels_not_matching_images(tmp_path):
    root = _write_cifar(tmp_path / "cifar", data=np.zeros((4, 3072), np.uint8), labels=[0, 1, 2])
    with pytest.raises(InputError):
        load_data(f"cifar10:{root}")


def test_cifar10_label_out_of_range(tmp_path):
    root = _write_cifar(tmp_path / "cifar", n_train=4, n_test=2, labels=[11, 0])
    with pytest.raises(InputError):
        load_data(f"cifar10:{root}")


# ---------------------------------------------------------------- npz


def _npz_arrays():
    rng = np.random.default_rng(1)
    return {
        "x_train": rng.standard_normal((6, 3, 8, 8)).astype(np.float32),
        "y_train": np.array([0, 1, 2, 0, 1, 2]),
        "x_val": rng.standard_normal((3, 3, 8, 8)).astype(np.float32),
        "y_val": np.array([2, 1, 0]),
    }


def test_npz_round_trip(tmp_path):
    arrays = _npz_arrays()
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    bundle = load_data(f"npz:{path}")
    assert bundle.num_classes == 3
    assert bundle.input_shape == (3, 8, 8)
    x_train, y_train = bundle.train.tensors
    x_val, y_val = bundle.val.tensors
    np.testing.assert_array_equal(x_train.numpy(), arrays["x_train"])
    np.testing.assert_array_equal(y_train.numpy(), arrays["y_train"])
    np.testing.assert_array_equal(x_val.numpy(), arrays["x_val"])
    np.testing.assert_array_equal(y_val.numpy(), arrays["y_val"])
    assert y_train.dtype == torch.long


def test_npz_num_classes_counts_validation_labels(tmp_path):
    arrays = _npz_arrays()
    arrays["y_val"] = np.array([0, 4, 1])
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    assert load_data(f"npz:{path}").num_classes == 5


def _truncated(path):
    np.savez(path, **_npz_arrays())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _missing_key(path):
    arrays = _npz_arrays()
    del arrays["y_val"]
    np.savez(path, **arrays)


def _flat_images(path):
    arrays = _npz_arrays()
    arrays["x_train"] = arrays["x_train"].reshape(6, -1)
    np.savez(path, **arrays)


def _object_array(path):
    arrays = _npz_arrays()
    arrays["x_train"] = np.array([None, 1], dtype=object)
    np.savez(path, **arrays)


def _npy_not_npz(path):
    with path.open("wb") as f:
        np.save(f, np.zeros((2, 3)))


def _labels_not_matching_images(path):
    arrays = _npz_arrays()
    arrays["y_train"] = arrays["y_train"][:4]
    np.savez(path, **arrays)


def _string_labels(path):
    arrays = _npz_arrays()
    arrays["y_train"] = np.array(list("abcabc"))
    np.savez(path, **arrays)


def _negative_labels(path):
    arrays = _npz_arrays()
    arrays["y_train"] = np.array([-1, 0, 1, 2, 0, 1])
    np.savez(path, **arrays)


@pytest.mark.parametrize("make", [
    lambda p: p.write_bytes(b"this is not an npz archive" * 4),
    _missing_key,
    _flat_images,
    _object_array,
    _truncated,
    _npy_not_npz,
    _labels_not_matching_images,
    _string_labels,
    _negative_labels,
], ids=["garbage", "missing-key", "flat-images", "object-array", "truncated", "npy-file",
        "label-count", "string-labels", "negative-labels"])
def test_bad_npz_is_input_error(tmp_path, make):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(InputError):
        load_data(f"npz:{path}")


def test_npz_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_data(f"npz:{tmp_path / 'absent.npz'}")


# ---------------------------------------------------------------- imagefolder


def _write_pngs(folder, classes=("cat", "dog"), per_class=5):
    from PIL import Image

    rng = np.random.default_rng(2)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / c / f"{i}.png")


def test_imagefolder_with_stratified_split(tmp_path):
    _write_pngs(tmp_path / "images")
    bundle = load_data(f"imagefolder:{tmp_path / 'images'}")
    assert bundle.num_classes == 2
    assert bundle.input_shape == (3, 224, 224)
    assert len(bundle.train) == 8
    assert len(bundle.val) == 2
    assert sorted(bundle.val[i][1] for i in range(2)) == [0, 1]
    x, y = bundle.train[0]
    assert tuple(x.shape) == (3, 224, 224)
    assert y in (0, 1)


def test_imagefolder_with_train_and_val_subfolders(tmp_path):
    _write_pngs(tmp_path / "images" / "train", per_class=3)
    _write_pngs(tmp_path / "images" / "val", per_class=1)
    bundle = load_data(f"imagefolder:{tmp_path / 'images'}")
    assert bundle.num_classes == 2
    assert len(bundle.train) == 6
    assert len(bundle.val) == 2


def test_imagefolder_missing_or_empty(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_data(f"imagefolder:{tmp_path / 'absent'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="subfolder per class"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize("spec", ["mnist", "imagenet:/data", "", "digits"])
def test_unknown_spec(spec):
    with pytest.raises(InputError, match="unknown data source"):
        load_data(spec)


@pytest.mark.parametrize("spec", ["cifar10", "cifar10:", "npz", "imagefolder"])
def test_spec_without_path(spec):
    with pytest.raises(InputError, match="needs a path"):
        load_data(spec)


def test_loader_limit_is_a_fixed_subset(digits):
    a = torch.cat([y for _, y in digits.loader("val", batch_size=16, limit=40, seed=3)])
    b = torch.cat([y for _, y in digits.loader("val", batch_size=16, limit=40, seed=3)])
    c = torch.cat([y for _, y in digits.loader("val", batch_size=16, limit=40, seed=4)])
    assert len(a) == 40
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- photos (unlabelled)


@pytest.fixture(scope="module")
def photos():
    return load_data("photos")


def test_photos_shapes_and_labels(photos):
    from compressor.data.photos import TRAIN_CROPS, VAL_CROPS

    assert photos.spec == "photos" and not photos.labelled
    assert photos.input_shape == (3, 224, 224)
    assert (len(photos.train), len(photos.val)) == (TRAIN_CROPS, VAL_CROPS)
    x, y = photos.train[0]
    assert tuple(x.shape) == (3, 224, 224) and x.dtype == torch.float32
    assert y == -1
    xb, yb = next(iter(photos.loader("val", batch_size=8, limit=20, seed=1)))
    assert tuple(xb.shape) == (8, 3, 224, 224)
    assert yb.tolist() == [-1] * 8


def test_photos_split_by_source_photo(photos):
    from compressor.data.photos import TRAIN_PHOTOS, VAL_PHOTOS

    train, val = set(photos.train.crop_sources), set(photos.val.crop_sources)
    assert train == set(TRAIN_PHOTOS) and val == set(VAL_PHOTOS)
    assert not train & val
    assert "cat" not in train | val  # the same photo as chelsea


def test_photos_are_deterministic(photos):
    again = load_data("photos")
    assert torch.equal(again.train.images, photos.train.images)
    assert torch.equal(again.val.images, photos.val.images)
    assert not torch.equal(photos.train.images[0], photos.train.images[1])


def test_photos_refit_to_a_model_resolution_and_normalisation(photos):
    from compressor.data import Preprocessing

    bundle = load_data("photos")
    lite = Preprocessing((127.0,) * 3, (128.0,) * 3)
    assert bundle.fit_to(240, lite)
    assert bundle.input_shape == (3, 240, 240)
    x, _ = bundle.val[3]
    assert tuple(x.shape) == (3, 240, 240)
    pixels = x * 128 + 127  # the same crop, rendered at 240 px, back on 0..255
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    assert bundle.val.crop_sources == photos.val.crop_sources
    assert bundle.fit_to(224, photos.preprocessing)
    assert torch.equal(bundle.val.images, photos.val.images)


def test_fixed_sources_do_not_refit(digits):
    from compressor.data import IMAGENET_PREPROCESSING

    assert not digits.fit_to(224, IMAGENET_PREPROCESSING)
    assert digits.input_shape == (3, 32, 32)


def test_grey_photos_become_rgb():
    from compressor.data.photos import read_photo

    camera = read_photo("camera")
    assert camera.shape[0] == 3 and camera.dtype == torch.uint8
    assert torch.equal(camera[0], camera[1]) and torch.equal(camera[1], camera[2])


def test_unlabelled_batches_distil_and_have_no_accuracy():
    from compressor.finetune.training import accuracy, train

    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.full((32,), -1)), batch_size=16)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4)).eval()
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))
    with pytest.raises(InputError, match="no labelled images"):
        accuracy(teacher, loader)
    with pytest.raises(InputError, match="without a teacher"):
        train(student, loader, epochs=1, lr=0.1)
    before = torch.nn.functional.mse_loss(student(x), teacher(x)).item()
    train(student, loader, epochs=20, lr=0.05, teacher=teacher)
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(student(x), teacher(x)).item() < before / 2
