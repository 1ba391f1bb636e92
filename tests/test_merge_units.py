"""Merge units: found by tracing, scored on the removal scale, applied by surgery, verified."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.criteria import ScoringContext, score_units
from compressor.criteria.merges import score_merge_units
from compressor.errors import InputError
from compressor.graph.merge_units import find_merge_units
from compressor.graph.surgery import remove_units
from compressor.graph.units import find_units
from compressor.models.zoo import build
from compressor.rewrite.linearised import LinearisedBlock, merge_linearised, verify_merges
from tests.helpers import randomise_batchnorm, zero_branch


def _x(shape=(1, 3, 32, 32)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _calibration(n=32):
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return [(x[i:i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, n, 16)]


def test_every_resnet20_block_has_a_merge_unit():
    model = randomise_batchnorm(build("resnet20", 10))
    units = find_units(model, _x())
    merges, refused = find_merge_units(model, units)
    assert refused == {}
    assert [m.path for m in merges] == [u.name for u in units]
    assert all(m.kind == "merge" and m.name.endswith("/merge") for m in merges)
    assert {m.stage for m in merges} == {u.stage for u in units}


def test_squeeze_excite_blocks_are_refused_with_a_reason():
    model = build("mobilenet_v3_small", 10).eval()
    units = find_units(model, _x((1, 3, 64, 64)))
    merges, refused = find_merge_units(model, units)
    assert refused, "mobilenet_v3_small's squeeze-excite blocks cannot merge"
    assert all(isinstance(r, str) and r for r in refused.values())
    assert len(merges) + len(refused) == len(units)


def test_merged_model_keeps_its_shape_and_blocks_become_one_conv():
    model = randomise_batchnorm(build("resnet20", 10))
    x = _x()
    units = find_units(model, x)
    merges, _ = find_merge_units(model, units)
    linearised = remove_units(model, merges[:3], x)
    assert all(isinstance(linearised.get_submodule(m.path), LinearisedBlock) for m in merges[:3])
    merged = merge_linearised(linearised)
    for m in merges[:3]:
        convs = [c for c in merged.get_submodule(m.path).modules() if isinstance(c, nn.Conv2d)]
        assert len(convs) == 1 and convs[0].kernel_size in ((5, 5), (7, 7))
    assert merge_linearised(model) is model  # nothing to merge: the model itself
    # the merged model equals the linearised one away from each merge's border ring
    with torch.no_grad():
        a, b = linearised(x), merged(x)
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-6)
    checks = verify_merges(remove_units(model, merges, x), x)
    assert len(checks) == len(merges)
    assert all(c["interior_max_rel_error"] <= 1e-5 for c in checks.values())
    assert all(c["border_px"] == 1 and not c["exact"] for c in checks.values())


def test_cka_scores_a_free_merge_near_zero_and_others_higher():
    model = randomise_batchnorm(build("resnet20", 10))
    x = _x()
    units = find_units(model, x)
    zero_branch(model, units[1].name)
    merges, _ = find_merge_units(model, units)
    ctx = ScoringContext(model, units, _calibration())
    scores = score_merge_units("cka", ctx, merges)
    removal = score_units("cka", ctx)
    assert scores[merges[1].name] < 1e-6
    assert max(scores.values()) > 1e-3
    assert all(0.0 <= s <= 1.0 + 1e-9 for s in scores.values())
    assert removal[units[1].name] < 1e-6  # the same block is free to remove too


def test_merges_need_a_criterion_that_scores_a_replacement():
    model = build("resnet20", 10).eval()
    units = find_units(model, _x())
    merges, _ = find_merge_units(model, units)
    with pytest.raises(InputError, match="merge units need"):
        score_merge_units("magnitude", ScoringContext(model, units, _calibration()), merges)


def test_a_checkpoint_with_merged_blocks_round_trips(tmp_path):
    from compressor.models.checkpoint import load_checkpoint, save_checkpoint
    from compressor.models.loaded import LoadedModel

    model = randomise_batchnorm(build("resnet20", 10))
    x = _x()
    units = find_units(model, x)
    merges, _ = find_merge_units(model, units)
    chosen = [units[0], merges[4]]
    pruned = remove_units(model, chosen, x)
    save_checkpoint(tmp_path / "m.pt", LoadedModel(pruned, "resnet20", 10, (3, 32, 32), "test",
                                                   [u.name for u in chosen]))
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert isinstance(loaded.model.get_submodule(merges[4].path), LinearisedBlock)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), pruned.eval()(x))
