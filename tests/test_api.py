"""The Python API on the user's own nn.Module, and the CLI on the user's own architecture (MODULE:FACTORY)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

import compressor
from compressor.cli.main import main
from compressor.latency.profiles import parse_profile
from tests.helpers import FAST_PROFILE, assert_exit_matches_target

MYNET = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class MyNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(24) for _ in range(8)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def build():
    return MyNet()
'''


def _mynet(tmp_path, monkeypatch):
    (tmp_path / "mynet_user.py").write_text(textwrap.dedent(MYNET))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import mynet_user

    importlib.reload(mynet_user)
    return mynet_user


def _ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])


@pytest.fixture(scope="module")
def fast():
    return parse_profile(FAST_PROFILE, "test")


def test_public_api_is_exported():
    for name in ("prune", "apply_recipe", "find_units", "score", "export", "Speedup", "Latency", "Profile"):
        assert name in compressor.__all__ and getattr(compressor, name) is not None
    with pytest.raises(AttributeError):
        compressor.no_such_thing  # noqa: B018


def test_prune_own_module_with_a_dataloader(tmp_path, monkeypatch, digits, fast):
    mynet = _mynet(tmp_path, monkeypatch)
    torch.manual_seed(0)
    model = mynet.build()
    loader = torch.utils.data.DataLoader([(x, y) for x, y in digits.train], batch_size=64)
    result = compressor.prune(model, data=loader, target=compressor.Speedup(1.3), profile=fast,
                              out=tmp_path / "run", finetune_epochs=1, calibration_size=64, log=None)
    out = tmp_path / "run"
    assert {"model.pt", "recipe.json", "model.pt2", "model.onnx", "report.json"} <= {p.name for p in out.iterdir()}
    assert result.report["target_met"] == (result.report["pruned"]["latency_ms"]["median"]
                                           <= result.report["target_ms"])
    assert_exit_matches_target(0 if result.report["target_met"] else 1, result.report, speedup=1.3)
    assert result.recipe == json.loads((out / "recipe.json").read_text())
    removed = [u["name"] for u in result.recipe["units"]]
    assert removed and all(n.startswith("blocks.") for n in removed)
    assert sum(isinstance(m, mynet.Block) for m in result.model.modules()) == 8 - len(removed)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = result.model.eval()(x).numpy()
    np.testing.assert_allclose(_ort(out / "model.onnx", x), expected, atol=1e-4, rtol=1e-3)
    # the same structure on a fresh instance, loaded with the saved state_dict
    fresh = compressor.apply_recipe(mynet.build(), result.recipe)
    fresh.load_state_dict(torch.load(out / "model.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        np.testing.assert_allclose(fresh.eval()(x).numpy(), expected, atol=1e-5, rtol=1e-5)
        program = torch.export.load(str(out / "model.pt2")).module()
        np.testing.assert_allclose(program(x).numpy(), expected, atol=1e-5, rtol=1e-4)
    assert compressor.load_checkpoint(out / "model.pt").arch == "mynet_user:MyNet"


def test_cli_prunes_module_factory_with_weights(tmp_path, monkeypatch, fast_profile, capsys):
    mynet = _mynet(tmp_path, monkeypatch)
    torch.save(mynet.build().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "runs" / "mine"
    code = main(["prune", "--model", "mynet_user:build", "--weights", "w.pt", "--data", "digits32",
                 "--profile", str(fast_profile), "--target-speedup", "1.3", "--out", str(out),
                 "--finetune-epochs", "0", "--calibration-size", "64"])
    report = json.loads((out / "report.json").read_text())
    assert_exit_matches_target(code, report, speedup=1.3)
    assert report["model"] == "mynet_user:build" and report["config"]["model"] == "mynet_user:build"
    for name in ("model.pt", "recipe.json", "model.pt2", "model.onnx", "report.json"):
        assert (out / name).is_file()
    loaded = compressor.load_checkpoint(out / "model.pt")  # rebuilt from mynet_user:build and the recipe
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(out / "model.onnx", x), loaded.model(x).numpy(), atol=1e-4, rtol=1e-3)
    # the .pt2 exports on its own, without the source
    monkeypatch.syspath_prepend("/nonexistent")
    code = main(["export", "--model", str(out / "model.pt2"), "--format", "onnx", "--out", str(tmp_path / "exp")])
    assert code == 0 and (tmp_path / "exp" / "model.onnx").is_file()


def _error(capsys, args) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"compressor {args[0]}: error: ") and "Traceback" not in err[0]
    return err[0]


def test_weights_that_do_not_fit_name_the_keys(tmp_path, monkeypatch, capsys):
    mynet = _mynet(tmp_path, monkeypatch)
    state = mynet.build().state_dict()
    state["extra.weight"] = state.pop("head.2.weight")
    torch.save(state, tmp_path / "bad.pt")
    line = _error(capsys, ["units", "--model", "mynet_user:build", "--weights", "bad.pt", "--input-shape", "3,32,32"])
    assert "missing keys head.2.weight" in line and "unexpected keys extra.weight" in line
    assert not (tmp_path / "runs").exists()


def test_untraceable_model_names_the_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "branchy.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Gate(nn.Module):
            def forward(self, x):
                if x.sum() > 0:
                    return x
                return -x

        def build():
            return nn.Sequential(nn.Conv2d(3, 4, 3), Gate(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    '''))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    line = _error(capsys, ["units", "--model", "branchy:build", "--input-shape", "3,16,16"])
    assert "cannot capture" in line and "'1' (Gate)" in line


def test_model_without_units_says_what_would_be_one(capsys, fast_profile, tmp_path, monkeypatch):
    (tmp_path / "plain.py").write_text(textwrap.dedent('''
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    '''))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    line = _error(capsys, ["prune", "--model", "plain:build", "--data", "digits32", "--profile", str(fast_profile),
                           "--target-speedup", "1.5", "--out", str(tmp_path / "out")])
    assert "no removable residual units" in line and "act(branch(x) + shortcut(x))" in line
    assert not (tmp_path / "out").exists()


def test_any_input_shape_and_batch(tmp_path, fast):
    from dataclasses import replace

    profile = replace(fast, batch=4, input_shape=(3, 64, 64))
    model = compressor.load_model("resnet20").model  # adaptive pooling: any input size
    data = [torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    result = compressor.prune(model, data=data, target=compressor.Speedup(1.2), profile=profile, out=None,
                              finetune_epochs=0, calibration_size=16, criterion="magnitude", log=None)
    report = result.report
    assert_exit_matches_target(0 if report["target_met"] else 1, report, speedup=1.2)
    assert report["baseline"]["latency_ms"]["batch"] == 4 == report["pruned"]["latency_ms"]["batch"]
    assert report["profile"]["batch"] == 4 and report["profile"]["input_shape"] == [3, 64, 64]
    assert report["recipe"]["input_shape"] == [3, 64, 64]


def test_score_and_export_from_python(tmp_path, digits):
    model = compressor.load_model("resnet20").model
    scored = compressor.score(model, digits, criteria=["magnitude", "random"], log=None)
    assert set(scored.report["scores"]) == {"magnitude", "random"} and len(scored.report["units"]) == 9
    written = compressor.export(model, tmp_path / "exp", formats="onnx", input_shape=(3, 32, 32), log=None)
    assert (tmp_path / "exp" / "model.onnx").is_file() and written["onnx"]["precision"] == "fp32"
    units = compressor.find_units(model, torch.randn(1, 3, 32, 32))
    assert len(units) == 9


def test_timm_architecture_units(capsys):
    pytest.importorskip("timm")
    assert main(["units", "--model", "timm:resnet18", "--input-shape", "3,64,64", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8 and {r["kind"] for r in rows} == {"identity", "projection"}
