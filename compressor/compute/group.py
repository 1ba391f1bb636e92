"""The process group of a run under torchrun (or the caller's own): who is rank 0, what it hands the
others, and the collectives that learning and scoring need.

Rank 0 measures latency, exports, writes outputs and talks to devices; the other ranks take part only in
learning and scoring: their share of the calibration batches, their share of every global batch. Where
rank 0 works alone they wait on the rendezvous store, polling every POLL_S seconds: a waiting rank costs
no CPU beside rank 0's latency measurement (a collective would: NCCL waits by spinning), and stays
responsive to signals. Collectives run on a group of our own, so that ending it frees ranks blocked in it
even inside a caller's process group. What happens on a failure is failure.py's.
"""

from __future__ import annotations

import itertools
import os
import pickle
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from compressor.errors import GroupStopped, InputError

POLL_S = 0.5  # how often a waiting rank looks for what rank 0 shares
LINGER_S = 10.0  # how long rank 0 waits, at the end, for the others to have read what it shared
LINGER_FAILED_S = 2.0  # ... after a failure (a peer may be gone)
# a collective waits this long for the slowest rank (scoring a big model on a rank with more batches);
# a rank that dies is noticed at once (a closed connection, or torchrun ending the others)
COLLECTIVE_TIMEOUT = timedelta(hours=2)
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # device type -> torch.distributed backend
FAILED = "failed"  # the store key under which rank 0 publishes its failure
_CALLS = itertools.count()  # one key prefix per job in a process, the same on every rank (they run in step)


def layout() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, processes on this machine): the caller's initialised process group,
    or torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); (0, 1, 0, 1) alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank if size > 1 else 0))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    return rank, size, local_rank, local_size


def is_rank0() -> bool:
    """Whether this process is rank 0 (or alone), known before any group is joined."""
    return layout()[0] == 0


@dataclass
class World:
    """This process's place in the run: rank, size, the device collectives carry, our group and store."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owned: bool = False  # we initialised the default group (torchrun): we destroy it at the end
    group: object = None  # our own process group for collectives
    store: object = None  # the rendezvous store, under this job's prefix

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def describe(self) -> str:
        return f"{self.size} processes ({self.backend})" if self.parallel else "1 process"

    # ------------------------------------------------------------------ rank 0 hands the others a value

    def share(self, name: str, value: object = None) -> object:
        """Rank 0's `value` on every rank: rank 0 publishes it under `name`, the others wait for it (polling)
        and raise GroupStopped, silently, if rank 0 failed instead (it reports the failure)."""
        if not self.parallel:
            return value
        key = f"share/{name}"
        if self.is_main:
            self.store.set(key, pickle.dumps(value))
            return value
        self.wait_for(key)
        return pickle.loads(self.store.get(key))  # noqa: S301  (written by rank 0 of this very job)

    def wait_for(self, key: str) -> None:
        """Poll the store until `key` is there; GroupStopped if rank 0 publishes a failure first."""
        while not self.store.check([key]):
            if self.store.check([FAILED]):
                raise self.stopped_by_rank0()
            time.sleep(POLL_S)

    def stopped_by_rank0(self) -> GroupStopped:
        """The failure rank 0 published, as a silent GroupStopped (rank 0 prints it) with its exit code."""
        code, message = pickle.loads(self.store.get(FAILED))  # noqa: S301
        stopped = GroupStopped(f"rank 0 of {self.size} failed: {message}", code)
        stopped.silent = True
        return stopped

    # ------------------------------------------------------------------ collectives

    def broadcast(self, value: object) -> object:
        """Rank 0's `value` on every rank, by a collective (for payloads too big for the store)."""
        if not self.parallel:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=self._global(0), group=self.group, device=self._object_device())
        return box[0]

    def gather(self, value: object) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.parallel:
            return [value]
        import torch.distributed as dist

        found: list = [None] * self.size
        dist.all_gather_object(found, value, group=self.group)
        return found

    def cat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The rows of every rank's `tensors` concatenated in rank order (each rank holds a contiguous share
        of the batches, so this is their order in one process), on this rank's device."""
        if not self.parallel:
            return torch.cat(tensors)
        parts = self.gather([t.detach().cpu() for t in tensors])
        return torch.cat([t for part in parts for t in part]).to(self.device)

    def total(self, value: object) -> object:
        """The sum over ranks of `value`: a number, a tensor, None (a rank with nothing to add), or a list,
        tuple or dict of them summed item by item."""
        if not self.parallel:
            return value
        parts = self.gather(_to_cpu(value))
        return _to_device(_sum(parts), self.device)

    def _global(self, rank: int) -> int:
        import torch.distributed as dist

        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None


def _to_cpu(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _to_device(value: object, device: torch.device) -> object:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _sum(parts: list) -> object:
    """Item-by-item sum of same-shaped values, skipping None."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, (list, tuple)):
        return type(first)(_sum([p[i] if p is not None else None for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _sum([p.get(k) if p is not None else None for p in parts]) for k in first}
    total = present[0]
    for p in present[1:]:
        total = total + p
    return total




def join(device: torch.device) -> World:
    """This process's World: alone, or in the caller's initialised process group, or in the group that
    torchrun's environment describes (initialised here: gloo on CPU, nccl on CUDA). Every rank must call
    it at the same point (it creates our own group, a collective)."""
    rank, size, local_rank, _ = layout()
    if size == 1:
        return World(device=device)
    import torch.distributed as dist

    if device.type not in BACKENDS:
        msg = f"train device {device} cannot be shared by a process group (backends: gloo for cpu, nccl for cuda)"
        raise InputError(msg)
    owned = not dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if owned:
        dist.init_process_group(BACKENDS[device.type], timeout=COLLECTIVE_TIMEOUT)
    backend = BACKENDS[device.type]  # our own group's, whatever the caller's is (NCCL carries no CPU tensors)
    group = dist.new_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    store = dist.PrefixStore(f"compressor/{next(_CALLS)}/", dist.distributed_c10d._get_default_store())
    return World(rank, size, local_rank, device, backend, owned, group, store)


def leave(world: World, failed: bool = False) -> None:
    """End our group (and the default one, if we began it). Rank 0 first waits, at most LINGER_S, for the
    others to have read what it shared (the store may live in rank 0's process)."""
    if not world.parallel:
        return
    import torch.distributed as dist

    try:
        if world.is_main:
            deadline = time.monotonic() + (LINGER_FAILED_S if failed else LINGER_S)
            while world.store.add("left", 0) < world.size - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S / 5)
        else:
            world.store.add("left", 1)
    except Exception:  # noqa: BLE001  (a peer or the store is gone: nothing left to wait for)
        pass
    if failed and world.backend != "gloo":
        return  # NCCL could wait on a peer that is gone; the process ends anyway
    dist.destroy_process_group(world.group)  # gloo: closes our connections, which frees peers blocked in them
    if world.owned and not failed:
        dist.destroy_process_group()
