"""The device learning and scoring run on: `--train-device auto|cpu|cuda|cuda:N|mps`, resolved once.

Resolving asks torch about CUDA or MPS only when the spec names them (`auto` asks about CUDA), so a run
with `--train-device cpu` never touches torch.cuda. A device that is not here is an InputError naming
what is (exit 2 before anything is loaded). Under torchrun every process of a machine takes the GPU of its
local rank, so `cuda:N` (one GPU for all of them) is refused there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compressor.errors import InputError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


def _cpu(index: int | None, local_rank: int, local_size: int) -> torch.device:
    if index is not None:
        msg = f"train device cpu:{index}: the CPU takes no index; use cpu"
        raise InputError(msg)
    return torch.device("cpu")


def _no_cuda() -> str:
    built = torch.version.cuda
    why = (f"this torch ({torch.__version__}) is built without CUDA" if built is None
           else f"torch {torch.__version__} finds no CUDA device or driver here")
    return f"train device cuda is not available: {why}; use --train-device cpu (or auto)"


def _cuda(index: int | None, local_rank: int, local_size: int) -> torch.device:
    if not torch.cuda.is_available():
        raise InputError(_no_cuda())
    count = torch.cuda.device_count()
    if index is not None:
        if local_size > 1:
            msg = (f"train device cuda:{index} would put all {local_size} processes of this machine on one GPU; "
                   "under torchrun each takes the GPU of its local rank: use --train-device cuda")
            raise InputError(msg)
        if index >= count:
            msg = f"train device cuda:{index} is not here: this machine has {count} CUDA device(s), cuda:0..{count - 1}"
            raise InputError(msg)
        return torch.device("cuda", index)
    if local_size > count:
        msg = (f"{local_size} processes on this machine but {count} CUDA device(s): start at most {count} "
               f"(torchrun --nproc-per-node {count}), one per GPU")
        raise InputError(msg)
    return torch.device("cuda", local_rank)


def _mps(index: int | None, local_rank: int, local_size: int) -> torch.device:
    if index is not None:
        msg = f"train device mps:{index}: there is one MPS device; use mps"
        raise InputError(msg)
    if not torch.backends.mps.is_available():
        msg = "train device mps is not available: no Apple GPU (Metal) here; use --train-device cpu (or auto)"
        raise InputError(msg)
    if local_size > 1:
        msg = "train device mps serves one process: torch.distributed has no backend for it; run one process"
        raise InputError(msg)
    return torch.device("mps")


# kind -> resolver(index or None, local rank, processes on this machine)
DEVICE_KINDS: dict[str, Callable[[int | None, int, int], torch.device]] = {"cpu": _cpu, "cuda": _cuda, "mps": _mps}


def parse_device(spec: str) -> tuple[str, int | None]:
    """("auto" | a kind of DEVICE_KINDS, index or None) of a spec, or InputError."""
    kind, colon, index = str(spec).strip().lower().partition(":")
    if kind == "auto" and not colon:
        return kind, None
    if kind not in DEVICE_KINDS or (colon and not index.isdigit()):
        msg = f"unknown train device {spec!r}; known: {DEVICE_CHOICES}"
        raise InputError(msg)
    return kind, int(index) if colon else None


def resolve_device(spec: str, local_rank: int = 0, local_size: int = 1) -> torch.device:
    """The torch.device `spec` names for the process of `local_rank` among `local_size` on this machine:
    auto = the local rank's GPU when CUDA is available, else the CPU."""
    kind, index = parse_device(spec)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return DEVICE_KINDS[kind](index, local_rank, local_size)


def describe_device(device: torch.device) -> str:
    """The device and, for a GPU, its name (e.g. "cuda:0 (NVIDIA H100 80GB HBM3)")."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
