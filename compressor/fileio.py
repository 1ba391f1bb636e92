"""Safe output: write to a temporary file in the same folder, then rename over the target."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from compressor.errors import InputError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` then rename tmp to `path`, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def check_output_dir(path: str | Path, must_be_empty: bool) -> Path:
    """Refuse an output folder that is a file, or (when `must_be_empty`) that already holds something."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        msg = f"output {path} exists and is not a folder"
        raise InputError(msg)
    if must_be_empty and path.exists() and any(path.iterdir()):
        msg = f"output {path} already exists and is not empty; choose a new --out"
        raise InputError(msg)
    return path


def make_output_dir(path: str | Path) -> Path:
    """Create the output folder (and parents); InputError if that fails or it is not writable."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot create output folder {path}: {e.strerror or e}"
        raise InputError(msg) from e
    if not os.access(path, os.W_OK | os.X_OK):
        msg = f"output folder {path} is not writable"
        raise InputError(msg)
    return path


def refuse_existing_file(path: str | Path) -> Path:
    path = Path(path)
    if path.exists():
        msg = f"output file {path} already exists; choose another path"
        raise InputError(msg)
    return path
