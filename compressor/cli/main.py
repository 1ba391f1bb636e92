"""`compressor`: deployment-oriented pruning of PyTorch vision models under a measured latency target.

Exit codes: 0 ok, 1 target missed or latency regression, 2 bad input (one line
on stderr), 3 a failed numerical check or an internal failure (one line;
--debug shows the traceback), 4 the measuring device failed (retried first; a
prune keeps its state for --resume), 130 interrupted, 143 terminated.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

from compressor.cli import signals
from compressor.cli.signals import Terminated
from compressor.errors import CompressorError, InternalError, first_line

INTERRUPTED = 130  # SIGINT (Ctrl-C)
TERMINATED = 143  # SIGTERM (a CI timeout, a process manager)


def _silent(error: BaseException) -> bool:
    """Whether another process of a torchrun group prints this error's line (compute/failure.py): then
    this one exits with its code and says nothing; once failing, a late signal changes nothing."""
    signals.ignore()
    return bool(getattr(error, "silent", False))


def _interrupted(command: str, code: int, args: argparse.Namespace, error: BaseException) -> int:
    """One line; where the run saved its state, how to continue it."""
    from pathlib import Path

    if _silent(error):
        return code
    what = "interrupted" if code == INTERRUPTED else "terminated"
    out = getattr(args, "out", None)
    hint = ""
    if command == "prune" and out and (Path(out) / ".state").is_dir():
        hint = f"; its state is kept in {out}: continue with the same command and --resume"
    print(f"compressor {command}: {what}{hint}", file=sys.stderr)
    return code


def report_error(command: str, error: CompressorError, debug: bool) -> int:
    """One line on stderr (the traceback too with --debug); returns the error's exit code."""
    if _silent(error):
        return error.exit_code
    if debug:
        traceback.print_exception(error)
    print(f"compressor {command}: error: {error}", file=sys.stderr)
    return error.exit_code


def _command_of(argv: Sequence[str]) -> str:
    from compressor.cli.parser import COMMANDS

    return next((a for a in argv if a in COMMANDS), "").strip() or "command"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(argv)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(argv: list[str]) -> int:
    from compressor.cli.parser import build_parser

    try:
        args = build_parser(__doc__.splitlines()[0]).parse_args(argv)
    except CompressorError as e:  # argparse's complaint, as one line
        return report_error(_command_of(argv), e, "--debug" in argv)
    run: Callable[[argparse.Namespace], int] = args.run
    debug = getattr(args, "debug", False)
    signals.install()
    try:
        return run(args)
    except CompressorError as e:
        return report_error(args.command, e, debug)
    except KeyboardInterrupt as e:
        return _interrupted(args.command, INTERRUPTED, args, e)
    except Terminated as e:
        return _interrupted(args.command, TERMINATED, args, e)
    except OSError as e:  # the disk is full, a folder is not writable ...: the environment, one line
        if _silent(e):
            return 2
        print(f"compressor {args.command}: error: cannot write or read {e.filename or ''}: "
              f"{e.strerror or first_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, exit 3
        if _silent(e):
            return 3
        internal = InternalError(f"internal error: {type(e).__name__}: {first_line(e)} (rerun with --debug for "
                                 "the traceback)")
        internal.__cause__ = e
        if debug:
            traceback.print_exception(e)
        print(f"compressor {args.command}: error: {internal}", file=sys.stderr)
        return internal.exit_code


if __name__ == "__main__":
    sys.exit(main())
