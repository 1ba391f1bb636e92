"""A whole prune with --moves depth+width on the table device (latencies a known function of the units taken,
nothing timed): the target is met by the set an exhaustive search over every block's {keep, remove, slim to a
level} finds with the run's own scores, the recipe redoes the slimmed model, and the checkpoint loads."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import compressor
from compressor.graph.recipe import apply_recipe
from compressor.models.checkpoint import load_checkpoint
from tests.helpers import resnet20
from tests.test_e2e_table import BAND, BASE_MS, MARGIN, OPTIONS, SAVINGS
from tests.test_table_device import table_profile, write_table

# a slimmed block saves part of what removing it saves; levels the table device leaves (channel counts rounded to
# multiples of 8, not timed): 16-channel blocks keep 8 (@50%), 32 keep 24/16/8, 64 keep 48/32/16. Every figure is a
# multiple of 0.005 ms and the table's savings add up to 2.5 ms, so the knapsack's bins (1/1000 of it) are exact.
WIDTH_SAVINGS = {**{f"layer1.{i}@50%": 0.05 for i in range(3)},
                 **{f"layer2.{i}@{lv}%": s for i in range(3) for lv, s in ((75, 0.03), (50, 0.05), (25, 0.07))},
                 **{f"layer3.{i}@{lv}%": s for i in range(3) for lv, s in ((75, 0.05), (50, 0.10), (25, 0.15))}}
ALL = {**SAVINGS, **WIDTH_SAVINGS}


def stage_options(stage: int, importance: dict[str, float]) -> list[tuple[tuple[str, ...], float, float]]:
    """Every choice for one stage's three blocks (keep, remove, or a level each; at most two removed):
    (names, saving ms, importance)."""
    per_block = [[None, f"layer{stage}.{i}", *[n for n in WIDTH_SAVINGS if n.startswith(f"layer{stage}.{i}@")]]
                 for i in range(3)]
    found = []
    for pick in itertools.product(*per_block):
        names = tuple(n for n in pick if n)
        if sum("@" not in n for n in names) <= 2:
            found.append((names, sum(ALL[n] for n in names), sum(importance[n] for n in names)))
    return found


def exact_trials(importance: dict[str, float], speedup: float) -> list[tuple[str, ...]]:
    """As tests/test_e2e_table.exact_trials, over every set of one option per block."""
    aimed = BASE_MS / speedup * (1 - MARGIN)
    sets = [(a[0] + b[0] + c[0], a[1] + b[1] + c[1], a[2] + b[2] + c[2])
            for a, b, c in itertools.product(*(stage_options(s, importance) for s in (1, 2, 3)))]
    assert all(abs(BASE_MS - saving - aimed) > 1e-6 for _, saving, _ in sets), "a set on the boundary"
    meeting = [s for s in sets if BASE_MS - s[1] <= aimed]
    trials = [min(meeting, key=lambda s: (s[2], s[1]))]
    while BASE_MS - trials[-1][1] < aimed * (1 - BAND):
        less = [s for s in meeting if s[1] < trials[-1][1] - 1e-9]
        if not less:
            break
        trials.append(min(less, key=lambda s: (s[2], s[1])))
    return [t[0] for t in trials]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("width")
    write_table(folder, ALL)
    log = []
    result = compressor.prune("tests.helpers:resnet20", "digits32", compressor.Speedup(1.6),
                              profile=str(table_profile(folder)), out=folder / "run", log=log.append,
                              selection="knapsack", moves="depth+width", **OPTIONS)
    print("\n".join(log))
    return folder / "run", result


def test_depth_and_width_meet_the_target_with_the_exact_optimum(run):
    out, result = run
    report = result.report
    importance = {u["name"]: u["importance"] for u in report["units"]}
    assert set(importance) == set(ALL), "every block's removal and every level the table device leaves"
    expected = exact_trials(importance, 1.6)
    delivered = report["removed_units"]
    assert report["target_met"] and report["speedup_measured"] >= 1.6
    assert sorted(delivered) == sorted(expected[-1]), f"delivered {delivered}, exhaustive search {expected}"
    assert [sorted(t["removed"]) for t in report["search"]["trials"]] == [sorted(s) for s in expected]
    assert any("@" in n for n in delivered), "the optimum here slims a block (the savings are designed so)"
    width = report["width"]
    assert width["moves"] == "depth+width" and width["channel_criterion"] == "magnitude"
    assert set(width["refused_levels"]) == {f"layer1.{i}@{lv}%" for i in range(3) for lv in (75, 25)}
    assert "Moves depth+width" in (out / "report.md").read_text()


def test_the_recipe_and_the_checkpoint_redo_the_slimmed_model(run):
    out, result = run
    recipe = json.loads((out / "recipe.json").read_text())
    slimmed = [u for u in recipe["units"] if u["kind"] == "width"]
    assert slimmed and all(u["action"] == "slim" and u["slim"]["groups"][0]["root"] == "conv1" for u in slimmed)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    redone = apply_recipe(resnet20(), recipe)  # finetune_epochs 0: the pruned model is the recipe on the weights
    loaded = load_checkpoint(out / "model.pt").model
    with torch.no_grad():
        assert torch.allclose(redone(x), result.model(x), atol=1e-5)
        assert torch.allclose(loaded(x), result.model(x), atol=1e-5)
    for u in slimmed:
        block = loaded.get_submodule(u["name"].split("@")[0])
        assert block.conv1.out_channels == len(u["slim"]["groups"][0]["keep"]) < u["slim"]["groups"][0]["channels"]
