"""Attention heads as width units (graph/heads.py): a transformer's attention branch keeps whole heads.

Every slimmed model is compared with tests/width_reference.py's muted model (the dropped heads' inputs to
the output projection zeroed by hooks, nothing pruned), within SLIM_RTOL: the same sums over fewer zero
terms, so only float32 summation order moves the last bits."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.criteria.channels import ChannelContext, rank_channels
from compressor.graph.recipe import apply_recipe, make_recipe, width_units
from compressor.graph.slim import SLIM_RTOL
from compressor.graph.surgery import remove_units
from compressor.graph.units import find_units
from compressor.graph.width import find_width_options, width_unit
from compressor.models.vit_digits import VisionTransformer
from tests.random_nets import random_net
from tests.width_reference import random_fill, random_widths, width_muted


def rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def small_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(dim=32, depth=2, heads=4).eval()


@pytest.fixture(scope="module")
def vit():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    units = find_units(model, x)
    options, refused = find_width_options(model, units)
    return model, x, {o.name: o for o in options}, refused


def test_an_attention_branch_slims_by_whole_heads_and_equals_the_muted_model(vit):
    model, x, options, refused = vit
    attn = options["blocks.1/attn"]
    assert [(g.root, g.channels) for g in attn.groups] == [("attn", 4)]  # heads, not qkv's 96 rows
    assert "blocks.1/attn" not in refused
    assert [(g.root, g.channels) for g in options["blocks.1/mlp"].groups] == [("mlp.fc1", 128)]
    rng = random.Random(0)
    for keep in ((0, 2), (3,), (0, 1, 3)):
        for fill in ((), random_fill(model.get_submodule(attn.unit.path), rng)):
            unit = width_unit(attn, 0.5, (keep,), fill=fill)
            pruned = remove_units(model, [unit], x)
            got = pruned.blocks[1].attn
            assert got.heads == len(keep) and got.head_dim == 8
            assert tuple(got.qkv.weight.shape) == (3 * 8 * len(keep), 32)
            assert tuple(got.proj.weight.shape) == (32, 8 * len(keep))
            # the kept heads' q, k and v rows, in order: head h of q is rows 8h..8h+7, of k 32+8h.., of v 64+8h..
            rows = [p * 32 + h * 8 + i for p in range(3) for h in keep for i in range(8)]
            assert torch.equal(got.qkv.weight, model.blocks[1].attn.qkv.weight[rows])
            with torch.no_grad():
                assert rel(pruned(x), width_muted(model, [unit])(x)) <= SLIM_RTOL
                assert rel(pruned(x), model(x)) > 1e-3  # the heads dropped did contribute


def test_heads_and_mlp_width_together_export_and_a_recipe_redoes_them(vit, tmp_path):
    pytest.importorskip("openvino")
    from exporters import Backend

    model, x, options, _ = vit
    units = [width_unit(options["blocks.0/attn"], 0.5, ((1, 2),)),
             width_unit(options["blocks.0/mlp"], 0.5, (tuple(range(0, 128, 2)),)),
             width_unit(options["blocks.1/attn"], 0.75, ((0, 1, 3),))]
    pruned = remove_units(model, units, x)
    with torch.no_grad():
        assert rel(pruned(x), width_muted(model, units)(x)) <= SLIM_RTOL
        one = x[:1]
        expected = width_muted(model, units)(one).numpy()
    for runtime in ("onnxruntime", "openvino"):  # each export validated against torch by the exporter, then here
        backend = Backend(runtime)
        path = backend.export(pruned, one, tmp_path / runtime)
        assert backend.check_outputs(path, one, expected, 1) <= backend.exporter.atol + backend.exporter.rtol * 10
    recipe = json.loads(json.dumps(make_recipe(units, (3, 32, 32))))
    assert recipe["units"][0]["slim"]["groups"] == [{"root": "attn", "channels": 4, "keep": [1, 2], "heads": True}]
    assert recipe["units"][0]["becomes"] == "its block slimmed (attn 2 of 4 heads)"
    assert recipe["units"][1]["becomes"] == "its block slimmed (mlp.fc1 64 of 128 channels)"
    fresh = apply_recipe(VisionTransformer(dim=32, depth=2, heads=4), recipe)  # other weights, the same shapes
    fresh.load_state_dict(pruned.state_dict())
    assert fresh.blocks[0].attn.heads == 2 and fresh.blocks[1].attn.heads == 3
    assert make_recipe(width_units(recipe["units"], find_units(fresh_model := small_vit(), x), fresh_model),
                       (3, 32, 32))["units"] == recipe["units"]  # the head groups read back as heads
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))
    recipe["units"][0]["slim"]["groups"][0]["channels"] = 8
    with pytest.raises(Exception, match="from 8 channels"):
        apply_recipe(small_vit(), recipe)


def test_head_criteria_rank_a_louder_head_first(vit):
    model, x, options, _ = vit
    loud = small_vit()
    with torch.no_grad():  # head 2 of blocks.0's attention: its value rows and its proj columns 4x larger
        loud.blocks[0].attn.qkv.weight[64 + 16:64 + 24] *= 4
        loud.blocks[0].attn.proj.weight[:, 16:24] *= 4
    option = [options["blocks.0/attn"]]
    batches = [(x, torch.tensor([0, 1]))]
    for name in ("peel", "magnitude", "magnitude_l2", "taylor"):
        scores = rank_channels(name, ChannelContext(loud, option, batches))["blocks.0/attn"][0]
        assert scores.shape == (4,) and int(scores.argmax()) == 2, name
    with torch.no_grad():  # only head 1's query rows (8..15) larger: the magnitudes read qkv's rows as q, k, v
        loud = small_vit()
        loud.blocks[0].attn.qkv.weight[8:16] *= 8
    for name in ("magnitude", "magnitude_l2"):
        assert int(rank_channels(name, ChannelContext(loud, option, batches))["blocks.0/attn"][0].argmax()) == 1


@pytest.mark.parametrize("arch", ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_timm_attentions_slim_by_heads(arch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = {"img_size": 64, "depth": 2} if arch.startswith("deit") else {"img_size": 64, "depths": (1, 1, 1, 1)}
    model = timm.create_model(arch, pretrained=False, num_classes=5, **kw).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    units = find_units(model, x)
    options, _ = find_width_options(model, units)
    heads = [o for o in options if o.groups[0].root.endswith("attn")]
    assert heads, [o.name for o in options]
    option = heads[0]
    count = option.groups[0].channels
    unit = width_unit(option, 0.5, (tuple(range(0, count, 2)),))
    pruned = remove_units(model, [unit], x)
    attention = pruned.get_submodule(option.unit.path).get_submodule(option.groups[0].root)
    assert attention.num_heads == count // 2 + count % 2
    with torch.no_grad():
        assert rel(pruned(x), width_muted(model, [unit])(x)) <= SLIM_RTOL


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(seed=st.integers(0, 10**6))
def test_random_transformer_nets_slim_heads_to_their_muted_reference(seed):
    """Random nets with transformer blocks (tests/random_nets.py): a fused attention on tokens keeps its own head
    size and slims by heads, the others are refused; random heads and channels kept on about half the options,
    half with random means; the pruned net equals the reference.
    benchmarks/random_architectures.py --families transformer --moves depth+width runs this on 1,000 nets."""
    from compressor.graph.heads import head_count

    net = random_net(seed, extra=("transformer",))
    x = torch.randn(2, *net.input_shape, generator=torch.Generator().manual_seed(seed))
    units = find_units(net.model, x)
    options, refused = find_width_options(net.model, units)
    for unit in units:  # every attention that reads its own head size slims by heads; the others do not
        if unit.kind == "branch" and unit.name.endswith("/attn"):
            attention = net.model.get_submodule(unit.path).attn
            by_heads = attention.head_dim is not None and attention.heads >= 2
            assert any(o.name == unit.name and o.groups[0].root == "attn" for o in options) == by_heads, unit.name
            assert by_heads or unit.name in refused or attention.heads < 2
    widths = random_widths(options, random.Random(seed), net.model)
    pruned = remove_units(net.model, widths, x)
    with torch.no_grad():
        assert rel(pruned(x), width_muted(net.model, widths)(x)) <= SLIM_RTOL
    for unit in widths:
        block = pruned.get_submodule(unit.path)
        for root, kept in zip(unit.slim.roots, unit.slim.kept, strict=True):
            if head_count(net.model.get_submodule(unit.path).get_submodule(root)) is not None:
                assert block.get_submodule(root).heads == kept


def test_an_attention_of_1x1_convolutions_is_refused_with_why_and_not_traced_through_its_heads():
    """random_net(0)'s block 9 attends over a map with 1x1-convolution qkv and proj: not slimmable by heads, and
    Torch-Pruning's grouping through its head reshape never finishes, so its qkv is never a root; its MLP still
    slims."""
    net = random_net(0, extra=("transformer",))
    x = torch.randn(2, *net.input_shape, generator=torch.Generator().manual_seed(0))
    options, refused = find_width_options(net.model, find_units(net.model, x))
    assert "does not slim" in refused["9/attn"] and "9/attn" not in {o.name for o in options}
    assert [g.root for o in options if o.name == "9/mlp" for g in o.groups] == ["mlp.fc1"]
    assert [g.root for o in options if o.name == "3.1/attn" for g in o.groups] == ["attn"]  # 3 heads, fused
