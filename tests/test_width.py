"""Width units: a kept block or branch slimmed to fewer inner channels (graph/width.py, graph/slim.py).

Surgery must equal the model with the dropped channels zeroed (or read as their means) where dense
layers read them (tests/width_reference.py, hooks on activations: independent of slim.py's own check), exports must
agree with it, recipes must redo it channel for channel, and what cannot slim exactly is refused
with the reason."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from compressor.errors import InputError, ValidationError
from compressor.graph.recipe import apply_recipe, make_recipe
from compressor.graph.slim import SLIM_RTOL
from compressor.graph.surgery import remove_units
from compressor.graph.units import find_units
from compressor.graph.width import find_width_options, width_unit
from tests.helpers import randomise_batchnorm, resnet20
from tests.random_nets import muted_reference, random_net
from tests.test_branches import TinyViT
from tests.width_reference import random_widths, width_muted


def rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


class InvertedResidual(nn.Module):
    """MobileNetV2/EfficientNet's block with squeeze-excite: expand, depthwise, SE, project, + x."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.SiLU())
        self.se_reduce, self.se_expand = nn.Conv2d(hidden, 6, 1), nn.Conv2d(6, hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(self.expand(x))
        h = h * torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        return x + self.project(h)


class NormedInner(nn.Module):
    """A block whose inner channels a LayerNorm normalises together: slimming is not muting there."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Conv2d(c, 2 * c, 1), nn.LayerNorm(2 * c), nn.Conv2d(2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.up(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.down(h)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.blocks = nn.Sequential(InvertedResidual(16, 48), InvertedResidual(16, 40), NormedInner(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return randomise_batchnorm(SmallNet())


def every_other(n: int, count: int) -> tuple[int, ...]:
    return tuple(range(1, n, 2))[:count]


@pytest.fixture(scope="module")
def r20():
    model = resnet20()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    units = find_units(model, x)
    options, refused = find_width_options(model, units)
    return model, x, units, options, refused


def test_resnet_blocks_slim_their_inner_conv_and_keep_the_residual_width(r20):
    model, x, units, options, refused = r20
    assert not refused
    assert [o.name for o in options] == [u.name for u in units]
    for option in options:
        assert [(g.root, g.layers) for g in option.groups] == [("conv1", ("conv1", "bn1", "conv2"))]
    layer3 = next(o for o in options if o.name == "layer3.1")
    unit = width_unit(layer3, 0.5, (every_other(64, 32),))
    assert unit.name == "layer3.1@50%" and unit.path == "layer3.1" and unit.kind == "width"
    pruned = remove_units(model, [unit], x)
    block = pruned.get_submodule("layer3.1")
    assert (block.conv1.out_channels, block.bn1.num_features, block.conv2.in_channels) == (32, 32, 32)
    assert block.conv2.out_channels == 64, "the residual stream keeps its width"
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert rel(pruned(x), width_muted(model, [unit])(x)) <= SLIM_RTOL


def test_width_and_depth_units_together_equal_their_references(r20):
    model, x, units, options, _ = r20
    by = {o.name: o for o in options}
    widths = [width_unit(by["layer1.0"], 0.25, ((3, 5, 7, 11),)),
              width_unit(by["layer2.0"], 0.75, (tuple(range(8, 32)),))]
    removed = [u for u in units if u.name == "layer3.2"]
    pruned = remove_units(model, widths + removed, x)
    muted = width_muted(model, widths)
    muted.layer3[2] = remove_units(model, removed).layer3[2]
    with torch.no_grad():
        assert rel(pruned(x), muted(x)) <= SLIM_RTOL


def test_inverted_residual_slims_through_depthwise_and_squeeze_excite():
    model = small_net()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    options, refused = find_width_options(model, find_units(model, x))
    by = {o.name: o for o in options}
    assert [g.root for g in by["blocks.0"].groups] == ["expand.0", "se_reduce"]
    assert {"dw.0", "dw.1", "se_expand", "project.0"} <= set(by["blocks.0"].groups[0].layers)
    unit = width_unit(by["blocks.0"], 0.5, (every_other(48, 24), (0, 2, 4)))
    pruned = remove_units(model, [unit], x)
    assert pruned.blocks[0].dw[0].groups == pruned.blocks[0].dw[0].out_channels == 24
    with torch.no_grad():
        assert rel(pruned(x), width_muted(model, [unit])(x)) <= SLIM_RTOL
    # a LayerNorm over the inner channels: removing some changes the others, so it is refused with the reason
    assert "blocks.2" not in by
    assert "muted" in refused["blocks.2"] and "up:" in refused["blocks.2"]


def test_transformer_mlp_slims_and_an_attention_with_a_derived_head_size_is_refused():
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    units = find_units(model, x)
    options, refused = find_width_options(model, units)
    assert sorted(o.name for o in options) == ["blocks.0/mlp", "blocks.1/mlp", "blocks.2/mlp"]
    assert all(o.groups[0].root == "mlp.0" and o.groups[0].channels == 32 for o in options)
    assert "fails" in refused["blocks.1/attn"]  # its reshape computes the head size from the input width
    unit = width_unit(options[1], 0.5, (every_other(32, 16),))
    assert unit.name == "blocks.1/mlp@50%" and unit.members == ("mlp", "norm2")
    pruned = remove_units(model, [unit], x)
    assert pruned.blocks[1].mlp[0].out_features == 16 and pruned.blocks[1].mlp[2].out_features == 16
    with torch.no_grad():
        assert rel(pruned(x), width_muted(model, [unit])(x)) <= SLIM_RTOL


def test_exports_match_the_muted_reference(r20, tmp_path):
    pytest.importorskip("openvino")
    from compressor.rewrite.fold import fold_batchnorm
    from exporters import Backend

    model, _, _, options, _ = r20
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    units = [width_unit(options[i], 0.5, (every_other(options[i].groups[0].channels,
                                                     options[i].groups[0].channels // 2),)) for i in (0, 4, 8)]
    pruned = fold_batchnorm(remove_units(model, units, x), x)[0]
    with torch.no_grad():
        expected = width_muted(model, units)(x).numpy()
    for runtime in ("onnxruntime", "openvino"):
        backend = Backend(runtime)
        path = backend.export(pruned, x, tmp_path / runtime)  # validated against torch by the exporter
        assert backend.check_outputs(path, x, expected, 1) <= backend.exporter.atol + backend.exporter.rtol * 10


def test_recipe_redoes_the_exact_channels_and_a_checkpoint_loads(r20, tmp_path):
    model, x, units, options, _ = r20
    chosen = [width_unit(options[1], 0.5, ((0, 2, 3, 5, 8, 9, 12, 15),)), units[6]]
    pruned = remove_units(model, chosen, x)
    recipe = json.loads(json.dumps(make_recipe(chosen, (3, 32, 32))))
    entry = recipe["units"][0]
    assert entry["action"] == "slim" and entry["slim"]["groups"] == [
        {"root": "conv1", "channels": 16, "keep": [0, 2, 3, 5, 8, 9, 12, 15]}]
    again = apply_recipe(resnet20(), recipe)
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))
    from compressor.models.cifar_resnet import CifarResNet

    fresh = apply_recipe(CifarResNet(20, 10), recipe)  # other weights, the same shapes
    fresh.load_state_dict(pruned.state_dict())  # strict: the pruned model's state_dict fits
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))


@pytest.mark.parametrize(("change", "message"), [
    (lambda g: g.update(keep=[0, 99]), "needs"),
    (lambda g: g.update(keep=list(range(16))), "fewer than all"),
    (lambda g: g.update(root="conv9"), "has no such layer"),
    (lambda g: g.update(channels=32, keep=[0, 1]), "from 32 channels"),
])
def test_a_recipe_with_impossible_channels_is_refused(r20, change, message):
    _, _, _, options, _ = r20
    recipe = make_recipe([width_unit(options[0], 0.5, (tuple(range(8)),))], (3, 32, 32))
    change(recipe["units"][0]["slim"]["groups"][0])
    with pytest.raises(InputError, match=message):
        apply_recipe(resnet20(), recipe)


def test_two_levels_of_one_branch_are_refused(r20):
    model, x, _, options, _ = r20
    twice = [width_unit(options[0], 0.5, (tuple(range(8)),)), width_unit(options[0], 0.25, (tuple(range(4)),))]
    with pytest.raises(ValidationError, match="at most one level per branch"):
        remove_units(model, twice, x)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(seed=st.integers(0, 10**6), pick=st.integers(0, 10**6))
def test_random_nets_slim_to_their_zeroed_channel_reference(seed, pick, tmp_path_factory):
    """Random residual nets (tests/random_nets.py): random levels and random channels kept on about half the
    blocks that slim, half of those with random channel means, a random removal among the others; the pruned net
    equals the reference (removed branches muted, dropped channels zeroed or read as their means), and its ONNX
    export agrees with the reference in ONNX Runtime.
    benchmarks/random_architectures.py --moves depth+width runs this on 1,000 nets."""
    import onnxruntime as ort

    from compressor.rewrite.fold import fold_batchnorm
    from exporters import get_exporter

    net = random_net(seed)
    x = torch.randn(2, *net.input_shape, generator=torch.Generator().manual_seed(seed))
    units = find_units(net.model, x)
    options, _ = find_width_options(net.model, units)
    rng = random.Random(pick)
    widths = random_widths(options, rng, net.model)
    slimmed = {u.path for u in widths}
    removed = [u for u in units if u.path not in slimmed and u.kind in ("identity", "projection")
               and rng.random() < 0.4]  # muted_reference mutes whole blocks
    pruned = remove_units(net.model, widths + removed, x)
    reference = width_muted(muted_reference(net.model, [u.name for u in removed]), widths)
    with torch.no_grad():
        expected = reference(x)
        assert rel(pruned(x), expected) <= SLIM_RTOL
    folded = fold_batchnorm(pruned, x)[0]
    path = get_exporter("onnx").export(folded, x[:1], tmp_path_factory.mktemp("onnx") / "m.onnx")
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x[:1].numpy()})[0]
    np.testing.assert_allclose(got, expected[:1].numpy(), atol=1e-4, rtol=1e-3)


def test_random_nets_offer_width_options():
    """Over 8 seeds the generator's blocks give width options."""
    found = 0
    for seed in range(8):
        net = random_net(seed)
        options, _ = find_width_options(net.model, find_units(net.model, torch.randn(1, *net.input_shape)))
        found += len(options)
    assert found >= 8


def test_dropped_channels_read_as_their_means_where_the_slim_has_them():
    """With calibration means (criteria/means.py), a dropped channel reads as its mean in every dense layer that
    reads it (here the squeeze-excite's reduce and the projection), not as zero: the surgery equals hooks that
    put the means into the activations, and it keeps the block nearer the unpruned one than zeroing does."""
    from compressor.criteria.means import dense_input_means

    torch.manual_seed(0)
    model = randomise_batchnorm(SmallNet()).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    options, _ = find_width_options(model, find_units(model, x))
    batches = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    fills = dense_input_means(model, [o.unit.path for o in options], batches)
    assert {layer for layer, _ in fills["blocks.0"]} == {"expand.0", "se_reduce", "se_expand", "project.0"}
    keep = (tuple(range(0, 48, 2)), (0, 1, 2))  # the expansion and the squeeze-excite
    filled = width_unit(options[0], 0.5, keep, fill=fills["blocks.0"])
    zeroed = width_unit(options[0], 0.5, keep)
    with torch.no_grad():
        full = model(x)
        pruned = remove_units(model, [filled], x)
        assert pruned.blocks[0].project[0].bias is not None  # the means' contribution, in a bias made for it
        assert rel(pruned(x), width_muted(model, [filled])(x)) <= SLIM_RTOL
        assert rel(pruned(x), full) < rel(remove_units(model, [zeroed], x)(x), full)
    recipe = json.loads(json.dumps(make_recipe([filled], (3, 16, 16))))
    again = apply_recipe(copy.deepcopy(model), recipe)
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


class TwinBranches(nn.Module):
    """Two 3x3 branches concatenated into one zero-padded 3x3 conv: a consumer that reads two groups' channels."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, 12, 3, 1, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(20, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fuse(torch.cat([self.a(x), self.b(x)], 1))


def test_means_fill_every_group_a_consumer_reads_and_its_padded_border():
    """A consumer reading two groups' channels (a concatenation) takes the means of both groups' dropped channels,
    and where it zero-pads, a dropped channel reads as its mean at the border too: the surgery equals hooks that
    put the means into the activations and pad them."""
    torch.manual_seed(0)
    model = randomise_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), TwinBranches(8))).eval()
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    options, refused = find_width_options(model, find_units(model, x))
    assert [o.unit.path for o in options] == ["1"], refused
    assert sorted(g.root for g in options[0].groups) == ["a.0", "b.0"]
    rng = random.Random(0)
    fill = (("fuse.0", tuple(rng.gauss(0.0, 1.0) for _ in range(20))),)
    keep = tuple(tuple(sorted(rng.sample(range(g.channels), g.channels // 2))) for g in options[0].groups)
    unit = width_unit(options[0], 0.5, keep, fill=fill)
    with torch.no_grad():
        assert rel(remove_units(model, [unit], x)(x), width_muted(model, [unit])(x)) <= SLIM_RTOL
