"""A run's state, kept in its output folder as it goes, so an interrupted prune can resume.

`out/.state/` holds run.json (what the run is: model weights' hash, data, profile,
target, options, the machine) and one JSON file per finished stage (reach,
scores, the latency table, every measured candidate), plus the fine-tuning
checkpoint of the last finished epoch. `compressor prune --resume --out DIR`
checks that run.json matches the new run (refusing with the first difference),
reuses what is there and records what it reused in the report. Every file is
written to a temporary name and renamed, so a killed run leaves only complete
files (and temporaries, which the next run removes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from compressor.errors import InputError
from compressor.fileio import atomic_write, atomic_write_text
from compressor.latency.machine import machine_differences

STATE_DIR = ".state"
RUN_FILE = "run.json"


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's state_dict (names, shapes, values): the same weights, the same digest."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def remove_leftovers(out: Path) -> list[str]:
    """Delete what a killed run left behind: temporary files and work folders. Returns their names."""
    removed = []
    for path in out.iterdir():
        if path.name.startswith(".") and (path.name.endswith(".tmp") or path.name.startswith(".work-")):
            _remove(path)
            removed.append(path.name)
    state = out / STATE_DIR
    if state.is_dir():
        for path in state.glob(".*.tmp"):  # compressor.fileio.Staging's folders
            _remove(path)
            removed.append(f"{STATE_DIR}/{path.name}")
    return removed


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _first_difference(saved: dict, current: dict, prefix: str = "") -> str | None:
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} was {a!r}, now {b!r}"
    return None


class RunState:
    """Stage results saved under `out/.state/`; a run without an output folder keeps nothing."""

    def __init__(self, out: Path | None, fingerprint: dict, resume: bool) -> None:
        self.folder = out / STATE_DIR if out is not None else None
        self.fingerprint = fingerprint
        self.reused: list[str] = []
        if self.folder is None:
            return
        if resume:
            self._check_saved()
        self.folder.mkdir(exist_ok=True)
        atomic_write_text(self.folder / RUN_FILE, json.dumps(fingerprint, indent=2, sort_keys=True))

    def _check_saved(self) -> None:
        path = self.folder / RUN_FILE
        if not path.is_file():
            msg = f"--resume: {self.folder.parent} holds no saved run state ({STATE_DIR}/{RUN_FILE})"
            raise InputError(msg)
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            msg = f"--resume: {path} is not readable run state: {e}"
            raise InputError(msg) from e
        machine = saved.get("machine", {})
        if machine_differences(machine, self.fingerprint["machine"]):  # latency figures hold on one machine only
            msg = (f"--resume: the saved run was measured on another machine ({machine.get('cpu')}, "
                   f"{machine.get('logical_cores')} cores); its latency figures are not reused here: start a new --out")
            raise InputError(msg)
        difference = _first_difference(saved, self.fingerprint)
        if difference:
            msg = f"--resume: the saved run in {self.folder.parent} differs: {difference}; start a new --out"
            raise InputError(msg)

    def load(self, name: str) -> dict | None:
        """A saved stage result, or None (no folder, not saved yet)."""
        if self.folder is None or not (self.folder / f"{name}.json").is_file():
            return None
        return json.loads((self.folder / f"{name}.json").read_text())

    def save(self, name: str, data: dict) -> None:
        if self.folder is not None:
            atomic_write_text(self.folder / f"{name}.json", json.dumps(data, indent=2))

    def finish(self) -> None:
        """The run is complete: its state is no longer needed."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def note_reused(self, what: str) -> None:
        self.reused.append(what)

    def checkpoint_path(self, name: str) -> Path | None:
        return self.folder / f"{name}.pt" if self.folder is not None else None

    def save_tensors(self, name: str, payload: dict) -> None:
        """A torch payload (state_dicts, numbers), loadable with weights_only=True."""
        if self.folder is not None:
            atomic_write(self.folder / f"{name}.pt", lambda tmp: torch.save(payload, tmp))

    def load_tensors(self, name: str) -> dict | None:
        path = self.checkpoint_path(name)
        if path is None or not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)
