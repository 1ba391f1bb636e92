"""Data for learning and scoring: the fine-tuning loader (shared out by DistributedSampler), each rank's
share of the calibration batches, worker processes and pinned memory.

The fine-tuning order is DistributedSampler's in every run, one process or many: a permutation seeded by
(seed, epoch), of which rank r takes every N-th index. With B/N images per rank and step, global step s
then covers positions s*B .. s*B+B-1 of the permutation whatever N is, so N processes see the same global
batches as one. The incomplete last global batch is dropped (drop_last), so the number of steps and every
batch agree too; an epoch is resumed by its number alone (set_epoch).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from compressor.compute.group import World
from compressor.errors import InputError

MAX_WORKERS = 8


def auto_workers(dataset: Dataset, world: World) -> int:
    """Loader processes per rank: none for images already in memory as tensors (a TensorDataset, or a dataset
    that slices whole batches itself: a worker would only add copying), else this machine's CPUs shared
    among its ranks, one left for the training process, at most MAX_WORKERS."""
    base = getattr(dataset, "dataset", dataset)
    if isinstance(base, TensorDataset) or getattr(base, "collates_itself", False):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    return max(0, min(MAX_WORKERS, cpus // max(local, 1) - 1))


def _loader_options(workers: int, pin_memory: bool, persistent: bool) -> dict:
    options: dict = {"num_workers": workers, "pin_memory": pin_memory}
    if workers > 0:
        options["persistent_workers"] = persistent
    return options


def global_batch(requested: int, images: int, world: World) -> int:
    """The global batch fine-tuning uses: `requested`, or, on fewer images, the largest multiple of the
    process count that one step can take (InputError where that is none)."""
    if requested % world.size:
        msg = (f"the fine-tuning batch {requested} is not divisible by the {world.size} processes: "
               f"give --finetune-batch a multiple of {world.size}")
        raise InputError(msg)
    batch = min(requested, images // world.size * world.size)
    if batch < 1:
        msg = f"{images} training images cannot be shared among {world.size} processes"
        raise InputError(msg)
    return batch


def training_loader(dataset: Dataset, batch: int, seed: int, world: World, workers: int, pin_memory: bool,
                    collate: object = None) -> DataLoader:
    """This rank's loader of `batch` / N images per step (`batch` global), in DistributedSampler's order."""
    sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=batch // world.size, sampler=sampler, drop_last=True,
                      collate_fn=collate, **_loader_options(workers, pin_memory, persistent=True))


def set_epoch(loader: Iterable, epoch: int) -> None:
    """Seed the order of `epoch` where the loader's sampler takes one (DistributedSampler)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def shard_batches(loader: DataLoader, world: World, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """This rank's contiguous share of `loader`'s batches (unshuffled: a calibration set), loading only
    those; concatenated in rank order they are the loader's batches in order. With fewer batches than
    ranks, the set is cut into one batch per rank instead (the same images; Taylor, which sums |w * grad|
    per batch, then differs from one process)."""
    if not world.parallel and workers == 0 and not pin_memory:
        return loader
    batches = list(BatchSampler(SequentialSampler(loader.dataset), loader.batch_size, drop_last=False))
    if len(batches) < world.size:  # fewer batches than ranks: one smaller batch each (every rank needs one)
        items = len(loader.dataset)
        if items < world.size:
            msg = f"{items} calibration images cannot be shared among {world.size} processes"
            raise InputError(msg)
        batches = [list(range(r * items // world.size, (r + 1) * items // world.size)) for r in range(world.size)]
    lo, hi = world.rank * len(batches) // world.size, (world.rank + 1) * len(batches) // world.size
    return DataLoader(loader.dataset, batch_sampler=batches[lo:hi], collate_fn=loader.collate_fn,
                      **_loader_options(workers, pin_memory, persistent=False))


class OnDevice:
    """Batches (x, y, ...) of a loader moved to `device` as they are drawn (x in `memory_format`)."""

    def __init__(self, loader: Iterable, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.loader = loader
        self.device = device
        self.memory_format = memory_format

    def __iter__(self) -> Iterator:
        for x, *rest in self.loader:
            yield (to_device(x, self.device, self.memory_format),
                   *(to_device(r, self.device) if isinstance(r, torch.Tensor) else r for r in rest))

    def __len__(self) -> int:
        return len(self.loader)


def to_device(x: torch.Tensor, device: torch.device,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """`x` on `device` (asynchronously from pinned memory); 4-D images in `memory_format`."""
    if x.device == device and memory_format == torch.contiguous_format:
        return x
    if x.dim() == 4:
        return x.to(device, non_blocking=x.is_pinned(), memory_format=memory_format)
    return x.to(device, non_blocking=x.is_pinned())
