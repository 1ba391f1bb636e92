"""Whole prunes under torchrun, two processes with gloo on CPU: killing a rank mid-epoch ends the job with
one line and keeps the last finished epoch; `--resume` continues from it with the same number of processes
and is refused with another; `compressor.prune` called on every rank of a group returns the same report
everywhere while rank 0 alone writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST_PROFILE

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--model", "tests.helpers:resnet20", "--data", "digits32", "--target-speedup", "1.2", "--finetune-epochs", "2",
        "--calibration-size", "128", "--max-trials", "1", "--train-device", "cpu"]
EPOCH_IMAGES = 1437 // 32 * 32  # digits32's training split in whole global batches of 32


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _command(processes: int, profile: Path, out: Path, *extra: str) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes > 1
                else [sys.executable])
    return [*launcher, "-m", "compressor", "prune", *ARGS, "--profile", str(profile), "--out", str(out), *extra]


def _signals_as_from_a_shell() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _workers(launcher: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children, by their RANK variable)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            variables = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher:
            found.update({int(v[5:]): int(entry.name) for v in variables if v.startswith(b"RANK=")})
    return found


def _ours(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("compressor prune:")]


# alike in form with test_resume.py's `interrupted` on purpose (see there)
@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A 2-process prune whose rank 1 is SIGKILLed as soon as the first fine-tuning epoch is saved."""
    folder = tmp_path_factory.mktemp("ddp")
    profile = folder / "fast.yaml"
    profile.write_text(FAST_PROFILE)
    out = folder / "run"
    process = subprocess.Popen(_command(2, profile, out), stderr=subprocess.PIPE, text=True, env=_env(),
                               preexec_fn=_signals_as_from_a_shell)
    lines, killed_at = [], None
    for line in process.stderr:
        lines.append(line.rstrip())
        if "fine-tune epoch 1/2" in line:
            ranks = _workers(process.pid)
            os.kill(ranks[1], signal.SIGKILL)
            killed_at = time.perf_counter()
            break
    lines += process.stderr.read().splitlines()
    code = process.wait(timeout=120)
    assert killed_at is not None, "\n".join(lines[-30:])
    return profile, out, code, lines, time.perf_counter() - killed_at


def test_killing_a_rank_mid_epoch_ends_the_job_with_one_line(killed):
    _, out, code, lines, seconds = killed
    ours = _ours(lines)
    assert code != 0 and len(ours) == 1, ours
    assert ("terminated" in ours[0] or "stopped" in ours[0]) and "--resume" in ours[0], ours
    assert not [line for line in lines if "compressor/" in line and line.lstrip().startswith("File ")]  # no traceback
    codes = {int(rank): int(exit_code) for rank, exit_code in re.findall(
        r"rank\s*:\s*(\d+) \(local_rank.*?\n\s*exitcode\s*:\s*(-?\d+)", "\n".join(lines))}
    assert codes.get(1) == -signal.SIGKILL and codes.get(0) in (3, 130, 143), codes
    assert seconds < 60, "the surviving rank should stop within seconds"
    saved = torch.load(out / ".state" / "finetune.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["world_size"] == 2 and saved["sampler"]["epoch"] == 1
    assert not (out / "report.json").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".work-")]


def test_resume_with_another_number_of_processes_is_refused_with_the_reason(killed):
    profile, out, _, _, _ = killed
    before = (out / ".state" / "finetune.pt").read_bytes()
    result = subprocess.run(_command(1, profile, out, "--resume"), capture_output=True, text=True, env=_env(),
                            timeout=600)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "2 process(es), this one has 1" in lines[0] and "resume with torchrun with 2 processes" in lines[0]
    assert (out / ".state" / "finetune.pt").read_bytes() == before


def test_resume_continues_from_the_last_finished_epoch(killed):
    profile, out, _, _, _ = killed
    result = subprocess.run(_command(2, profile, out, "--resume"), capture_output=True, text=True, env=_env(),
                            timeout=900)
    report = json.loads((out / "report.json").read_text())
    assert result.returncode == (0 if report["target_met"] else 1), result.stderr[-3000:]
    assert "fine-tuning, 1 of 2 epochs done" in report["resumed"]["reused"]
    compute = report["compute"]
    assert compute["processes"] == 2 and compute["backend"] == "gloo" and compute["precision"] == "fp32"
    assert compute["stages"]["finetune"]["images"] == EPOCH_IMAGES  # epoch 2 only: epoch 1 was not redone
    assert "scores" not in compute["stages"]  # the saved scores were reused
    assert not (out / ".state").exists()
    from compressor.models.checkpoint import load_checkpoint

    assert load_checkpoint(out / "model.pt").removed_units == report["removed_units"]


def test_the_api_in_a_process_group_returns_the_same_result_on_every_rank(tmp_path):
    """compressor.prune on both ranks of a torchrun group, on the user's own module and DataLoader."""
    profile = tmp_path / "fast.yaml"
    profile.write_text(FAST_PROFILE)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             str(ROOT / "tests" / "ranks.py"), str(tmp_path), "--prune", str(profile)],
                            capture_output=True, text=True, env=_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same report, recipe and fine-tuned weights (digest) on both
    assert ranks[0]["report"]["compute"]["processes"] == 2
    written = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "report.json" in written and "model.pt" in written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("run")] == ["run"]  # rank 1 wrote nothing
    shutil.rmtree(tmp_path / "run")
