"""What an error means to whoever asked: the exit status (one table, ``errors.Exit``) and
the lines to show — the failing tool's log tail, the guest console's last lines, then the
one-line message. Every door (the CLI's exit, a server's response) reads it from here."""

from __future__ import annotations

from dataclasses import dataclass

from qemubox.errors import Exit, QemuboxError


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    message: str  # one line
    lines: tuple[str, ...] = ()  # what comes before it: logs, the console's tail


def of_error(exc: BaseException) -> Outcome | None:
    """The outcome of an error a user can be told about; None for a bug (an internal
    error: the door decides how to say it)."""
    if isinstance(exc, QemuboxError):
        lines = []
        tail = getattr(exc, "log_tail", "") if getattr(exc, "show_tail", False) else ""
        if tail:
            lines.append(tail)
        console = getattr(exc, "console_tail", "")
        if console:
            lines.append("--- guest console (last lines) ---\n" + console + "\n---")
        return Outcome(int(exc.exit_code), str(exc), tuple(lines))
    if isinstance(exc, KeyboardInterrupt):
        return Outcome(Exit.INTERRUPTED, "interrupted")
    if isinstance(exc, OSError) and exc.filename is not None:
        # A file the user named (or where output must go) cannot be made or used.
        return Outcome(Exit.INPUT, f"{exc.filename}: {exc.strerror or exc}")
    return None
