"""A named sandbox's console, as ``logs`` shows it: read from the end (the log's head may
have been freed), followed while the sandbox runs, and made printable (a guest's escape
sequences are shown as text, never sent to a terminal)."""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Iterator
from pathlib import Path

from qemubox.errors import printable
from qemubox.sandbox import named

WINDOW = 8 << 20  # at most this much of the end is read for --tail (the log's cap is 4-8 MiB)


class Cleaner:
    """Console bytes as text for a terminal: holes dropped, CRLF as LF, controls escaped;
    fed in chunks (a character or a CRLF split between two is put back together)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._cr = ""

    def feed(self, data: bytes, final: bool = False) -> bytes:
        text = self._cr + self._decoder.decode(data.replace(b"\0", b""), final)
        self._cr = ""
        if text.endswith("\r") and not final:
            text, self._cr = text[:-1], "\r"
        return printable(text.replace("\r\n", "\n")).encode()


def _start(path: Path, lines: int | None) -> int:
    """Where reading begins: the first byte held (after a freed head), or the start of the
    last ``lines`` lines."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        try:
            first = os.lseek(fh.fileno(), 0, os.SEEK_DATA)
        except OSError:  # all hole
            first = size
        if lines is None:
            return first
        begin = max(first, size - WINDOW)
        fh.seek(begin)
        data = fh.read(size - begin)
    if lines == 0:
        return size
    ends = [i for i, b in enumerate(data) if b == 0x0A]
    if data.endswith(b"\n"):
        ends.pop()
    if len(ends) < lines:
        return begin
    return begin + ends[-lines] + 1


def read(
    name: str, lines: int | None = None, follow: bool = False, net: bool = False
) -> Iterator[bytes]:
    """The console of ``name``'s current (or last) run — with ``net``, its egress
    decisions instead; with ``follow``, what comes next too, until the sandbox stops."""
    path = named.egress_log(name) if net else named.console_log(name)
    if not path.exists():
        return
    at = _start(path, lines)
    cleaner = Cleaner()
    while True:
        with open(path, "rb") as fh:
            fh.seek(at)
            while chunk := fh.read(1 << 16):
                at += len(chunk)
                yield cleaner.feed(chunk)
        if not follow or not named.is_running(name):
            yield cleaner.feed(b"", final=True)
            return
        time.sleep(0.2)
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # the run ended and its log moved
            return
        if size < at:
            at = 0
