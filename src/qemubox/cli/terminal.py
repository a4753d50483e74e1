"""Our terminal lent to a command on a pseudo-terminal in the guest: raw mode while it runs
(every key, ^C included, goes to the guest), restored after; size changes forwarded."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import tty as ttys
from collections.abc import Callable, Iterator


def size(fd: int) -> tuple[int, int]:
    """(rows, columns) of the terminal on ``fd``; 24x80 when it is none or says 0."""
    try:
        columns, rows = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return (rows or 24), (columns or 80)


@contextlib.contextmanager
def raw(fd: int) -> Iterator[bool]:
    """The terminal on ``fd`` in raw mode for the block, restored after; yields whether
    ``fd`` is a terminal at all (nothing is changed when it is not)."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    ttys.setraw(fd, termios.TCSANOW)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def lent(resize: Callable[[int, int], None]) -> Iterator[tuple[int, int]]:
    """Our terminal lent to a command on a guest terminal: raw mode, and each change of
    its size passed to ``resize``; yields its size to start with."""
    stdin = sys.stdin.fileno()

    def resized(*_) -> None:
        with contextlib.suppress(Exception):
            resize(*size(stdin))

    with raw(stdin):
        previous = signal.signal(signal.SIGWINCH, resized)
        try:
            yield size(stdin)
        finally:
            signal.signal(signal.SIGWINCH, previous)
