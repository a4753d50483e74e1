"""The host side of the agent protocol: the requests a client makes of a guest agent —
ping, mount, renew, file operations, poweroff, a command's start (and its pid), stdin,
signals, terminal size, its end — over a :class:`~qemubox.guest.transport.Connection`
(framing, HELLO, ids, resync).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from qemubox.errors import AgentTimeout, GuestError, ProtocolViolation
from qemubox.guest import protocol as p
from qemubox.guest.protocol import Frame
from qemubox.guest.transport import (
    MAX_EVENTS_KEPT,
    AgentGone,
    Connection,
    Pending,
    SendTimeout,
)


class AgentClient(Connection):
    """A client of one guest agent. Thread-safe."""

    def ping(self, timeout: float = 10) -> None:
        self.request(Frame.PING, b"ping", timeout)

    def mount(
        self, source: str, target: str, fstype: str, options: str = "", flags: int = 0
    ) -> None:
        self.request(Frame.MOUNT, p.mount_request(source, target, fstype, options, flags))

    def renew(self, timeout: float = 30, wait: bool = True) -> None:
        """Give the guest the host's time and fresh randomness (its RNG reseeded): at each
        start, booted or restored, and at each resume. Without ``wait`` the request is only
        sent (the agent takes this client's requests in order; its answer is not awaited)."""
        payload = p.renew_request(time.time_ns(), os.urandom(p.RENEW_SEED))
        if wait:
            self.request(Frame.RENEW, payload, timeout)
            return
        ident, _ = self._new()
        try:
            self._send(Frame.RENEW, ident, payload, timeout)
        except SendTimeout:
            raise AgentTimeout(f"the guest agent took no request within {timeout} s") from None
        finally:
            self.finish(ident)  # its answer, when it comes, is for nobody

    def fs(
        self,
        op: p.FsOp,
        path: str,
        to: str = "",
        depth: int = 0,
        user: tuple[int, int, tuple[int, ...]] | None = None,
        timeout: float = 60,
    ) -> list[p.Entry]:
        """A file operation (see :class:`~qemubox.guest.protocol.FsOp`) as ``user`` (uid,
        gid, groups; root when None): the entries it answers with."""
        return self._answer(Frame.FS, p.fs_request(op, path, to, depth, user), timeout).entries

    def poweroff(self, timeout: float = 10) -> None:
        """Sync the guest's file systems and power it off."""
        self.request(Frame.POWEROFF, timeout=timeout)

    def start(
        self,
        argv: Sequence[str | bytes],
        env: Mapping[str, str],
        cwd: str,
        with_stdin: bool,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        max_output: int | None = None,
        tty: tuple[int, int] | None = None,
        user: tuple[int, int, tuple[int, ...]] | None = None,
        keep: bytes | None = None,
    ) -> tuple[int, Pending]:
        """Start a command (on a pseudo-terminal of ``tty`` rows and columns, when given;
        outliving this client, listed with the note ``keep``, when that is given); its frames
        then arrive in the returned Pending."""
        payload = p.exec_request(
            [a.encode() if isinstance(a, str) else a for a in argv],
            [f"{k}={v}".encode() for k, v in env.items()],
            cwd.encode(),
            with_stdin,
            tty,
            user,
            keep,
        )
        return self._command(Frame.EXEC, payload, on_stdout, on_stderr, max_output)

    def attach_command(
        self,
        pid: int,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        max_output: int | None = None,
    ) -> tuple[int, Pending]:
        """Take over the kept command ``pid`` (from whichever client had it): its output from
        now on and its end arrive in the returned Pending, as a started command's do."""
        if not 0 < pid < 1 << 32:
            raise ValueError(f"no process has pid {pid}")
        return self._command(
            Frame.ATTACH, pid.to_bytes(4, "little"), on_stdout, on_stderr, max_output
        )

    def _command(self, kind, payload, on_stdout, on_stderr, max_output) -> tuple[int, Pending]:
        ident, pend = self._new(
            is_exec=True, on_stdout=on_stdout, on_stderr=on_stderr, max_output=max_output
        )
        try:
            self._send(kind, ident, payload, timeout=30)
        except (AgentGone, SendTimeout):
            self.finish(ident)
            raise
        return ident, pend

    def watch(
        self, path: str, recursive: bool, on_event: Callable[[p.Event], None] | None = None
    ) -> tuple[int, Pending]:
        """Watch directory ``path`` (and those under it, when ``recursive``): its events go
        to ``on_event`` or are kept in the Pending (whose ``pid`` is the number of
        directories watched, once ``started``) until :meth:`unwatch`."""
        payload = p.watch_request(path, recursive)
        ident, pend = self._new(is_watch=True, on_event=on_event)
        try:
            self._send(Frame.WATCH, ident, payload, timeout=30)
        except (AgentGone, SendTimeout):
            self.finish(ident)
            raise
        return ident, pend

    def unwatch(self, ident: int, pend: Pending, timeout: float = 10) -> None:
        """End a watch (its events not yet taken stay in the Pending)."""
        if not pend.done.is_set():
            self._send(Frame.UNWATCH, ident, b"", timeout=5)
            pend.done.wait(timeout)
            self._check(pend)
        self.finish(ident)

    def take_events(self, ident: int, pend: Pending) -> list[p.Event]:
        """A watch's events kept since the last call. Once none are left, the error that
        ended it (a GuestError: EOVERFLOW when events were lost), or, once, an EOVERFLOW
        GuestError when more were kept than MAX_EVENTS_KEPT (those were dropped; the watch
        goes on); AgentGone or ProtocolViolation when the connection broke."""
        n = len(pend.events)
        taken = pend.events[:n]
        del pend.events[:n]
        if taken:
            return taken
        if pend.truncated:
            pend.truncated = False
            raise GuestError(
                errno_mod.EOVERFLOW,
                f"events were dropped: more than {MAX_EVENTS_KEPT} were not taken",
            )
        if not pend.done.is_set():
            self._check(pend)
        elif pend.error is not None:
            self.finish(ident)
            raise pend.error
        return taken

    def started(self, ident: int, pend: Pending, timeout: float = 30) -> int:
        """Wait for a command's (or a watch's) STARTED: its pid (a watch's count of
        directories). Raises its GuestError, AgentGone or ProtocolViolation when the
        connection broke, AgentTimeout when nothing came in time."""
        came = pend.started.wait(timeout)
        try:
            self._check(pend)
            if pend.error is not None:
                raise pend.error
            if not came or pend.pid is None:
                raise AgentTimeout(f"the guest agent did not start it within {timeout} s")
        except BaseException:
            self.finish(ident)
            raise
        return pend.pid

    def kept(self, timeout: float = 10) -> list[p.Kept]:
        """The guest's kept commands that run, whoever started them."""
        return self._answer(Frame.KEPT, b"", timeout).commands

    def resize(self, ident: int, rows: int, columns: int) -> None:
        """Give a command's terminal a new size (its foreground job gets SIGWINCH)."""
        self._send(Frame.RESIZE, ident, p.resize_request(rows, columns), timeout=5)

    def write_stdin(
        self, ident: int, pend: Pending, data: bytes, stop: threading.Event | None = None
    ) -> bool:
        """Send stdin, keeping at most STDIN_WINDOW bytes in flight. False when ``stop``
        was set or the command ended before all of it was sent."""
        view = memoryview(data)
        while view:
            chunk = bytes(view[: p.CHUNK])
            with pend.window:
                while pend.in_flight + len(chunk) > p.STDIN_WINDOW:
                    if pend.done.is_set() or self._closed or (stop and stop.is_set()):
                        return False
                    pend.window.wait(0.1)
                pend.in_flight += len(chunk)
            if pend.done.is_set() or (stop and stop.is_set()):
                return False
            try:
                self._send(Frame.STDIN, ident, chunk, timeout=1)
            except SendTimeout:
                with pend.window:
                    pend.in_flight -= len(chunk)
                continue
            view = view[len(chunk) :]
        return True

    def close_stdin(self, ident: int) -> None:
        self._send(Frame.STDIN, ident, b"", timeout=5)

    def signal(self, ident: int, signo: int, timeout: float = 5) -> None:
        self._send(Frame.SIGNAL, ident, signo.to_bytes(4, "little"), timeout)

    def wait(self, ident: int, pend: Pending, timeout: float | None) -> bool:
        """Wait for a command's end; False on timeout. Raises GuestError if it did not
        start, ProtocolViolation or AgentGone when the connection broke."""
        finished = pend.done.wait(timeout)
        try:
            self._check(pend)
        except BaseException:
            self.finish(ident)
            raise
        if finished:
            self.finish(ident)
            if pend.error:
                raise pend.error
        return finished

    def bye(self, timeout: float = 5) -> None:
        """Leave: the agent ends this client's commands."""
        with contextlib.suppress(AgentGone, TimeoutError, GuestError, ProtocolViolation):
            self.request(Frame.BYE, timeout=timeout)


def exec_exit_code(err: GuestError) -> int:
    """A shell's status for a command that could not start: 127 not found, 126 otherwise."""
    return 127 if err.errno == errno_mod.ENOENT else 126
