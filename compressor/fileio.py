"""Safe output: build in a temporary folder beside the target, then rename into place.

`Staging` is the one way this package writes anything a reader may see half-written: a file
(`atomic_write`), an artifact of several files (the exporters and quantizers), a whole folder
(`staged_folder`: the device bundles). The remote runner and measure.py, which run on a device
without this package, keep their own few lines for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from compressor.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Staging:
    """A private temporary folder (`dir`, named `.<name>.XXXX.tmp`) beside `path`: build there, then
    `commit` renames the staged entries into place, the main one last; the folder is removed either way."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        except OSError as e:
            msg = f"cannot write to {self.path.parent}: {e.strerror or e}"
            raise InputError(msg) from e

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self, names: list[str]) -> None:
        """Move staged `names` (files or folders, the main one last) beside `path`, each by an atomic
        rename (a folder replaces an empty one), with the permissions the umask gives new files."""
        umask = _umask()
        for name in names:
            staged = self.dir / name
            os.chmod(staged, (0o777 if staged.is_dir() else 0o666) & ~umask)
            os.replace(staged, self.path.parent / name)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` then rename tmp to `path`, so a reader never sees half a file."""
    path = Path(path)
    with Staging(path) as stage:
        write(stage.dir / path.name)
        stage.commit([path.name])
    return path


@contextlib.contextmanager
def staged_folder(folder: str | Path, what: str = "folder") -> Iterator[Path]:
    """A temporary folder beside `folder`, renamed to it when the block succeeds, removed if it fails.
    A `folder` that exists and is not empty is refused (the message calls it `what`)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        msg = f"{what} {folder} already exists and is not empty; choose a new one"
        raise InputError(msg)
    with Staging(folder) as stage:
        (stage.dir / folder.name).mkdir()
        yield stage.dir / folder.name
        stage.commit([folder.name])


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
