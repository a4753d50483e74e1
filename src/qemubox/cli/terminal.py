"""Our terminal lent to a command on a pseudo-terminal in the guest: raw mode while it runs
(every key, ^C included, goes to the guest), restored after; size changes forwarded."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import tty as ttys
from collections.abc import Iterator


def size(fd: int) -> tuple[int, int]:
    """(rows, columns) of the terminal on ``fd``; 24x80 when it is none or says 0."""
    try:
        columns, rows = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return (rows or 24), (columns or 80)


@contextlib.contextmanager
def forwarded(sandbox, wanted: bool) -> Iterator[tuple[int, int] | None]:
    """Yields the terminal size for ``Sandbox.exec(tty=...)`` (None unless ``wanted``)."""
    if not wanted:
        yield None
        return
    stdin = sys.stdin.fileno()
    saved = None
    if os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        ttys.setraw(stdin, termios.TCSANOW)

    def resized(*_) -> None:
        with contextlib.suppress(Exception):
            sandbox.resize_terminals(*size(stdin))

    previous = signal.signal(signal.SIGWINCH, resized)
    try:
        yield size(stdin)
    finally:
        signal.signal(signal.SIGWINCH, previous)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
