"""Provenance of a measurement: which machine, which runtime versions, when."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "onnx", "onnxruntime", "openvino", "numpy")
# what makes two machines "the same" for latency figures: the resume check, the regression gate's baseline and
# a reused latency table all compare these (threads default to the physical cores)
MACHINE_KEYS = ("cpu", "logical_cores", "physical_cores")


def physical_cores() -> int:
    """Physical cores from /proc/cpuinfo (Linux); falls back to os.cpu_count()."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.cpu_count() or 1
    pairs, phys = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "physical id":
            phys = value
        elif key == "core id":
            pairs.add((phys, value))
    return len(pairs) or os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def machine_info() -> dict:
    """CPU model, core counts, OS, Python and runtime versions, and the UTC time."""
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_differences(measured_on: dict, here: dict) -> list[str]:
    """How the machine a figure was `measured_on` differs from `here` (machine_info()-like dicts), one
    "key 'then' != 'now'" phrase per MACHINE_KEYS entry that differs; a key either dict lacks is not
    compared (tables and baselines from older versions). Empty: the same machine."""
    return [f"{k} {measured_on[k]!r} != {here[k]!r}" for k in MACHINE_KEYS
            if k in measured_on and k in here and measured_on[k] != here[k]]


def source_revision(folder: str | Path = ".") -> str | None:
    """The git commit of `folder`'s checkout, suffixed "-dirty" with uncommitted changes; None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=folder).stdout.strip()

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")
