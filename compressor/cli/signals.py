"""SIGINT and SIGTERM for the CLI: an exception in the main thread, raised again if Python drops it.

Python runs a signal handler between bytecodes of the main thread, whatever it is doing; when that is
a weakref callback or a `__del__` (torch's WeakIdKeyDictionary during a garbage collection, say), the
exception is dropped, and a prune interrupted that way would run on to its end. So each handler also
records the signal, and `raise_pending` (called by the CLI's log line, which every stage and measurement
writes) raises it again. Python would also print the dropped exception with its traceback ("Exception
ignored in ..."); `install` sets a `sys.unraisablehook` that keeps quiet about our own signal exceptions,
and hands every other one to the hook it replaced, so the user sees only the one line the CLI writes.

A process forked after `install` (a DataLoader worker, which its parent ends with SIGTERM when it takes
too long to stop) inherits the handler; there it takes the signal's default action instead, so a worker
ends quietly rather than printing a Terminated traceback into the user's log.
"""

from __future__ import annotations

import os
import signal
import sys


class Terminated(BaseException):  # noqa: N818  (like KeyboardInterrupt: not an Exception, so nothing swallows it)
    """Raised in the main thread when SIGTERM arrives."""


_pending: list[int] = []  # the signals received since `install`
_owner: list[int] = []  # the process that installed the handlers


def on_signal(signum: int, frame: object) -> None:
    """The handler: record `signum`, raise KeyboardInterrupt (SIGINT) or Terminated (SIGTERM); in a forked
    child, the signal's default action."""
    if _owner and os.getpid() != _owner[0]:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _pending.append(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


def install() -> None:
    """Handle SIGINT and SIGTERM with `on_signal`, forgetting any signal received before; keep quiet
    about the signal exceptions a finalizer drops (they are raised again by `raise_pending`)."""
    _pending.clear()
    _owner[:] = [os.getpid()]
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    if sys.unraisablehook is not _quiet_about_signals:
        _replaced[:] = [sys.unraisablehook]
        sys.unraisablehook = _quiet_about_signals


_replaced: list = []  # the unraisable hook `install` replaced


def _quiet_about_signals(unraisable: object) -> None:
    """`sys.unraisablehook`: nothing for a signal exception `on_signal` raised (it is pending and will be
    raised again); any other dropped exception goes to the hook that was there before."""
    if _pending and unraisable.exc_type in (KeyboardInterrupt, Terminated):
        return
    (_replaced[0] if _replaced else sys.__unraisablehook__)(unraisable)


def raise_pending() -> None:
    """Raise the first signal received again (its exception may have been dropped); nothing if none came,
    or while an exception is on its way out (the signal's own, running the cleanup of `finally` blocks)."""
    if _pending and sys.exc_info()[0] is None:
        raise KeyboardInterrupt if _pending[0] == signal.SIGINT else Terminated


def ignore() -> None:
    """SIGINT and SIGTERM ignored from now on (a process that is already failing), nothing pending."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _pending.clear()
