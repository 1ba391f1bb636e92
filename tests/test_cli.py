"""Bad input: one clear line, exit code 2, nothing on disk overwritten."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from compressor.cli.main import main


def _prune_args(out, profile="ort-cpu", **overrides):
    args = {"--model": "resnet56", "--data": "digits32", "--profile": str(profile),
            "--target-speedup": "2", "--out": str(out)}
    args.update(overrides)
    flat = ["prune"]
    for k, v in args.items():
        if v is not None:
            flat += [k, v]
    return flat


def _run_error(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith(f"compressor {args[0]}: error: ")
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture
def bad_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole pickled module: refused by weights_only
    malformed = tmp_path / "bad.yaml"
    malformed.write_text("name: x\nruntime: [onnxruntime\n  threads: 2\n")
    return {"garbage": garbage, "foreign": foreign, "pickled": pickled, "malformed": malformed}


@pytest.mark.parametrize(("override", "message"), [
    ({"--model": "resnet999"}, "unknown model"),
    ({"--model": "/nonexistent/model.pt"}, "checkpoint not found"),
    ({"--model": "garbage"}, "not a loadable checkpoint"),
    ({"--model": "foreign"}, "not a compressor checkpoint"),
    ({"--model": "pickled"}, "not a loadable checkpoint"),
    ({"--profile": "malformed"}, "malformed profile YAML .* line 3"),
    ({"--profile": "no-such-profile"}, "unknown profile"),
    ({"--target-speedup": "0"}, "greater than 1"),
    ({"--target-speedup": "-3"}, "greater than 1"),
    ({"--target-speedup": None, "--target-ms": "0"}, "positive number"),
    ({"--target-speedup": None, "--target-ms": "-1.5"}, "positive number"),
    ({"--data": "cifar10:/nonexistent/cifar"}, "cifar10 folder not found"),
    ({"--data": "imagefolder:/nonexistent/images"}, "image folder not found"),
    ({"--data": "cifar10"}, "needs a path"),
    ({"--data": "mnist"}, "unknown data source"),
    ({"--criterion": "nope"}, "unknown criterion"),
])
def test_prune_bad_input(tmp_path, capsys, bad_files, override, message):
    override = {k: str(bad_files.get(v, v)) if v is not None else None for k, v in override.items()}
    line = _run_error(_prune_args(tmp_path / "out", **override), capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_existing_output_is_not_touched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("mine")
    line = _run_error(_prune_args(out), capsys)
    assert "already exists" in line
    assert (out / "report.json").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def test_unreachable_target_states_fastest_latency(tmp_path, capsys, fast_profile):
    line = _run_error(_prune_args(tmp_path / "out", fast_profile, **{"--target-speedup": "1000"}), capsys)
    assert "unreachable" in line and "fastest reachable latency is" in line and " ms (" in line
    line = _run_error(_prune_args(tmp_path / "out2", fast_profile,
                                  **{"--target-speedup": None, "--target-ms": "0.0001"}), capsys)
    assert "unreachable" in line


def test_profile_refuses_existing_file(tmp_path, capsys, fast_profile):
    out = tmp_path / "lut.json"
    out.write_text("keep")
    _run_error(["profile", "--model", "resnet20", "--profile", str(fast_profile), "--out", str(out)], capsys)
    assert out.read_text() == "keep"


def test_profile_writes_table_with_provenance(tmp_path, capsys, fast_profile):
    out = tmp_path / "lut.json"
    assert main(["profile", "--model", "resnet20", "--profile", str(fast_profile), "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert len(table["savings_ms"]) == 9
    assert table["baseline_ms"] > 0
    assert {"cpu", "physical_cores", "versions", "date"} <= set(table["machine"])
    assert table["machine"]["versions"]["onnxruntime"]
    assert table["profile"]["name"] == "ort-cpu-fast"
    assert all(s["n"] >= 20 for s in table["stats"].values())
    assert table["version"] == 2 and table["design"]["sets"] == sum(len(s["sets"]) - 1
                                                                     for s in table["design"]["sessions"])
    groups = [t for t in table["latency_model"]["terms"] if t["kind"] == "group"]
    assert sorted(len(g["units"]) for g in groups) == [1, 1, 2, 2, 3]  # resnet20: projections alone, per stage
    err = capsys.readouterr().err
    for g in groups:  # one line per group: its saving per unit with its standard error
        assert f"save {g['saving_ms']:7.4f} +- {g['sd_ms']:.4f} ms each" in err
    assert f"removal sets in {len(table['design']['sessions'])} sessions, stopped: " in err


def test_console_script_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "compressor.cli.main", *_prune_args(tmp_path / "o", **{
        "--model": "resnet999"})], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown model 'resnet999'" in result.stderr


def test_units_command_lists_units(capsys):
    assert main(["units", "--model", "resnet20", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in rows].count("projection") == 2


def test_latency_table_for_another_model_or_profile_is_refused(tmp_path, capsys, fast_profile):
    from compressor.latency.table import LatencyTable

    table = LatencyTable("resnet20", [1, 3, 32, 32], {"name": "ort-cpu", "runtime": "onnxruntime"},
                         {"cpu": "x"}, 1.0, {f"layer1.{i}": 0.1 for i in range(3)})
    path = table.save(tmp_path / "lut.json")
    line = _run_error(_prune_args(tmp_path / "out", fast_profile, **{"--latency-table": str(path)}), capsys)
    assert "does not fit" in line and "units differ" in line and "ort-cpu" in line
    (tmp_path / "broken.json").write_text("{not json")
    line = _run_error(_prune_args(tmp_path / "out2", **{"--latency-table": str(tmp_path / "broken.json")}), capsys)
    assert "not a latency table" in line


@pytest.mark.parametrize(("flag", "expected"), [([], None), (["--mimic"], True), (["--no-mimic"], False)])
def test_prune_mimic_flag(flag, expected):
    from compressor.cli.parser import build_parser

    args = build_parser().parse_args(["prune", "--model", "resnet20", "--data", "digits32", "--profile", "ort-cpu",
                                      "--target-speedup", "1.5", "--out", "unused", *flag])
    assert args.mimic is expected
