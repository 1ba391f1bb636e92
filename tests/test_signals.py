"""A SIGINT or SIGTERM whose exception Python drops (raised inside a finalizer or a weakref callback) is
raised again at the CLI's next log line, so the run still stops (compressor/cli/signals.py)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from compressor.cli import signals
from compressor.cli.commands import log


class _Finalised:
    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        signals.on_signal(self.signum, None)  # as if the signal arrived here: Python prints it and drops it


@pytest.mark.parametrize(("signum", "raised"), [(signal.SIGINT, KeyboardInterrupt),
                                                (signal.SIGTERM, signals.Terminated)])
def test_a_signal_dropped_in_a_finalizer_is_raised_at_the_next_log_line(signum, raised, capsys):
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    try:
        signals.install()
        log("before")  # nothing pending: printed
        _Finalised(signum)  # collected at once; its exception goes nowhere
        with pytest.raises(raised):
            log("after")
        try:
            signals.on_signal(signum, None)
        except BaseException:  # noqa: BLE001  (the signal on its way out: cleanup may still log)
            log("cleaning up")
        ours = [line for line in capsys.readouterr().err.splitlines() if line in ("before", "after", "cleaning up")]
        assert ours == ["before", "cleaning up"]  # "after" raised first; the cleanup's line did not
        signals.install()  # a new run forgets it
        log("again")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = hook


DROPPED = """
import signal
from compressor.cli import signals

class Finalised:
    def __init__(self, job):
        self.job = job
    def __del__(self):
        self.job()

def other_failure():
    raise ValueError("a finalizer's own bug")

signals.install()
Finalised(lambda: signals.on_signal(signal.SIG{name}, None))  # dropped: Python would print its traceback
Finalised(other_failure)  # not a signal: printed as Python prints it
signals.raise_pending()
"""


@pytest.mark.parametrize("name", ["INT", "TERM"])
def test_a_signal_dropped_in_a_finalizer_prints_no_traceback_and_other_failures_still_do(name):
    """The dropped signal exception is raised again, not printed; another finalizer's failure is printed."""
    done = subprocess.run([sys.executable, "-c", DROPPED.format(name=name)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0, done.stderr
    printed = done.stderr.split("ValueError: a finalizer's own bug")
    assert len(printed) == 2, done.stderr  # the other failure, printed once
    assert "Exception ignored" in printed[0] and "on_signal" not in printed[0], done.stderr
    raised = "KeyboardInterrupt" if name == "INT" else "compressor.cli.signals.Terminated"
    assert printed[1].strip().endswith(raised), done.stderr  # the signal raised again, at the end


CHILD = """
import multiprocessing, signal, sys, time
from compressor.cli import signals

signals.install()
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
child.start()
time.sleep(0.5)
child.terminate()  # what a DataLoader does to a worker that is slow to stop
child.join(10)
print(child.exitcode)
"""


def test_a_forked_worker_ends_on_sigterm_without_a_traceback():
    """The handler is inherited by forked workers: there SIGTERM ends the process as by default, quietly."""
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(-signal.SIGTERM), done.stdout
    assert "Traceback" not in done.stderr and "Terminated" not in done.stderr, done.stderr
