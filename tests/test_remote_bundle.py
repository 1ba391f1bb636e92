"""Offline bundles: written here, timed by measure.py with only numpy and the runtime, read back by
`prune --latency-table` and `bench --results`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.cli.main import main
from compressor.graph.units import find_units
from compressor.latency.deploy import Deployment
from compressor.latency.profiles import parse_profile
from compressor.models.sources import load_model
from compressor.stages.table import load_fitting_table
from tests.helpers import FAST_PROFILE
from tests.test_remote_runner import ALLOWED, FORBIDDEN, imported_modules, run_isolated

pytestmark = pytest.mark.timing  # compares real latencies: run alone (make test)

BUNDLE_FILES = {"artifacts", "input.npy", "manifest.json", "measure.py", "runner.py", "timing.py", "records.py"}


@pytest.fixture(scope="module")
def table_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    profile = folder / "fast.yaml"
    profile.write_text(FAST_PROFILE)
    code = main(["profile", "--model", "resnet56", "--data", "digits32", "--profile", str(profile),
                 "--bundle", str(folder / "b")])
    return code, folder / "b", profile


def test_profile_bundle_holds_candidates_runner_and_manifest(table_bundle):
    code, bundle, _ = table_bundle
    assert code == 0
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["job"] == "latency-table" and manifest["runtime"] == "onnxruntime"
    artifacts = manifest["artifacts"]
    assert artifacts[0]["removed"] is None and all(a["removed"] for a in artifacts[1:])  # the baseline, then sets
    assert len(artifacts) == 1 + manifest["design"]["sets"] < 28  # fewer models than one per unit
    assert {u["name"] for u in manifest["units"]} >= {n for a in artifacts[1:] for n in a["removed"]}
    assert not list(bundle.parent.glob(".b.*"))  # no staging folder left


def test_measure_py_writes_a_table_that_prune_accepts(table_bundle, tmp_path, digits):
    _, bundle, profile_path = table_bundle
    result = run_isolated(bundle / "measure.py", "--out", str(tmp_path / "results.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    direct, everything = imported_modules(result.stderr)
    assert direct - ALLOWED <= set(__import__("sys").stdlib_module_names) and not everything & FORBIDDEN
    table = json.loads((tmp_path / "results.json").read_text())
    assert {"cpu", "hostname", "model", "kernel", "runtime_version", "measurements", "throttled"} <= set(
        table["machine"])
    profile = parse_profile(profile_path.read_text(), str(profile_path))
    loaded = load_model("resnet56", digits)
    deployment = Deployment(profile, loaded.input_shape)
    units = find_units(loaded.model, deployment.example)
    fitted, note = load_fitting_table(tmp_path / "results.json", units, deployment)
    assert fitted.baseline_ms > 0 and set(fitted.savings_ms) == {u.name for u in units}
    assert "reusing latency table" in note and fitted.version == 2
    (session,) = table["design"]["sessions"]  # one session on the device, every set with the baseline
    assert session["device"] == table["machine"]["hostname"] and len(session["sets"]) == len(session["stats"])
    assert fitted.sd_ms(fitted.savings_ms) > 0 and fitted.predict_ms([]) == pytest.approx(fitted.baseline_ms)


def test_a_damaged_bundle_is_refused_on_the_device(table_bundle, tmp_path):
    _, bundle, _ = table_bundle
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(bundle, copy)
    victim = copy / json.loads((copy / "manifest.json").read_text())["artifacts"][3]["file"]
    victim.write_bytes(victim.read_bytes()[:-10])
    result = run_isolated(copy / "measure.py", "--out", str(tmp_path / "r.json"))
    assert result.returncode == 2 and "does not match its sha256" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_bundle_folder_is_never_overwritten(table_bundle, capsys):
    _, bundle, profile = table_bundle
    code = main(["profile", "--model", "resnet56", "--data", "digits32", "--profile", str(profile),
                 "--bundle", str(bundle)])
    assert code == 2 and "already exists" in capsys.readouterr().err


def _two_models(tmp_path: Path, widths: tuple[int, int] = (8, 32)) -> tuple[Path, Path]:
    from exporters.onnx import OnnxExporter

    paths = []
    for width in widths:
        model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()
        paths.append(OnnxExporter().export(model, torch.randn(1, 3, 32, 32), tmp_path / f"w{width}.onnx", 17))
    return paths[0], paths[1]


def test_bench_bundle_gates_on_the_devices_figures(tmp_path, fast_profile, capsys):
    small, large = _two_models(tmp_path)
    common = ["bench", "--artifact", str(large), "--against", str(small), "--profile", str(fast_profile)]
    assert main([*common, "--bundle", str(tmp_path / "bb")]) == 0
    assert "measure.py" in capsys.readouterr().out
    result = run_isolated(tmp_path / "bb" / "measure.py", "--out", str(tmp_path / "res.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    code = main([*common, "--results", str(tmp_path / "res.json"), "--out", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == (1 if report["verdict"]["verdict"] == "regression" else 0)
    assert report["verdict"]["ratio"] > 1  # the wider model is slower, on the device's own samples
    assert report["candidate"]["machine"]["results_file"].endswith("res.json")
    assert report["candidate"]["machine"]["hostname"]
    (tmp_path / "other").mkdir()
    other, _ = _two_models(tmp_path / "other", widths=(9, 10))  # an artifact the device did not time
    capsys.readouterr()
    assert main([*common[:3], "--against", str(other), *common[5:], "--results", str(tmp_path / "res.json")]) == 2
    assert "has no figures for" in capsys.readouterr().err


def test_a_bundle_carries_the_parallel_probe_and_the_device_frames_its_session_with_it(tmp_path, capsys):
    """A profile that probes at 2 threads: the bundle holds the probe, measure.py times it before and after the
    session, and the results say what it read, as a connected device's do; at one thread it is left out."""
    small, large = _two_models(tmp_path)
    probed = FAST_PROFILE.replace("threads: null", "threads: 2")
    probed = probed.replace("parallel_probe: false", "parallel_probe: true")
    assert probed.count("threads: 2") == 1 and "parallel_probe: true" in probed
    for threads, text in ((2, probed), (1, probed.replace("threads: 2", "threads: 1"))):
        profile = tmp_path / f"p{threads}.yaml"
        profile.write_text(text)
        folder = tmp_path / f"b{threads}"
        assert main(["bench", "--artifact", str(large), "--against", str(small), "--profile", str(profile),
                     "--bundle", str(folder)]) == 0
        manifest = json.loads((folder / "manifest.json").read_text())
        assert ("probe" in manifest) == (threads == 2) and (folder / "probe").exists() == (threads == 2)
        result = run_isolated(folder / "measure.py", "--out", str(tmp_path / f"r{threads}.json"))
        assert result.returncode == 0, result.stderr[-2000:]
        machine = json.loads((tmp_path / f"r{threads}.json").read_text())["machine"]
        (record,) = machine["measurements"]
        if threads == 1:
            assert "parallel_speedup" not in machine and "probe_ms" not in record
            continue
        assert machine["parallel_speedup"]["probes"] == 2 and machine["parallel_speedup"]["low"] > 0
        assert {k: record["probe_ms"][k]["threads"] for k in ("start", "end")} == {"start": 2, "end": 2}
        assert record["parallel_speedup"] == {k: record["probe_ms"][k]["speedup"] for k in ("start", "end")}
        assert record["probe_ms"]["start"]["one_thread_ms"] > 0
