"""Criterion agreement: known answers on hand-made scores, and `compressor score` end to end."""

from __future__ import annotations

import json
import math

import pytest

from compressor.cli.main import main
from compressor.criteria.agreement import (
    SR_INIT_NOTE,
    agreement,
    least_important,
    notes_for,
    parse_criteria,
    plot_heatmap,
    rank_units,
    render_agreement,
    render_table,
)
from compressor.errors import InputError, ValidationError
from compressor.graph.units import Unit
from tests.helpers import FAST_PROFILE

UNITS = [f"u{i}" for i in range(6)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(values: list[float]) -> dict[str, float]:
    return dict(zip(UNITS, values, strict=True))


def test_identical_rankings_agree_fully():
    # same order, different scale: rank statistics see no difference
    result = agreement({"a": _scores([1, 2, 3, 4, 5, 6]), "b": _scores([10, 20, 30, 40, 50, 600])})
    assert result.k == 2
    assert result.spearman[0][1] == pytest.approx(1.0)
    assert result.kendall[0][1] == pytest.approx(1.0)
    assert result.overlap[0][1] == 1.0
    assert result.least == {"a": ["u0", "u1"], "b": ["u0", "u1"]}


def test_reversed_rankings_disagree_fully():
    result = agreement({"a": _scores([1, 2, 3, 4, 5, 6]), "b": _scores([6, 5, 4, 3, 2, 1])}, k=3)
    assert result.spearman[0][1] == pytest.approx(-1.0)
    assert result.kendall[0][1] == pytest.approx(-1.0)
    assert result.overlap[0][1] == 0.0
    assert result.spearman_p[0][1] < 0.01


def test_overlap_of_hand_made_sets():
    a = _scores([1, 2, 3, 4, 5, 6])  # least 3: u0 u1 u2
    b = _scores([1, 9, 2, 3, 8, 7])  # least 3: u0 u2 u3
    c = _scores([9, 8, 7, 1, 2, 3])  # least 3: u3 u4 u5
    result = agreement({"a": a, "b": b, "c": c}, k=3)
    assert result.overlap == [[1.0, 2 / 3, 0.0], [2 / 3, 1.0, 1 / 3], [0.0, 1 / 3, 1.0]]
    assert least_important(b, 3) == ["u0", "u2", "u3"]


def test_ranks_start_at_least_important_and_average_ties():
    assert rank_units({"x": 0.5, "y": 0.1, "z": 0.9}) == {"x": 2.0, "y": 1.0, "z": 3.0}
    assert rank_units({"x": 1.0, "y": 1.0, "z": 0.0}) == {"x": 2.5, "y": 2.5, "z": 1.0}


def test_constant_scores_are_undefined_not_a_crash(tmp_path):
    scores = {"zeros": _scores([0] * 6), "ramp": _scores([1, 2, 3, 4, 5, 6])}
    result = agreement(scores)
    assert math.isnan(result.spearman[0][1]) and math.isnan(result.kendall[0][1])
    assert math.isnan(result.spearman[0][0])  # a constant criterion has no rank correlation, even with itself
    assert result.spearman[1][1] == pytest.approx(1.0)
    assert result.least["zeros"] == ["u0", "u1"]  # ties broken by unit order
    assert result.tied_at_k == ["zeros"]
    document = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert document["spearman"]["rho"][0][1] is None and document["kendall"]["p"][0][1] is None
    assert document["spearman"]["rho"][1][1] == pytest.approx(1.0)
    assert "n/a" in render_agreement(result)
    assert "tie-breaking" in notes_for(result.criteria, result)[0]
    plot_heatmap(result, tmp_path / "nan.png")  # NaN cells are drawn grey, not an error


def test_table_lists_units_scores_ranks_and_savings():
    units = [Unit("layer1.0", "identity", "16x32x32", 0), Unit("layer2.0", "projection", "32x16x16", 1)]
    scores = {"cka": {"layer1.0": 0.25, "layer2.0": 0.5}, "random": {"layer1.0": 0.5, "layer2.0": 0.5}}
    table = render_table(scores, units, {"layer1.0": 0.0512, "layer2.0": float("nan")})
    lines = table.splitlines()
    assert lines[0].split() == ["unit", "kind", "stage", "cka", "rank", "random", "rank", "saving", "ms"]
    assert lines[1].split() == ["layer1.0", "identity", "16x32x32", "0.25", "1", "0.5", "1.5", "0.0512"]
    assert lines[2].split()[-1] == "n/a"
    assert "saving" not in render_table(scores, units)


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match="unknown criterion 'nope'; known: cka, random"):
        parse_criteria("cka,nope", ["random", "cka"])
    with pytest.raises(InputError, match="more than once"):
        parse_criteria("cka, cka", ["cka"])
    assert parse_criteria(" cka,random ,", ["cka", "random"]) == ["cka", "random"]
    with pytest.raises(InputError, match="different units"):
        agreement({"a": {"x": 1.0, "y": 2.0}, "b": {"x": 1.0, "z": 2.0}})
    with pytest.raises(InputError, match="between 1 and the number of units"):
        agreement({"a": _scores([1, 2, 3, 4, 5, 6])}, k=7)
    with pytest.raises(ValidationError, match="non-finite"):
        agreement({"a": {"x": 1.0, "y": float("nan")}})


def test_sr_init_note_is_carried_only_with_sr_init():
    assert notes_for(["cka", "sr_init"]) == [SR_INIT_NOTE]
    assert notes_for(["cka", "magnitude"]) == []


def test_heatmap_is_png_and_never_overwrites(tmp_path):
    result = agreement({"a": _scores([1, 2, 3, 4, 5, 6]), "b": _scores([2, 1, 3, 4, 6, 5])})
    path = plot_heatmap(result, tmp_path / "agreement.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    existing = tmp_path / "mine.png"
    existing.write_bytes(b"keep me")
    with pytest.raises(InputError, match="already exists"):
        plot_heatmap(result, existing)
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agreement.png", "mine.png"]  # no temp files left


@pytest.fixture
def untrained_resnet20(tmp_path):
    """A checkpoint, so the zoo does not train resnet20 on digits32 first (minutes)."""
    from compressor.models.checkpoint import save_checkpoint
    from compressor.models.loaded import LoadedModel
    from compressor.models.zoo import build

    loaded = LoadedModel(build("resnet20", 10), "resnet20", 10, (3, 32, 32), "test")
    return save_checkpoint(tmp_path / "resnet20.pt", loaded)


def test_cli_score_json_heatmap_and_out(untrained_resnet20, tmp_path, capsys):
    heatmap, out = tmp_path / "agreement.png", tmp_path / "score.json"
    args = ["score", "--model", str(untrained_resnet20), "--data", "digits32", "--criterion", "cka,magnitude,random",
            "--calibration-size", "64", "--json", "--heatmap", str(heatmap), "--out", str(out)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert len(report["units"]) == 9 and report["k"] == 3
    assert report["criteria"] == ["cka", "magnitude", "random"] and report["calibration_size"] == 64
    assert all(len(report["scores"][c]) == 9 for c in report["criteria"])
    assert sorted(report["ranks"]["cka"].values()) == list(range(1, 10))
    assert report["latency_saving_ms"] is None and report["notes"] == []
    assert {"cpu", "logical_cores", "date"} <= set(report["machine"])
    for matrix in (report["agreement"]["spearman"]["rho"], report["agreement"]["kendall"]["tau"],
                   report["agreement"]["overlap"]):
        assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
        assert [matrix[i][i] for i in range(3)] == pytest.approx([1.0, 1.0, 1.0])
    assert heatmap.read_bytes()[:8] == PNG_MAGIC

    # outputs are never overwritten, and unknown criteria are refused before any work
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["score", "--model", "no-such-model", "--data", "digits32", "--criterion", "cka,bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compressor score: error: unknown criterion 'bogus'; known: ") and "cka" in err


def test_cli_score_with_profile_adds_latency_savings(untrained_resnet20, tmp_path, capsys):
    profile = tmp_path / "tiny.yaml"  # the shortest timing floors: only the wiring is under test here
    profile.write_text(FAST_PROFILE.replace("min_runs: 20, min_time_s: 0.15", "min_runs: 5, min_time_s: 0.01"))
    args = ["score", "--model", str(untrained_resnet20), "--data", "digits32", "--criterion", "magnitude,random",
            "--calibration-size", "16", "--profile", str(profile), "--k", "2"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-2:] == ["saving", "ms"]
    rows = [line.split() for line in lines if line.startswith("layer")]
    assert len(rows) == 9
    assert all(math.isfinite(float(row[-1])) for row in rows)  # a measured figure in every row, no n/a
    assert "Overlap of the k = 2 least important units" in "\n".join(lines)
