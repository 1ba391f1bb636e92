"""Interrupted runs: SIGINT and SIGTERM stop a real prune with one line and exit 130 / 143, keeping its
state; `--resume` continues it, reuses what was measured, and its report says so."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST_PROFILE, assert_exit_matches_target

# slower search floors than FAST_PROFILE, so the latency table takes long enough to be interrupted in
SLOW_TABLE = FAST_PROFILE.replace("search: {min_runs: 20, min_time_s: 0.15}", "search: {min_runs: 20, min_time_s: 0.4}")
ARGS = ["--model", "resnet56", "--data", "digits32", "--target-speedup", "1.3", "--finetune-epochs", "0",
        "--calibration-size", "64", "--max-trials", "1"]


def _prune(profile: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "compressor.cli.main", "prune", *ARGS, "--profile", str(profile),
               "--out", str(out), *extra]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, preexec_fn=_signals_as_from_a_shell)


def _signals_as_from_a_shell() -> None:
    """In the child: SIGINT and SIGTERM at their defaults, as an interactive shell starts a command. A test
    run started in the background (`make test &`) ignores SIGINT, the child would inherit that, and the
    prune would never see the signal and run to the end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# Alone, or beside two busy loops, a prune stops 2.6-3.2 s after the signal; in the full suite on 2 cores it
# once took 47 s and once 53 s (cause not found). The bound is above those; the message says where time went.
STOP_WITHIN_S = 75


def _interrupt_during_table(profile: Path, out: Path, sig: int) -> tuple[int, list[str]]:
    process = _prune(profile, out)
    lines = []
    for line in process.stderr:
        lines.append(line.rstrip())
        if "measuring the latency table" in line:
            time.sleep(1.0)
            started = time.perf_counter()
            process.send_signal(sig)
            break
    rest, arrived = [], []
    for line in process.stderr:
        rest.append(line.rstrip())
        arrived.append(time.perf_counter() - started)
    code = process.wait(timeout=2 * STOP_WITHIN_S)
    stopped = time.perf_counter() - started
    timeline = ", ".join(f"{t:.1f} s: {line[:60]}" for t, line in zip(arrived, rest, strict=True))
    assert stopped < STOP_WITHIN_S, f"the run took {stopped:.1f} s to stop ({timeline})"
    return code, lines + rest


# alike in form with test_scale_e2e.py's `killed` on purpose: each writes its own profile and stops its own
# command (SIGINT to one process here, SIGKILL to one rank there)
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    profile = folder / "slow.yaml"
    profile.write_text(SLOW_TABLE)
    out = folder / "run"
    code, lines = _interrupt_during_table(profile, out, signal.SIGINT)
    shutil.copytree(out, folder / "pristine")  # the interrupted state, for tests that must not resume it
    return profile, out, code, lines


def test_sigint_during_the_table_stops_with_one_line(interrupted):
    _, out, code, lines = interrupted
    assert code == 130
    assert lines[-1].startswith("compressor prune: interrupted") and "--resume" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    state = {p.name for p in (out / ".state").iterdir()}
    assert {"run.json", "reach.json", "scores.json"} <= state
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".work-")]
    assert not (out / "report.json").exists()


def test_resume_reuses_the_measured_part_and_makes_the_same_choice(interrupted, digits):
    profile, out, _, _ = interrupted
    result = subprocess.run([sys.executable, "-m", "compressor.cli.main", "prune", *ARGS, "--profile", str(profile),
                             "--out", str(out), "--resume"], capture_output=True, text=True, timeout=900)
    report = json.loads((out / "report.json").read_text())
    assert_exit_matches_target(result.returncode, report, speedup=1.3)
    reused = " ".join(report["resumed"]["reused"])
    assert "reachability" in reused and "cka scores" in reused
    assert not (out / ".state").exists()  # a finished run keeps no state
    # an uninterrupted search from the same latency table, fresh scores and the same measured floor
    # chooses the same units: nothing was lost or corrupted by the interruption
    from compressor.criteria import ScoringContext, score_units
    from compressor.graph.units import find_units
    from compressor.latency.table import LatencyTable
    from compressor.models.sources import load_model
    from compressor.search.knapsack import choose_units
    from compressor.search.loop import search_under_target
    from compressor.search.target import Measured, Target
    from compressor.search.uncertain import aiming_past_uncertainty

    model = load_model("resnet56", digits).model
    units = find_units(model, torch.randn(1, 3, 32, 32))
    scores = score_units("cka", ScoringContext(model, units, digits.loader("train", batch_size=128, limit=64)))
    table = LatencyTable.load(out / "latency_table.json")
    search, floor = report["search"], report["search"]["floor"]
    trial = search["trials"][0]
    measured = Measured(trial["baseline_ms"], trial["measured_ms"], 0.0)
    propose = aiming_past_uncertainty(lambda need, below=None, exclude=(): choose_units(units, scores, table.savings_ms,
                                                                                        need, 1, below, exclude),
                                      table.saving_ms, table.sd_ms)
    again = search_under_target(units, scores, table.savings_ms, table.baseline_ms, Target(speedup=1.3),
                                lambda removed: measured, search["margin"],
                                (table.saving_ms(floor["removed"]), Measured(floor["baseline_ms"],
                                                                             floor["candidate_ms"], 0.0)),
                                1, 1, propose)
    assert list(again.trials[0].choice.removed) == report["removed_units"]


def test_resume_refuses_another_run(interrupted, tmp_path):
    profile, out, _, _ = interrupted
    other = tmp_path / "copy"
    shutil.copytree(out.parent / "pristine", other)
    result = subprocess.run([sys.executable, "-m", "compressor.cli.main", "prune", *ARGS[:-2], "--max-trials", "2",
                             "--profile", str(profile), "--out", str(other), "--resume"],
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "--resume" in lines[-1] and "max_trials" in lines[-1], lines[-3:]
    assert not (other / "report.json").exists() and (other / ".state" / "scores.json").is_file()


def test_sigterm_exits_143_and_without_resume_the_folder_is_refused(tmp_path):
    profile = tmp_path / "slow.yaml"
    profile.write_text(SLOW_TABLE)
    out = tmp_path / "run"
    code, lines = _interrupt_during_table(profile, out, signal.SIGTERM)
    assert code == 143 and lines[-1].startswith("compressor prune: terminated")
    result = subprocess.run([sys.executable, "-m", "compressor.cli.main", "prune", *ARGS, "--profile", str(profile),
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unfinished run" in result.stderr and "--resume" in result.stderr


def test_sigkill_leaves_only_complete_files_and_resume_cleans_up(tmp_path):
    """A SIGKILLed run (no chance to clean up) leaves files that all load, plus temporaries that
    --resume removes before it continues."""
    profile = tmp_path / "slow.yaml"
    profile.write_text(SLOW_TABLE)
    out = tmp_path / "run"
    code, _ = _interrupt_during_table(profile, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".work-")]
    for path in out.rglob("*.json"):
        if path not in leftovers and not any(parent in leftovers for parent in path.parents):
            json.loads(path.read_text())  # every file under its final name is complete
    assert leftovers, "a killed run leaves its work folder behind"
    from compressor.stages.state import remove_leftovers

    removed = remove_leftovers(out)
    assert removed and not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".work-")]
    assert (out / ".state" / "run.json").is_file()


def test_resume_knows_other_python_batches_by_what_was_read(tmp_path):
    """Data given as Python batches has no spec to compare ("batches"): the run is named by a digest of the
    images and labels it read, so a resume with other images under the same name is refused."""
    from compressor.data.batches import from_batches
    from compressor.errors import InputError
    from compressor.jobs.prune import fingerprint
    from compressor.latency.machine import machine_info
    from compressor.latency.profiles import parse_profile
    from compressor.models.sources import from_module
    from compressor.search.target import Target
    from compressor.stages.options import PruneOptions
    from compressor.stages.state import RunState
    from tests.helpers import resnet20

    loaded, profile, machine = from_module(resnet20(), (3, 32, 32)), parse_profile(FAST_PROFILE, "test"), machine_info()
    x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 10

    def run_of(images: torch.Tensor, labels: torch.Tensor) -> dict:
        data = from_batches([(images, labels)])
        return fingerprint(loaded, data, Target(speedup=2), profile, PruneOptions(), machine)

    RunState(tmp_path, run_of(x, y), resume=False)
    RunState(tmp_path, run_of(x.clone(), y.clone()), resume=True)  # the same images and labels, read again
    changed = x.clone()
    changed[7, 0, 0, 0] += 1
    for images, labels in ((changed, y), (x, y.roll(1))):
        with pytest.raises(InputError, match=r"differs: data\.sha256 was"):
            RunState(tmp_path, run_of(images, labels), resume=True)
