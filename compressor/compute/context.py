"""Compute: where and how a job learns and scores, in one object that the stages take.

The device, mixed precision, the memory format, loader workers, the process group, and the images per
second each stage went through (for the report). `Compute.local()` is what everything did before any of
this existed: the CPU, fp32, one process, data loaded in the main thread; on it every method is a no-op.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.compute.amp import FP32, Amp, resolve_amp
from compressor.compute.device import describe_device, resolve_device
from compressor.compute.failure import stop
from compressor.compute.group import World, join, layout, leave
from compressor.compute.loaders import OnDevice, auto_workers
from compressor.errors import InternalError


@dataclass
class Rate:
    """Images a stage went through in `seconds` of wall time (all processes together)."""

    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"images": self.images, "seconds": self.seconds, "images_per_s": self.images_per_s}


@dataclass
class Compute:
    """Where learning and scoring run, and how fast they went."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: Amp = FP32
    world: World = field(default_factory=World)
    workers: int | None = None  # loader processes per rank; None: auto_workers for each dataset
    rates: dict[str, Rate] = field(default_factory=dict)
    workers_used: dict[str, int] = field(default_factory=dict)  # stage -> loader processes it was given

    @classmethod
    def local(cls) -> Compute:
        """The CPU, fp32, one process, no loader workers."""
        return cls(workers=0)

    @property
    def pin_memory(self) -> bool:
        """Pinned host memory speeds copies to a GPU; elsewhere it is only overhead."""
        return self.device.type == "cuda"

    def memory_format(self, model: nn.Module | None) -> torch.memory_format:
        """channels_last for a conv net on CUDA (its tensor cores read NHWC), else torch's default."""
        if model is not None and self.device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            return torch.channels_last
        return torch.contiguous_format

    def loader_workers(self, dataset: object, stage: str) -> int:
        """Loader processes for `stage`'s loader over `dataset` (recorded for the report)."""
        workers = auto_workers(dataset, self.world) if self.workers is None else self.workers
        self.workers_used[stage] = workers
        return workers

    @contextmanager
    def placed(self, *models: nn.Module) -> Iterator[None]:
        """`models` on the device (in their memory format) inside the block, back on the CPU after it."""
        if self.device.type == "cpu":
            yield
            return
        for m in models:
            m.to(self.device, memory_format=self.memory_format(m))
        try:
            yield
        finally:
            for m in models:
                m.to("cpu", memory_format=torch.contiguous_format)

    def on_device(self, model: nn.Module) -> nn.Module:
        """`model` itself on the CPU, else a copy of it on the device."""
        if self.device.type == "cpu":
            return model
        return copy.deepcopy(model).to(self.device, memory_format=self.memory_format(model))

    def batches(self, loader: Iterable, model: nn.Module | None = None) -> Iterable:
        """`loader`'s batches on the device (images in `model`'s memory format); `loader` itself on the CPU."""
        if self.device.type == "cpu":
            return loader
        return OnDevice(loader, self.device, self.memory_format(model))

    def synchronize(self) -> None:
        """Wait for the device's queued work (so that a clock read after it means something)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    @contextmanager
    def timed(self, stage: str, images: int) -> Iterator[None]:
        """Record `images` over the block's wall time as `stage`'s rate (added to an earlier one)."""
        self.synchronize()
        start = time.perf_counter()
        yield
        self.synchronize()
        self.record(stage, images, time.perf_counter() - start)

    def record(self, stage: str, images: int, seconds: float) -> None:
        old = self.rates.get(stage)
        self.rates[stage] = Rate(images + (old.images if old else 0), seconds + (old.seconds if old else 0.0))

    def describe(self) -> str:
        """E.g. "cuda:0 (NVIDIA H100), bf16 autocast, 2 processes (nccl)"."""
        amp = "fp32" if self.amp.dtype is None else f"{self.amp.name} autocast" + (
            " with loss scaling" if self.amp.scaler else "")
        return f"{describe_device(self.device)}, {amp}, {self.world.describe()}"

    def to_dict(self) -> dict:
        """The report's `compute` section."""
        return {"device": describe_device(self.device), "device_type": self.device.type,
                "precision": self.amp.name, "loss_scaling": self.amp.scaler,
                "memory_format": "channels_last for conv nets" if self.device.type == "cuda" else "contiguous",
                "processes": self.world.size,
                "backend": self.world.backend,
                "stages": {name: {**rate.to_dict(), "loader_workers": self.workers_used.get(name)}
                           for name, rate in self.rates.items()}}


class NoDevice:
    """The latency device of a rank other than 0: rank 0 alone measures and talks to devices."""

    def time(self, *_: object, **__: object) -> None:
        msg = "only rank 0 measures latency"
        raise InternalError(msg)

    def provenance(self) -> dict:
        return {}


def open_compute(train_device: str = "auto", amp: str = "auto", workers: int | None = None) -> Compute:
    """Resolve the device (InputError if it is not here), join the process group where there is one
    (torchrun's, or the caller's), resolve mixed precision for the device."""
    _, _, local_rank, local_size = layout()
    device = resolve_device(train_device, local_rank, local_size)
    precision = resolve_amp(amp, device)
    return Compute(device, precision, join(device), workers)


def close_compute(compute: Compute, failed: bool = False) -> None:
    leave(compute.world, failed)


@contextmanager
def in_group(compute: Compute, hint: Callable[[], str] = lambda: "") -> Iterator[Compute]:
    """`compute` for the block, closed after it; an error in the block becomes what failure.stop says this
    rank raises (one line from one process in a group; `hint()` ends it: where the run's state is kept)."""
    failed = False
    try:
        yield compute
    except BaseException as e:
        failed = True
        replacement = stop(compute.world, e, hint())
        if replacement is e:
            raise
        raise replacement from e
    finally:
        close_compute(compute, failed)
