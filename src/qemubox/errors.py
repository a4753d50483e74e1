"""Errors that reach the user as one line and an exit code."""

from __future__ import annotations

# Exit codes shared by every command.
EXIT_MISMATCH = 1  # a check ran and found a difference
EXIT_INPUT = 2  # bad usage or bad input: nothing was done


class QemuboxError(Exception):
    """An error meant for the user: ``str(err)`` is the whole message, one line."""

    exit_code: int = EXIT_INPUT


class InputError(QemuboxError):
    """Bad input: a file, a value, an option. Nothing was changed."""


class ToolError(QemuboxError):
    """An external program (make, tar, apt-get, ...) failed."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class VerifyError(QemuboxError):
    """A configuration did not end up as asked."""

    exit_code = EXIT_MISMATCH
