"""One line, from one process, when any process of a group fails: what each rank raises instead.

Every rank that fails takes part in an election in the rendezvous store (the first to count itself in
"speaker" prints); the others raise their error with `silent = True`, which the CLI exits on without a
word. Who tries first decides what the line says:

- rank 0, for its own error, its interruption, or a peer's failure: at once. A peer's own error, recorded
  in the store (`failed/<rank>`), is what rank 0 reports when it fails because of it; a peer that vanished
  without a record (SIGKILL) is reported as such. Rank 0 also publishes its failure (`failed`), which
  stops the ranks waiting for what it shares.
- another rank, for its own error or a signal: at once (rank 0 may be blocked in a collective with it,
  and would only learn of it when this process exits). A signal's line is the same whichever rank
  prints it (interrupted or terminated, and where the state is kept).
- another rank whose collective broke: only if nobody has spoken after REPORT_WAIT_S (rank 0, in the
  same collective, would have), saying that rank 0 stopped.

Signals are ignored while this runs, so that torchrun's SIGTERM to the survivors cannot turn the one
line into a traceback.
"""

from __future__ import annotations

import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from compressor.compute.group import FAILED, POLL_S, World
from compressor.errors import CompressorError, GroupStopped, first_line

REPORT_WAIT_S = 3.0
INTERRUPTED, TERMINATED = 130, 143
# how torch.distributed reports a peer that went away (gloo raises a plain RuntimeError)
COLLECTIVE_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "processgroup",
                      "c10d")


def stopped_by_signal(error: BaseException) -> bool:
    """KeyboardInterrupt (SIGINT), the CLI's Terminated (SIGTERM), SystemExit: not an Exception."""
    return not isinstance(error, Exception)


def collective_error(error: BaseException) -> bool:
    """Whether `error` is torch.distributed reporting a peer that failed or went away."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in COLLECTIVE_MARKERS)


def exit_code(error: BaseException) -> int:
    if isinstance(error, CompressorError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    return TERMINATED if stopped_by_signal(error) else 3


@contextmanager
def signals_ignored(active: bool = True) -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside the block (in the main thread, where `active`)."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _store(call: Callable[[], object], default: object) -> object:
    """A store operation; `default` if the store is gone (it lived in a process that died)."""
    try:
        return call()
    except Exception:  # noqa: BLE001
        return default


def _elect(world: World, wait: bool) -> bool:
    """Whether this process prints the line: the first to count itself in; with `wait`, only after
    nobody has for REPORT_WAIT_S."""
    if wait:
        deadline = time.monotonic() + REPORT_WAIT_S
        while time.monotonic() < deadline:
            if _store(lambda: world.store.add("speaker", 0), 0) > 0:
                return False
            time.sleep(POLL_S / 5)
    return _store(lambda: world.store.add("speaker", 1), 1) == 1


def _peer_failure(world: World) -> tuple[int, int, str] | None:
    """(rank, exit code, line) of the lowest rank that recorded its own error, if any did."""
    for rank in range(1, world.size):
        raw = _store(lambda r=rank: world.store.get(f"failed/{r}") if world.store.check([f"failed/{r}"]) else None,
                     None)
        if raw is not None:
            code, line = pickle.loads(raw)  # noqa: S301  (written by a rank of this very job)
            return rank, code, line
    return None


def _as_rank0(world: World, error: BaseException, hint: str) -> BaseException:
    replacement = error
    if stopped_by_signal(error) or collective_error(error):
        peer = _peer_failure(world)
        if peer is not None:
            rank, code, line = peer
            replacement = GroupStopped(f"rank {rank} of {world.size} failed: {line}{hint}", code)
        elif collective_error(error):
            replacement = GroupStopped(f"another process of the group stopped (killed, or its connection was "
                                       f"lost){hint}", 3)
    line = first_line(replacement) if isinstance(replacement, Exception) else type(replacement).__name__
    _store(lambda: world.store.set(FAILED, pickle.dumps((exit_code(replacement), line))), None)
    replacement.silent = not _elect(world, wait=False)
    return replacement


def _as_other(world: World, error: BaseException, hint: str) -> BaseException:
    if _store(lambda: world.store.check([FAILED]), False):
        return world.stopped_by_rank0()  # rank 0 failed first and prints
    if not (stopped_by_signal(error) or collective_error(error)):  # its own error: say so at once
        payload = pickle.dumps((exit_code(error), first_line(error)))
        _store(lambda: world.store.set(f"failed/{world.rank}", payload), None)
        replacement: BaseException = GroupStopped(f"rank {world.rank} of {world.size} failed: {first_line(error)}"
                                                  f"{hint}", exit_code(error))
        replacement.__cause__ = error
        replacement.silent = not _elect(world, wait=False)
        return replacement
    if stopped_by_signal(error):
        error.silent = not _elect(world, wait=False)
        return error
    if _elect(world, wait=True):  # nobody spoke: rank 0 is gone
        replacement = GroupStopped(f"rank 0 of {world.size} stopped without a word (killed, or its connection was "
                                   f"lost){hint}", 3)
        replacement.silent = False
        return replacement
    error.silent = True
    return error


def stop(world: World, error: BaseException, hint: str = "") -> BaseException:
    """What this rank raises for `error` (itself, or a GroupStopped naming the failure behind it), marked
    `silent` unless this rank prints the group's one line. `hint` ends a GroupStopped's message (where the
    run's state is kept). Alone, `error` itself."""
    if not world.parallel:
        return error
    with signals_ignored():
        return (_as_rank0 if world.is_main else _as_other)(world, error, hint)
