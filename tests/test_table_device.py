"""The table device (`runtime: table`): artifacts that name the units their model lacks, and a device that
predicts their latency from a measured latency table, exactly, instead of timing them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.errors import InputError
from compressor.graph.surgery import REMOVED_ATTRIBUTE, remove_units
from compressor.graph.units import find_units
from compressor.latency.deploy import Deployment
from compressor.latency.profiles import load_profile, parse_profile
from compressor.latency.replay import TableDevice, load_replay_table
from compressor.latency.timing import TimingPolicy
from tests.helpers import FAST_PROFILE, resnet20

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
SAVINGS = {"layer1.0": 0.06, "layer1.1": 0.045, "layer1.2": 0.04, "layer2.0": 0.10, "layer2.1": 0.07,
           "layer2.2": 0.065, "layer3.0": 0.07, "layer3.1": 0.10, "layer3.2": 0.45}
POLICY = TimingPolicy(20, 0.0)


def write_table(folder: Path, savings: dict[str, float] = SAVINGS, baseline_ms: float = 2.0, **extra) -> Path:
    """A latency table as `compressor profile` writes it (v1), measured on a device named pi5."""
    path = folder / "table.json"
    path.write_text(json.dumps({
        "model": "resnet20", "input_shape": [1, 3, 32, 32], "profile": {"name": "pi5", "runtime": "onnxruntime"},
        "machine": {"cpu": "Cortex-A76", "logical_cores": 4, "physical_cores": 4, "date": "2026-01-01T00:00:00"},
        "baseline_ms": baseline_ms, "savings_ms": savings, **extra}))
    return path


def table_profile(folder: Path, table: str = "table.json") -> Path:
    path = folder / "replay.yaml"
    path.write_text(f"name: pi5-replayed\nruntime: table\nruntime_options: {{table: {table}}}\n"
                    "timing:\n  search: {min_runs: 20, min_time_s: 0.1}\n  report: {min_runs: 40, min_time_s: 0.2}\n")
    return path


@pytest.fixture(scope="module")
def model():
    return resnet20()


@pytest.fixture(scope="module")
def units(model):
    return find_units(model, X)


def test_surgery_records_the_removed_units_under_the_name_the_exporter_reads(model, units):
    from exporters.table import REMOVED_ATTRIBUTE as READ

    assert READ == REMOVED_ATTRIBUTE
    once = remove_units(model, units[:2])
    twice = remove_units(once, [units[5]])
    assert getattr(once, REMOVED_ATTRIBUTE) == ("layer1.0", "layer1.1")
    assert getattr(twice, REMOVED_ATTRIBUTE) == ("layer1.0", "layer1.1", "layer2.2")
    assert not hasattr(model, REMOVED_ATTRIBUTE)


def test_device_predicts_each_artifact_from_the_table(tmp_path, model, units):
    profile = load_profile(str(table_profile(tmp_path)))
    write_table(tmp_path)
    deployment = Deployment(profile, (3, 32, 32))
    assert isinstance(deployment.device, TableDevice)
    gone = [u for u in units if u.name in ("layer2.0", "layer3.2")]
    paths = [deployment.export(model, tmp_path / "base"), deployment.export(remove_units(model, gone), tmp_path / "c")]
    result = deployment.time(paths, POLICY)
    assert [s.median for s in result.stats] == [2.0, pytest.approx(2.0 - 0.10 - 0.45, abs=1e-12)]
    assert result.speedup() == pytest.approx(2.0 / 1.45, abs=1e-12)
    assert result.speedup_spread() == 0.0 and all(s.n == 20 and s.iqr == 0.0 for s in result.stats)
    machine = deployment.device.provenance()
    assert machine["cpu"] == "Cortex-A76" and machine["predicted"]["table"] == str(tmp_path / "table.json")
    # the artifact's outputs are the model's (checked in ONNX Runtime against torch when it was written)
    assert deployment.validate(paths[1], remove_units(model, gone), X) < 1e-4


def test_interaction_terms_apply_where_all_their_units_are_removed(tmp_path):
    table = load_replay_table(write_table(tmp_path, interactions_ms=[
        {"units": ["layer3.1", "layer3.2"], "saving_ms": 0.2},
        {"units": ["layer1.0", "layer1.1"], "saving_ms": -0.01}]))
    assert table.predict_ms(["layer3.2"]) == pytest.approx(1.55)
    assert table.predict_ms(["layer3.1", "layer3.2"]) == pytest.approx(2.0 - 0.55 - 0.2)
    assert table.predict_ms(["layer1.0", "layer1.1", "layer3.1"]) == pytest.approx(2.0 - 0.205 + 0.01)
    with pytest.raises(InputError, match="no saving for unit.*layer9"):
        table.predict_ms(["layer9"])
    savings_too_big = load_replay_table(write_table(tmp_path, {**SAVINGS, "layer3.2": 1.9}))
    with pytest.raises(InputError, match="exceed its baseline"):
        savings_too_big.predict_ms(["layer3.1", "layer3.2"])


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "cannot be read as JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"kind": "compressor-bundle-results", "version": 1}), "bench bundle's figures"),
    (json.dumps({"version": 7, "baseline_ms": 1.0}), "version 7"),
    (json.dumps({"baseline_ms": 1.0, "input_shape": [1, 3, 32, 32]}), "lacks savings_ms"),
    (json.dumps({"baseline_ms": "fast", "savings_ms": {"a": 0.1}, "input_shape": [1]}), "baseline_ms must be"),
    (json.dumps({"baseline_ms": 1.0, "savings_ms": {"a": None}, "input_shape": [1]}), r"savings_ms\['a'\]"),
    (json.dumps({"baseline_ms": 1.0, "savings_ms": {"a": 0.1, "b": 0.1}, "input_shape": [1],
                 "interactions_ms": [{"units": ["a", "c"], "saving_ms": 0.1}]}),
     r"units in savings_ms, got \['a', 'c'\]"),
])
def test_a_malformed_table_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        load_replay_table(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_profile_resolves_the_table_beside_it_and_refuses_what_cannot_work(tmp_path):
    folder = tmp_path / "profiles"
    folder.mkdir()
    profile = load_profile(str(table_profile(folder, "../tables/t.json")))
    assert profile.runtime_options["table"] == str(folder / "../tables/t.json")
    with pytest.raises(InputError, match="cannot be read"):  # the table is read when the device is made
        Deployment(profile, (3, 32, 32))
    with pytest.raises(InputError, match="runtime_options: {table: FILE}"):
        parse_profile("name: t\nruntime: table\n", "t.yaml")
    with pytest.raises(InputError, match="no remote"):
        parse_profile("name: t\nruntime: table\nruntime_options: {table: t.json}\nremote: {host: pi}\n", "t.yaml")


def test_another_input_shape_is_refused(tmp_path, model):
    write_table(tmp_path)
    profile = load_profile(str(table_profile(tmp_path)))
    profile.input_shape = (3, 40, 40)
    deployment = Deployment(profile, (3, 32, 32))
    path = deployment.export(model, tmp_path / "base")
    with pytest.raises(InputError, match=r"measured on input \[1, 3, 32, 32\], this model takes \[1, 3, 40, 40\]"):
        deployment.time([path], POLICY)


def test_a_table_bundle_measured_on_the_device_is_replayed(tmp_path, model, units):
    """The offline way: `compressor profile --bundle`, measure.py on the device (here: this machine), and its
    results.json (the design's sessions, fitted on load) replayed: the baseline and a removal predict what the
    latency model fitted on the device's measurements predicts."""
    fast = tmp_path / "fast.yaml"
    fast.write_text(FAST_PROFILE)
    from compressor.latency.device import LocalDevice
    from compressor.latency.remote.bundle import write_table_bundle

    deployment = Deployment(load_profile(str(fast)), (3, 32, 32), LocalDevice(None))
    bundle = write_table_bundle(tmp_path / "bundle", model, units, deployment, "resnet20")
    done = subprocess.run([sys.executable, str(bundle / "measure.py"), "--out", str(tmp_path / "results.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    measured = json.loads((tmp_path / "results.json").read_text())
    table_profile(tmp_path, "results.json")
    replay = Deployment(load_profile(str(tmp_path / "replay.yaml")), (3, 32, 32))
    paths = [replay.export(model, tmp_path / "base"), replay.export(remove_units(model, units[-1:]), tmp_path / "c")]
    stats = replay.time(paths, POLICY).stats
    from compressor.latency.table import LatencyTable

    fitted = LatencyTable.from_dict(measured)
    assert measured["design"]["sessions"], "the device timed the design's sets"
    assert stats[0].median == pytest.approx(fitted.predict([]), rel=1e-12)
    assert stats[1].median == pytest.approx(fitted.predict([units[-1].name]), rel=1e-12)
    assert stats[1].median < stats[0].median
    assert replay.device.provenance()["predicted"]["profile"] == "ort-cpu-fast"


def test_int8_is_refused_on_the_table_runtime(tmp_path, model):
    from compressor.quantize import QuantizationImages, quantize_checked

    images = QuantizationImages(np.zeros((4, 3, 32, 32), np.float32), np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match="INT8.*'table'"):
        quantize_checked(model, X, "table", tmp_path / "q.table", images)
