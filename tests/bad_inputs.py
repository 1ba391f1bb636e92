"""Bad input, case by case: what a user gets wrong, and the one line compressor answers with (exit 2).

Each case builds its files in a folder and returns the command line; tests/test_bad_input.py runs
every case and checks exit code 2, one line, no traceback, and that the output location is as it
was. `python -m tests.bad_inputs` prints the table of cases and their messages (docs/bad-input.md).
"""

from __future__ import annotations

import io
import pickle
import textwrap
from collections.abc import Callable
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FAST_PROFILE = """\
name: ort-cpu-fast
runtime: onnxruntime
threads: null
timing:
  search: {min_runs: 20, min_time_s: 0.15}
  report: {min_runs: 40, min_time_s: 0.4}
  warmup_runs: 3
  warmup_s: 0.05
"""
PAYLOAD_MARKER = "payload-ran"


class Payload:
    """A pickle that, if unpickled with code execution, creates a file: it must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@dataclass
class Case:
    name: str
    expect: str  # a fragment of the message
    build: Callable[[Path], list[str]]  # folder -> command line (the output goes to folder / "out")


def _prune(folder: Path, **overrides: str | None) -> list[str]:
    args = {"--model": "resnet56", "--data": "digits32", "--profile": "ort-cpu", "--target-speedup": "2",
            "--out": str(folder / "out")}
    args.update(overrides)
    return ["prune", *[x for k, v in args.items() if v is not None for x in (k, v)]]


def _file(folder: Path, name: str, data: bytes | str) -> str:
    path = folder / name
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return str(path)


def _payload(folder: Path) -> str:
    path = folder / "payload.pt"
    torch.save({"format": "compressor-checkpoint", "state_dict": Payload(folder / PAYLOAD_MARKER)}, path)
    return str(path)


def _weights(folder: Path, change: Callable[[dict], None]) -> str:
    from compressor.models.zoo import build

    state = build("resnet20", 10).state_dict()
    change(state)
    path = folder / "weights.pt"
    torch.save(state, path)
    return str(path)


def _module(folder: Path, source: str) -> None:
    (folder / "usermodel.py").write_text(textwrap.dedent(source))


def _profile(folder: Path, text: str) -> str:
    return _file(folder, "profile.yaml", text)


def _images(folder: Path, broken: bool) -> str:
    from PIL import Image

    root = folder / "images"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    if broken:
        (root / "b" / "3.png").write_bytes(b"not a png at all" * 20)
    return str(root)


def _cifar(folder: Path) -> str:
    root = folder / "cifar"
    root.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_4", "test_batch"):
        with (root / name).open("wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    return str(root)


def _table(folder: Path, change: Callable[[dict], None] | None, text: str | None = None) -> str:
    import json

    if text is not None:
        return _file(folder, "table.json", text)
    table = {"model": "resnet20", "input_shape": [1, 3, 32, 32],
             "profile": {"name": "ort-cpu", "runtime": "onnxruntime"},
             "machine": {"cpu": "x", "logical_cores": 2, "date": "2026-01-01"}, "baseline_ms": 1.0,
             "savings_ms": {f"layer{s}.{b}": 0.01 for s in (1, 2, 3) for b in range(9)}, "stats": {}}
    change(table)
    return _file(folder, "table.json", json.dumps(table))


NOT_LOGITS = """
    from torch import nn

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
        def forward(self, x):
            y = self.conv(x)
            return {"mean": float(y.mean()), "label": "cat"}  # no tensor at all

    def build():
        return Pair()
"""
UNTRACEABLE = """
    from torch import nn

    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 3), Gate(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
"""

CASES = [
    Case("unknown model name", "unknown model 'resnet999'", lambda f: _prune(f, **{"--model": "resnet999"})),
    Case("--model a directory", "is a folder", lambda f: _prune(f, **{"--model": str(f)})),
    Case("a missing checkpoint", "checkpoint not found", lambda f: _prune(f, **{"--model": str(f / "none.pt")})),
    Case("an empty checkpoint", "not a loadable checkpoint", lambda f: _prune(f, **{"--model": _file(f, "e.pt", b"")})),
    Case("random bytes as a checkpoint", "not a loadable checkpoint",
         lambda f: _prune(f, **{"--model": _file(f, "r.pt", np.random.default_rng(0).bytes(4096))})),
    Case("a pickle carrying a payload", "weights_only=True", lambda f: _prune(f, **{"--model": _payload(f)})),
    Case("weights with missing and unexpected keys", "missing keys fc.weight",
         lambda f: _prune(f, **{"--model": "resnet20", "--weights": _weights(
             f, lambda s: s.update({"extra": s.pop("fc.weight")}))})),
    Case("weights of the wrong shapes", "wrong shapes fc.weight",
         lambda f: _prune(f, **{"--model": "resnet20", "--weights": _weights(
             f, lambda s: s.update({"fc.weight": torch.zeros(3, 64)}))})),
    Case("NaN or Inf weights", "NaN or Inf values in conv1.weight",
         lambda f: _prune(f, **{"--model": "resnet20", "--weights": _weights(
             f, lambda s: s["conv1.weight"].fill_(float("nan")))})),
    Case("a model whose output holds no tensor", "holds no tensor",
         lambda f: (_module(f, NOT_LOGITS), _prune(f, **{"--model": "usermodel:build"}))[1]),
    Case("a model the tracer cannot handle", "cannot capture",
         lambda f: (_module(f, UNTRACEABLE), _prune(f, **{"--model": "usermodel:build"}))[1]),
    Case("unknown data spec", "unknown data source 'mnist'", lambda f: _prune(f, **{"--data": "mnist"})),
    Case("a data folder with no images", "not an image folder",
         lambda f: ((f / "empty").mkdir(), _prune(f, **{"--data": f"imagefolder:{f / 'empty'}"}))[1]),
    Case("images that cannot be decoded", "cannot decode image",
         lambda f: _prune(f, **{"--data": f"imagefolder:{_images(f, broken=True)}"})),
    Case("a cifar10 folder missing a batch file", "missing or out of sequence: data_batch_3",
         lambda f: _prune(f, **{"--data": f"cifar10:{_cifar(f)}"})),
    Case("an npz without the expected arrays", "x_train, y_train, x_val, y_val",
         lambda f: (np.savez(f / "d.npz", images=np.zeros(3)), _prune(f, **{"--data": f"npz:{f / 'd.npz'}"}))[1]),
    Case("a zoo model on an unlabelled source it was not trained on", "use --data digits32",
         lambda f: _prune(f, **{"--model": "vit_digits", "--data": "digit_canvas"})),
    Case("the detector trained on a classification source", "det_digits trains on digit_canvas",
         lambda f: ["train", "--model", "det_digits", "--data", "digits32", "--out", str(f / "det.pt")]),
    Case("profile YAML that does not parse", "malformed profile YAML",
         lambda f: _prune(f, **{"--profile": _profile(f, "name: x\nruntime: [onnxruntime\n")})),
    Case("a profile with an unknown runtime", "unknown runtime 'tflite'",
         lambda f: _prune(f, **{"--profile": _profile(f, "name: x\nruntime: tflite\n")})),
    Case("a profile with threads: 0", "'threads' must be a positive integer",
         lambda f: _prune(f, **{"--profile": _profile(f, "name: x\nruntime: onnxruntime\nthreads: 0\n")})),
    Case("a profile with threads: abc", "'threads' must be a positive integer",
         lambda f: _prune(f, **{"--profile": _profile(f, "name: x\nruntime: onnxruntime\nthreads: abc\n")})),
    Case("a profile with a negative timing floor", "must be a non-negative number",
         lambda f: _prune(f, **{"--profile": _profile(
             f, "name: x\nruntime: onnxruntime\ntiming:\n  search: {min_time_s: -1}\n")})),
    Case("a profile with unknown keys", "unknown field(s): thread, timing.search.min_run",
         lambda f: _prune(f, **{"--profile": _profile(
             f, "name: x\nruntime: onnxruntime\nthread: 2\ntiming:\n  search: {min_run: 5}\n")})),
    Case("--target-ms abc", "invalid float value: 'abc'",
         lambda f: _prune(f, **{"--target-speedup": None, "--target-ms": "abc"})),
    Case("--target-ms 0", "positive number", lambda f: _prune(f, **{"--target-speedup": None, "--target-ms": "0"})),
    Case("--target-ms -1", "positive number", lambda f: _prune(f, **{"--target-speedup": None, "--target-ms": "-1"})),
    Case("--target-ms inf", "finite", lambda f: _prune(f, **{"--target-speedup": None, "--target-ms": "inf"})),
    Case("--int8-calibration-size 0", "positive integer", lambda f: _prune(f, **{"--int8-calibration-size": "0"})),
    Case("both --target-ms and --target-speedup", "not allowed with argument",
         lambda f: _prune(f, **{"--target-ms": "1"})),
    Case("neither --target-ms nor --target-speedup", "one of the arguments --target-ms --target-speedup is required",
         lambda f: _prune(f, **{"--target-speedup": None})),
    Case("an unreachable target", "fastest reachable latency is",
         lambda f: _prune(f, **{"--target-speedup": "1000", "--profile": _profile(f, FAST_PROFILE)})),
    Case("--out that is an existing file", "exists and is not a folder",
         lambda f: _prune(f, **{"--out": _file(f, "out", "mine")})),
    Case("--out that holds a previous run", "already exists and is not empty",
         lambda f: ((f / "out").mkdir(), _file(f / "out", "report.json", "mine"), _prune(f))[2]),
    Case("a latency table from another model", "does not fit this run",
         lambda f: _prune(f, **{"--latency-table": _table(f, lambda t: t["savings_ms"].pop("layer1.0")),
                                "--profile": _profile(f, FAST_PROFILE)})),
    Case("a latency table in corrupted JSON", "is not a latency table JSON",
         lambda f: _prune(f, **{"--latency-table": _table(f, None, '{"model": "resnet56", "savings'),
                                "--profile": _profile(f, FAST_PROFILE)})),
    Case("a latency table with a field it does not have", "unknown field(s) units (a latency table has model,",
         lambda f: _prune(f, **{"--latency-table": _table(f, lambda t: t.update(units=list(t["savings_ms"]))),
                                "--profile": _profile(f, FAST_PROFILE)})),
    Case("a latency table whose savings are not numbers", "savings_ms must map unit names to savings in ms",
         lambda f: _prune(f, **{"--latency-table": _table(f, lambda t: t.update(savings_ms=["layer1.0"])),
                                "--profile": _profile(f, FAST_PROFILE)})),
    Case("--precision int8 on a torch profile", "INT8 is available on profiles that run onnxruntime or openvino; "
         "profile torch-cpu runs torch", lambda f: _prune(f, **{"--precision": "int8", "--profile": "torch-cpu"})),
    Case("bench on a truncated ONNX file", "cannot load",
         lambda f: ["bench", "--artifact", _truncated_onnx(f), "--profile", "ort-cpu"]),
    Case("an unknown --format", "unknown export format tflite",
         lambda f: ["export", "--model", "resnet20", "--format", "onnx,tflite", "--out", str(f / "out")]),
]

# every command that reads a checkpoint, given one carrying a payload
PAYLOAD_COMMANDS = [
    lambda f, p: _prune(f, **{"--model": p}),
    lambda f, p: _prune(f, **{"--model": "resnet20", "--weights": p}),
    lambda f, p: ["units", "--model", p],
    lambda f, p: ["export", "--model", p, "--format", "onnx", "--out", str(f / "out")],
    lambda f, p: ["fold", "--model", p, "--out", str(f / "out")],
    lambda f, p: ["score", "--model", p, "--data", "digits32", "--criterion", "magnitude"],
    lambda f, p: ["profile", "--model", p, "--profile", "ort-cpu", "--out", str(f / "out.json")],
    lambda f, p: ["export", "--model", "resnet20", "--weights", p, "--format", "onnx", "--out", str(f / "out")],
]


def _truncated_onnx(folder: Path) -> str:
    from compressor.models.zoo import build
    from exporters import get_exporter

    path = get_exporter("onnx").export(build("resnet20", 10), torch.randn(1, 3, 32, 32), folder / "m.onnx")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return str(path)


def run_case(case: Case, folder: Path) -> tuple[int, list[str]]:
    """Run the case's command in-process; (exit code, stderr lines)."""
    from compressor.cli.main import main

    argv = case.build(folder)
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue().strip().splitlines()


if __name__ == "__main__":  # the table in docs/bad-input.md
    import os
    import sys
    import tempfile

    print("| bad input | exit | what compressor says |\n|---|---:|---|")
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            sys.path.insert(0, tmp)
            code, lines = run_case(case, Path(tmp))
            sys.path.remove(tmp)
            sys.modules.pop("usermodel", None)
            message = (lines[-1] if lines else "").replace(tmp, "DIR").replace("|", "\\|")
            print(f"| {case.name} | {code} | `{message}` |")
