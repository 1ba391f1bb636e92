"""Units are found by tracing; removing them gives a real, smaller module that equals
the original with the removed branches zeroed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compressor.errors import InputError
from compressor.graph.surgery import remove_units
from compressor.graph.units import find_units, units_by_name
from compressor.models.checkpoint import load_checkpoint, save_checkpoint
from compressor.models.loaded import LoadedModel
from compressor.models.zoo import build
from tests.helpers import randomise_batchnorm, zero_branch

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("arch", "count", "projections"), [
    ("resnet20", 9, ["layer2.0", "layer3.0"]),
    ("resnet56", 27, ["layer2.0", "layer3.0"]),
    ("resnet18", 8, ["layer2.0", "layer3.0", "layer4.0"]),
    ("resnet50", 16, ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]),
    ("mobilenet_v2", 10, []),
    ("efficientnet_lite0", 9, []),  # MBConv: x + project(...) with no activation after the add
    ("efficientnet_lite2", 14, []),
])
def test_units_found_by_tracing(arch, count, projections):
    units = find_units(build(arch, 10), X)
    assert len(units) == count
    assert [u.name for u in units if u.kind == "projection"] == projections
    assert [u.order for u in units] == list(range(count))


def test_cifar_stages_group_units_by_output_shape():
    units = find_units(build("resnet20", 10), X)
    assert [u.stage for u in units] == ["16x32x32"] * 3 + ["32x16x16"] * 3 + ["64x8x8"] * 3


class ScaledBody(nn.Module):
    """A user's block written differently: functional relu, shortcut named `skip`."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout))
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        shortcut = x if self.skip is None else self.skip(x)
        return F.relu(shortcut + self.body(x))


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([ScaledBody(8, 8, 1), ScaledBody(8, 16, 2), ScaledBody(16, 16, 1)])
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


def test_users_own_resnet_like_module():
    units = find_units(UserNet().eval(), X)
    assert [(u.name, u.kind, u.shortcut) for u in units] == [
        ("blocks.0", "identity", None), ("blocks.1", "projection", "skip"), ("blocks.2", "identity", None)]


def test_plain_cnn_has_no_units():
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    plain(X)
    assert find_units(plain, X) == []


@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "resnet50", "mobilenet_v2", "efficientnet_lite0", "user"])
def test_removal_equals_zeroed_branch(arch):
    model = UserNet() if arch == "user" else build(arch, 10)
    model = randomise_batchnorm(model)
    units = find_units(model, X)
    chosen = units[:: max(1, len(units) // 3)]  # identity and projection units alike
    zeroed = randomise_batchnorm(UserNet() if arch == "user" else build(arch, 10))
    zeroed.load_state_dict(model.state_dict())
    for unit in chosen:
        zero_branch(zeroed, unit.name)
    pruned = remove_units(zeroed, chosen, X)
    with torch.no_grad():
        expected, got = zeroed(X), pruned(X)
    # the removed branch contributed exactly 0; only fp32 round-off of the remaining ops differs
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_identity_unit_becomes_identity_and_projection_its_shortcut():
    model = build("resnet20", 10)
    units = units_by_name(find_units(model, X), ["layer1.1", "layer2.0"])
    pruned = remove_units(model, units, X)
    assert isinstance(pruned.get_submodule("layer1.1"), nn.Identity)
    replacement = pruned.get_submodule("layer2.0")
    convs = [m for m in replacement.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (1, 1) and convs[0].stride == (2, 2)


def test_unknown_unit_name_lists_the_known_ones():
    units = find_units(build("resnet20", 10), X)
    with pytest.raises(InputError, match="layer1.0"):
        units_by_name(units, ["layer9.9"])


def test_pruned_checkpoint_round_trip(tmp_path):
    model = randomise_batchnorm(build("resnet20", 10))
    units = find_units(model, X)
    pruned = remove_units(model, [units[1], units[3]], X)
    loaded = LoadedModel(pruned, "resnet20", 10, (3, 32, 32), "test", [units[1].name, units[3].name])
    path = save_checkpoint(tmp_path / "m.pt", loaded)
    raw = torch.load(path, weights_only=True)
    assert raw["removed_units"] == ["layer1.1", "layer2.0"]
    again = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(again.model(X), pruned.eval()(X))


def test_stages_fed_by_a_block_that_is_not_a_unit_are_anchored():
    """MobileNetV2's first block of a stage has no residual, so it stays whatever is removed:
    every unit of such a stage may go; a CIFAR ResNet's stages have no such block."""
    from compressor.search.knapsack import removable_limits

    mnv2 = build("mobilenet_v2", 10).eval()
    units = find_units(mnv2, torch.randn(1, 3, 64, 64))
    assert units and all(u.anchored for u in units)
    counts = {}
    for u in units:
        counts[u.stage] = counts.get(u.stage, 0) + 1
    assert removable_limits(units, 1) == counts
    resnet = build("resnet20", 10).eval()
    units = find_units(resnet, torch.randn(1, 3, 32, 32))
    assert not any(u.anchored for u in units)
    assert removable_limits(units, 1) == {"16x32x32": 2, "32x16x16": 2, "64x8x8": 2}


def test_a_c2f_keeps_its_own_layers_so_all_its_bottlenecks_may_go():
    """A C2f splits its cv1's output for its bottlenecks: cv1 and cv2 stay whatever is removed, so every
    bottleneck of its stage may go; a transformer's blocks and a ResNet's are not anchored by it."""
    from compressor.search.knapsack import removable_limits
    from tests.test_branches import TinyDetector, TinyViT

    units = find_units(TinyDetector().eval(), torch.randn(1, 3, 16, 16))
    assert units and all(u.anchored for u in units)
    counts = {}
    for u in units:
        counts[u.stage] = counts.get(u.stage, 0) + 1
    assert removable_limits(units, 1) == counts
    vit = [u for u in find_units(TinyViT().eval(), torch.randn(1, 3, 16, 16)) if u.removes_block]
    assert vit and not any(u.anchored for u in vit)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_a_stem_held_in_the_same_sequential_does_not_anchor_the_stage():
    """ConvNeXt's layout: `features` holds the stem, then each stage's blocks in a Sequential of their own.
    The stem feeds the first stage at its shape, but it is no block of the stage: one block must stay."""
    from compressor.search.knapsack import removable_limits

    features = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Sequential(*[_ResidualBlock(8) for _ in range(3)]),
                             nn.Conv2d(8, 16, 2, stride=2), nn.Sequential(*[_ResidualBlock(16) for _ in range(3)]))
    model = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    units = find_units(model, torch.randn(1, 3, 32, 32))
    assert len(units) == 6 and not any(u.anchored for u in units)
    assert sorted(removable_limits(units, 1).values()) == [2, 2]
