"""One error hierarchy: the CLI maps each class to an exit code and one line."""

from __future__ import annotations


class CompressorError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 2


class InputError(CompressorError):
    """Bad user input: unknown name, missing or malformed file, bad value (exit 2)."""


class UnreachableTargetError(InputError):
    """The latency target cannot be met even with every removable unit removed (exit 2)."""


class ValidationError(CompressorError):
    """A transformed or exported model disagrees with its source beyond tolerance."""

    exit_code = 3


class TargetMissedError(CompressorError):
    """The final, longer measurement did not confirm the target (exit 1)."""

    exit_code = 1


class MergeRefused(InputError):
    """A fold or merge that cannot be done exactly (or at all); `reason` says why (exit 2)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
