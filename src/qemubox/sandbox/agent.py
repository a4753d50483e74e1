"""The host side of the guest agent's protocol, over the virtio-serial port's socket.

Frames both ways: u32 length (of what follows), u8 type, u32 id, payload; little-endian.
A reader thread dispatches guest frames to the request they answer.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

H_EXEC, H_STDIN, H_SIGNAL, H_MOUNT, H_PING, H_POWEROFF = 1, 2, 3, 4, 5, 6
G_READY, G_STDOUT, G_STDERR, G_EXIT, G_ERROR, G_OK, G_PONG = 20, 21, 22, 23, 24, 25, 26
CHUNK = 64 * 1024


def _str(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("<I", len(data)) + data


class AgentGone(Exception):
    """The connection to the guest agent ended (the VM stopped or died)."""


class GuestError(Exception):
    """The agent could not do what was asked (the message is the guest's)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    on_stdout: Callable[[bytes], None] | None = None
    on_stderr: Callable[[bytes], None] | None = None
    stdout: list[bytes] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    status: tuple[int, int] | None = None  # (0, code) exited or (1, signal) killed
    error: GuestError | None = None
    payload: bytes = b""


class AgentClient:
    """Talks to one guest agent. Thread-safe: any number of requests at once."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._closed = False
        self.ready = threading.Event()
        self.release = ""
        self._reader = threading.Thread(target=self._read_loop, name="qemubox-agent", daemon=True)
        self._reader.start()

    # --- plumbing -----------------------------------------------------------------------------

    def _send(self, kind: int, ident: int, payload: bytes = b"") -> None:
        header = struct.pack("<IBI", len(payload) + 5, kind, ident)
        with self._send_lock:
            try:
                self._sock.sendall(header + payload)
            except OSError:
                raise AgentGone("the guest agent is gone") from None

    def _recv_exact(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            chunk = self._sock.recv(min(n - got, 1 << 20))
            if not chunk:
                raise AgentGone("the guest agent closed the connection")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _read_loop(self) -> None:
        try:
            while True:
                total, kind, ident = struct.unpack("<IBI", self._recv_exact(9))
                payload = self._recv_exact(total - 5)
                self._dispatch(kind, ident, payload)
        except (AgentGone, OSError):
            pass
        finally:
            self._closed = True
            with self._lock:
                pending = list(self._pending.values())
            for p in pending:
                p.done.set()
            self.ready.set()

    def _dispatch(self, kind: int, ident: int, payload: bytes) -> None:
        if kind == G_READY:
            self.release = payload.decode(errors="replace")
            self.ready.set()
            return
        with self._lock:
            p = self._pending.get(ident)
        if p is None:
            return
        if kind == G_STDOUT:
            (p.on_stdout or p.stdout.append)(payload)
        elif kind == G_STDERR:
            (p.on_stderr or p.stderr.append)(payload)
        elif kind == G_EXIT:
            p.status = struct.unpack("<ii", payload)
            p.done.set()
        elif kind == G_ERROR:
            err = struct.unpack("<I", payload[:4])[0]
            p.error = GuestError(err, payload[4:].decode(errors="replace"))
            p.done.set()
        elif kind in (G_OK, G_PONG):
            p.payload = payload
            p.done.set()

    def _new(self, **kw) -> tuple[int, _Pending]:
        with self._lock:
            ident = self._next_id
            self._next_id += 1
            p = _Pending(**kw)
            self._pending[ident] = p
        return ident, p

    def _finish(self, ident: int) -> None:
        with self._lock:
            self._pending.pop(ident, None)

    def _wait(self, p: _Pending, timeout: float | None) -> bool:
        finished = p.done.wait(timeout)
        if self._closed and p.status is None and p.error is None and not p.payload:
            raise AgentGone("the guest agent is gone")
        return finished

    @property
    def closed(self) -> bool:
        return self._closed

    # --- requests -----------------------------------------------------------------------------

    def request(self, kind: int, payload: bytes = b"", timeout: float | None = 30) -> bytes:
        """A request answered by OK or PONG; raises GuestError, AgentGone or TimeoutError."""
        ident, p = self._new()
        try:
            self._send(kind, ident, payload)
            if not self._wait(p, timeout):
                raise TimeoutError(f"the guest agent did not answer within {timeout} s")
            if p.error:
                raise p.error
            return p.payload
        finally:
            self._finish(ident)

    def ping(self, timeout: float = 10) -> None:
        self.request(H_PING, b"ping", timeout)

    def mount(
        self, source: str, target: str, fstype: str, options: str = "", flags: int = 0
    ) -> None:
        payload = b"".join(_str(x) for x in (source, target, fstype, options))
        self.request(H_MOUNT, payload + struct.pack("<I", flags))

    def poweroff(self, timeout: float = 10) -> None:
        """Sync the guest's file systems and power it off."""
        self.request(H_POWEROFF, timeout=timeout)

    def start(
        self,
        argv: Sequence[str | bytes],
        env: Mapping[str, str],
        cwd: str,
        with_stdin: bool,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
    ) -> tuple[int, _Pending]:
        ident, p = self._new(on_stdout=on_stdout, on_stderr=on_stderr)
        payload = struct.pack("<II", 1 if with_stdin else 0, len(argv))
        payload += b"".join(_str(a) for a in argv)
        payload += struct.pack("<I", len(env)) + b"".join(_str(f"{k}={v}") for k, v in env.items())
        payload += _str(cwd)
        try:
            self._send(H_EXEC, ident, payload)
        except AgentGone:
            self._finish(ident)
            raise
        return ident, p

    def write_stdin(self, ident: int, data: bytes) -> None:
        for i in range(0, len(data), CHUNK):
            self._send(H_STDIN, ident, data[i : i + CHUNK])

    def close_stdin(self, ident: int) -> None:
        self._send(H_STDIN, ident, b"")

    def signal(self, ident: int, signo: int) -> None:
        self._send(H_SIGNAL, ident, struct.pack("<I", signo))

    def wait(self, ident: int, p: _Pending, timeout: float | None) -> bool:
        """Wait for a command's end; False on timeout. Raises GuestError if it did not start."""
        try:
            finished = self._wait(p, timeout)
        except AgentGone:
            self._finish(ident)
            raise
        if finished:
            self._finish(ident)
            if p.error:
                raise p.error
        return finished

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def exec_exit_code(err: GuestError) -> int:
    """A shell's status for a command that could not start: 127 not found, 126 otherwise."""
    return 127 if err.errno == errno_mod.ENOENT else 126
