"""Faults from outside the input: a full disk, an exporter that fails on the model. One line each, the
right exit code, and no file under its final name that fails to load."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import textwrap

import onnx
import torch

from tests.helpers import FAST_PROFILE


def _limit_file_size(max_bytes: int):
    """A full disk, simulated: writes beyond `max_bytes` fail with EFBIG (SIGXFSZ ignored, so write() returns
    the error instead of killing the process)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def _every_file_loads(folder) -> list[str]:
    names = []
    for path in folder.rglob("*"):
        if path.is_dir():
            continue
        names.append(path.name)
        assert not path.name.endswith(".tmp"), f"temporary file left: {path}"
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".onnx":
            onnx.checker.check_model(str(path))
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
    return names


def test_full_disk_fails_with_one_line_and_no_half_written_file(tmp_path):
    profile = tmp_path / "fast.yaml"
    profile.write_text(FAST_PROFILE)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "compressor.cli.main", "prune", "--model", "resnet56",
                             "--data", "digits32", "--profile", str(profile), "--target-speedup", "1.3",
                             "--out", str(out), "--finetune-epochs", "0", "--calibration-size", "64"],
                            capture_output=True, text=True, timeout=600, preexec_fn=_limit_file_size(1 << 20))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1].startswith("compressor prune: error: cannot write") and "File too large" in lines[-1]
    assert "Traceback" not in result.stderr
    names = _every_file_loads(out) if out.exists() else []
    assert "model.onnx" not in names and "report.json" not in names


BROKEN_EXPORT = """
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
        def forward(self, x):
            return torch.relu(self.conv(x) + x)

    class Spectral(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.Sequential(Block(), Block())
            self.head = nn.Linear(8, 10)
        def forward(self, x):
            x = self.blocks(self.stem(x))
            x = torch.fft.rfft2(x).abs()  # no ONNX export for this op at opset 17
            return self.head(x.mean((2, 3)))

    def build():
        return Spectral()
"""


def test_an_exporter_failing_on_the_model_is_one_line_and_exit_3(tmp_path):
    (tmp_path / "spectral.py").write_text(textwrap.dedent(BROKEN_EXPORT))
    profile = tmp_path / "fast.yaml"
    profile.write_text(FAST_PROFILE)
    args = [sys.executable, "-m", "compressor.cli.main", "prune", "--model", "spectral:build", "--data", "digits32",
            "--profile", str(profile), "--target-speedup", "1.2", "--out", str(tmp_path / "out")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3, result.stderr[-2000:]
    assert lines[-1].startswith("compressor prune: error: ") and "export" in lines[-1] and "fft" in lines[-1]
    assert "Traceback" not in result.stderr
    debug = subprocess.run([*args[:-1], str(tmp_path / "out2"), "--debug"], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert debug.returncode == 3 and "Traceback" in debug.stderr


def test_user_batches_are_read_up_to_the_limit():
    """Memory is bounded by the items read, not by the size of the user's data: an endless loader works."""
    import itertools

    from compressor.data.batches import from_batches

    endless = (torch.zeros(16, 3, 8, 8) for _ in itertools.count())
    bundle = from_batches(endless, limit=100)
    assert len(bundle.train) + len(bundle.val) == 100 and not bundle.labelled
