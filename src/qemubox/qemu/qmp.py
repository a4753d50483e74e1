"""QEMU's monitor (QMP), through QEMU's own client library: commands, and events waited
for rather than polled.

The library (and asyncio under it) takes some 25 ms to import: callers import this module
before they wait for a QEMU that is starting, so that the import and QEMU's start overlap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import Any

from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

from qemubox.errors import SandboxError

# A refused connection is the caller's to report (or to retry, while QEMU starts listening):
# not the library's to log.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

# Seconds QEMU may take to answer one command: it answers at once (a migration or a stop is
# waited for by polling), so a monitor silent this long is a QEMU stuck, said as an error
# rather than waited for forever.
COMMAND_TIMEOUT = 60.0


class Monitor:
    """A QMP connection. QEMU serves one monitor client at a time: the attached client of a
    machine holds it."""

    def __init__(self, socket_path: str) -> None:
        self._open(socket_path, server=False)
        self._qmp.connect(negotiate=True)

    @classmethod
    def listen(cls, socket_path: str) -> Monitor:
        """A monitor QEMU connects to (its ``-chardev socket`` without ``server=on``),
        listening once this returns; :meth:`accept` waits for QEMU."""
        self = cls.__new__(cls)
        self._open(socket_path, server=True)
        return self

    def _open(self, socket_path: str, server: bool) -> None:
        """The library's client, on an event loop of this monitor's own: the library would
        otherwise make one per thread and leave it open, to be collected as the interpreter
        exits (when its sockets may be gone first, which prints a traceback on stderr). The
        loop is closed with the monitor, or at exit if the monitor never is."""
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)  # what the library's constructor takes
        try:
            self._qmp = QEMUMonitorProtocol(socket_path, server=server)
        except BaseException:
            self.loop.close()
            raise
        finally:
            asyncio.set_event_loop(None)  # none left set on the thread (this one is ours)
        self._qmp.settimeout(COMMAND_TIMEOUT)
        self._closing = weakref.finalize(self, _shut, self._qmp, self.loop)
        self._events: list[dict[str, Any]] = []

    def accept(self, timeout: float | None = None) -> None:
        self._qmp.accept(timeout)

    def command(self, name: str, **args: Any) -> Any:
        try:
            return self._qmp.cmd(name, **args)
        except ExecuteError as err:
            raise SandboxError(f"QEMU refused {name}: {err}") from None
        except TimeoutError:
            raise SandboxError(
                f"QEMU did not answer {name} within {COMMAND_TIMEOUT:g} s (it is stuck)"
            ) from None

    def send_fd(self, name: str, fd: int) -> None:
        """Hand QEMU an open file (SCM_RIGHTS), known to it as ``name`` (``fd:NAME``)."""
        self._qmp.send_fd_scm(fd)
        self.command("getfd", fdname=name)

    def wait_event(self, names: set[str], timeout: float) -> dict[str, Any] | None:
        """The first event named in ``names``, waiting up to ``timeout`` seconds; None when
        none came. Other events are kept for the next wait."""
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self._events):
            if event.get("event") in names:
                return self._events.pop(i)
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self._qmp.pull_event(wait=left)
            except Exception:  # timeout or the connection closing as QEMU exits
                return None
            if event is None:
                return None
            if event.get("event") in names:
                return event
            self._events.append(event)
        return None

    def take_events(self, names: set[str], settle: bool = True) -> list[dict[str, Any]]:
        """Every event named in ``names`` so far, removed from the queue. ``settle`` first
        makes a round trip, so that whatever QEMU sent before it has been read."""
        with contextlib.suppress(Exception):  # a QEMU that exited has nothing more to say
            if settle:
                self._qmp.cmd("query-status")
            while (event := self._qmp.pull_event(wait=False)) is not None:
                self._events.append(event)
        taken = [e for e in self._events if e.get("event") in names]
        self._events = [e for e in self._events if e.get("event") not in names]
        return taken

    def close(self) -> None:
        self._closing()


def _shut(qmp: QEMUMonitorProtocol, loop: asyncio.AbstractEventLoop) -> None:
    """Close the connection (or stop listening), then the loop it ran on."""
    with contextlib.suppress(Exception):  # a QEMU that exited has nothing more to say
        qmp.close()
    loop.close()
