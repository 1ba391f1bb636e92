"""One error hierarchy: the CLI maps each class to an exit code and one line.

    CompressorError                 every error raised on purpose
      InputError (2)                the user's input: a name, a file, a value, a model
        UnreachableTargetError      the target cannot be met even with every unit removed
        MergeRefused                a fold or merge that cannot be done (exactly)
        MissingBackendError         an optional backend is not installed
        TraceError                  a model neither torch.export nor torch.fx can capture, naming the module and why
      TargetMissedError (1)         the final, longer measurement did not confirm the target
      ValidationError (3)           a transformed or exported model failed its numerical check
        FidelityFloorError          a lossy (INT8) artifact fell below the fidelity floor: refused, not written
      ExportError (3)               an exporter, converter or runtime failed on our artifact
      InternalError (3)             anything else that went wrong inside (a bug)
      DeviceError (4)               the device that measures failed after it was reached: the connection was
                                    lost or the runner died, and retrying did not help; a prune keeps its state
      GroupStopped (its own)        another process of a torchrun group failed or vanished; carries its exit code

InputError is also a ValueError, and ExportError, InternalError and DeviceError are RuntimeErrors, so code
that catches the built-in classes keeps working.
"""

from __future__ import annotations


class CompressorError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 2


class InputError(CompressorError, ValueError):
    """Bad user input: unknown name, missing or malformed file, bad value (exit 2)."""


class UnreachableTargetError(InputError):
    """The latency target cannot be met even with every removable unit removed (exit 2)."""


class MergeRefused(InputError):
    """A fold or merge that cannot be done exactly (or at all); `reason` says why (exit 2)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MissingBackendError(InputError):
    """An optional backend package is not installed (exit 2); says how to get it."""


class TraceError(InputError):
    """Neither torch.export nor torch.fx can capture the model (data-dependent control flow, ...); names the
    module and both reasons (exit 2)."""


class TargetMissedError(CompressorError):
    """The final, longer measurement did not confirm the target (exit 1)."""

    exit_code = 1


class ValidationError(CompressorError):
    """A transformed or exported model disagrees with its source beyond tolerance (exit 3)."""

    exit_code = 3


class FidelityFloorError(ValidationError):
    """A lossy artifact (INT8) kept less fidelity to its fp32 model than the floor asks; nothing was written
    (exit 3). `attempts` holds what each try measured (quantizer settings, layers kept in fp32, fidelity)."""

    def __init__(self, message: str, attempts: list | None = None) -> None:
        super().__init__(message)
        self.attempts = list(attempts or [])


class ExportError(CompressorError, RuntimeError):
    """An exporter, converter or runtime failed on an artifact we made (exit 3)."""

    exit_code = 3


class InternalError(CompressorError, RuntimeError):
    """An unexpected failure inside compressor, reported in one line (exit 3; --debug shows the traceback)."""

    exit_code = 3


class DeviceError(CompressorError, RuntimeError):
    """The measuring device failed after it was reached (a lost connection, a runner that died), retries spent
    (exit 4): not bad input; a prune's state is kept in its output folder for --resume once the device is back."""

    exit_code = 4


class GroupStopped(CompressorError):
    """Another process of the run's process group failed, or stopped without a word (killed): the job ends
    on every process with the exit code of that failure (3 where it is unknown)."""

    def __init__(self, message: str, exit_code: int = 3) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (or its type name), at most `limit` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]
