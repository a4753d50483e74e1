"""The transport of the agent protocol: one connection to one guest agent (its words are
in ``client.py``).

QEMU owns each agent port's socket (a listening chardev) and serves one client on it; a
client says HELLO, the agent answers READY and ends whatever an earlier client left
running. Within a process, one client carries any number of requests at once (ids tell
their frames apart); a reader thread dispatches the guest's frames to the request they
answer. Everything the guest sends is checked: a frame that is malformed, too large, or
wrong for the request it names ends the connection with ProtocolViolation.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qemubox.errors import AgentTimeout, GuestError, ProtocolViolation
from qemubox.guest import protocol as p
from qemubox.guest.protocol import Frame

MAX_EVENTS_KEPT = 100_000  # a watch's events not yet taken (more: dropped, and it says so)
PATIENCE = 1.0  # seconds for a READY before asking again on a new connection (doubling)


class AgentGone(Exception):
    """The connection to the guest agent ended (the VM stopped or died)."""


class SendTimeout(Exception):
    """The guest did not take a frame in time (it stopped reading its port). Nothing of
    the frame was sent; when part of it was, the connection is closed instead (AgentGone)."""


@dataclass
class Pending:
    """A request in flight; for a command, also its output and stdin window."""

    is_exec: bool = False
    is_watch: bool = False
    on_event: Callable[[p.Event], None] | None = None  # a watch's
    events: list[p.Event] = field(default_factory=list)  # a watch's, without on_event
    done: threading.Event = field(default_factory=threading.Event)
    on_stdout: Callable[[bytes], None] | None = None
    on_stderr: Callable[[bytes], None] | None = None
    max_output: int | None = None  # bytes kept of stdout + stderr without callbacks
    kept: int = 0
    truncated: bool = False
    stdout: list[bytes] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    status: p.ExitStatus | None = None
    error: GuestError | None = None
    payload: bytes = b""
    entries: list[p.Entry] = field(default_factory=list)  # a file operation's answer
    answered: int = 0  # bytes of its ENTRIES payloads
    commands: list[p.Kept] = field(default_factory=list)  # a listing of kept commands
    pid: int | None = None  # a command's, in the guest, once it runs
    started: threading.Event = field(default_factory=threading.Event)  # pid known, or done
    in_flight: int = 0  # stdin bytes sent and not yet taken by the command
    window: threading.Condition = field(default_factory=threading.Condition)

    def output(self, data: bytes, callback, sink: list[bytes]) -> None:
        if callback is not None:
            callback(data)
            return
        if self.max_output is not None:
            room = self.max_output - self.kept
            if len(data) > room:
                data = data[: max(room, 0)]
                self.truncated = True
        self.kept += len(data)
        if data:
            sink.append(data)


def _connect(path: Path, deadline: float, alive: Callable[[], None]) -> socket.socket:
    """Connect to QEMU's listening socket, waiting for QEMU to create it (or to take a
    connection: a full backlog would block a plain connect past the deadline)."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
            sock.setblocking(True)
            return sock
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
            sock.close()
        alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {path}")
        time.sleep(0.005)


class Connection:
    """A connection to one guest agent: framing, HELLO and READY, requests in flight by
    id. Thread-safe."""

    def __init__(self, sock: socket.socket, leftover: bytes = b"", release: str = "") -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, Pending] = {}
        self._next_id = 1
        self._closed = False
        self.violation: ProtocolViolation | None = None
        self.release = release
        self._decoder = p.Decoder(p.GUEST_FRAMES)
        self._leftover = leftover
        self._reader = threading.Thread(target=self._read_loop, name="qemubox-agent", daemon=True)
        self._reader.start()

    # --- attaching ----------------------------------------------------------------------------

    @classmethod
    def attach(
        cls,
        path: Path,
        timeout: float,
        alive: Callable[[], None] = lambda: None,
        resync: bool = False,
    ) -> Connection:
        """Connect, say HELLO and wait for the agent's READY (at most ``timeout`` seconds;
        ``alive`` raises when the VM has died meanwhile). ``resync`` first sends padding, for
        an agent an earlier client may have left in the middle of a frame.

        A READY that does not come within ``PATIENCE`` (doubling each time) is asked for
        again on a new connection: QEMU can leave a port whose client was killed while the
        port was full unable to take the guest's output (throttled, with nothing left to
        release it), and hanging up is what resets it."""
        deadline = time.monotonic() + timeout
        patience = PATIENCE
        while True:
            try:
                give_up = min(deadline, time.monotonic() + patience)
                return cls._hello(path, deadline, give_up, alive, resync)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
            resync, patience = True, patience * 2

    @classmethod
    def _hello(
        cls,
        path: Path,
        deadline: float,
        give_up: float,
        alive: Callable[[], None],
        resync: bool,
    ) -> Connection:
        """One connection's HELLO and READY: TimeoutError when READY has not come by
        ``give_up``; QEMU's socket is waited for until ``deadline``."""
        sock = _connect(path, deadline, alive)
        try:
            nonce = os.urandom(p.NONCE_SIZE)
            hello = (b"\0" * p.SYNC_PADDING if resync else b"") + p.encode(Frame.HELLO, 0, nonce)
            view = memoryview(hello)
            while view:  # a port nobody reads must not outlast give_up
                _, writable, _ = select.select([], [sock], [], 0.05)
                alive()
                if time.monotonic() > give_up:
                    raise TimeoutError("the guest agent did not take HELLO")
                if not writable:
                    continue
                try:
                    view = view[sock.send(view, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL) :]
                except BlockingIOError:
                    continue
                except ConnectionError:
                    alive()
                    raise AgentGone(
                        "the guest agent closed the connection while starting"
                    ) from None

            def more() -> bytes:
                """What the agent sent next; AgentGone at its end, TimeoutError when it is
                time to give up (a guest that stops in the middle of READY, too)."""
                while True:
                    ready, _, _ = select.select([sock], [], [], 0.05)
                    if ready:
                        try:
                            chunk = sock.recv(1 << 16)
                        except ConnectionError:  # QEMU exited (a start-up error, say)
                            chunk = b""
                        if not chunk:
                            alive()
                            raise AgentGone("the guest agent closed the connection while starting")
                        return chunk
                    alive()
                    if time.monotonic() > give_up:
                        raise TimeoutError("the guest agent did not answer")

            stream = b""
            while (start := p.find_ready(stream, nonce)) is None:
                stream = stream[-(p.HEADER.size + p.NONCE_SIZE + p.MAX_PAYLOAD) :] + more()
            decoder = p.Decoder(frozenset({Frame.READY}))
            frames = decoder.feed(stream[start:])
            while not frames:  # the header and nonce are there; the rest of READY follows
                frames = decoder.feed(more())
            hello_back = p.decode_ready(frames[0][2])
            if hello_back.version != p.VERSION:
                raise ProtocolViolation(
                    f"the guest agent speaks protocol {hello_back.version}, not {p.VERSION}"
                )
            return cls(sock, decoder.rest(), hello_back.release)  # the rest is the session's
        except BaseException:
            sock.close()
            raise

    # --- plumbing -----------------------------------------------------------------------------

    def _send(self, kind: Frame, ident: int, payload: bytes = b"", timeout: float | None = None):
        """Send one frame whole. With ``timeout``, SendTimeout when the guest does not take
        it in time."""
        data = p.encode(kind, ident, payload)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._send_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise SendTimeout("the guest is not reading its port")
        try:
            view = memoryview(data)
            while view:
                if self._closed:
                    raise AgentGone("the guest agent is gone")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    if len(view) < len(data):  # the stream is cut inside a frame
                        self.close()
                        raise AgentGone("the guest stopped reading its port")
                    raise SendTimeout("the guest is not reading its port")
                _, writable, _ = select.select([], [self._sock], [], left)
                if not writable:
                    continue
                try:
                    sent = self._sock.send(view, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                except BlockingIOError:
                    continue
                except OSError:
                    raise AgentGone("the guest agent is gone") from None
                view = view[sent:]
        finally:
            self._send_lock.release()

    def _read_loop(self) -> None:
        try:
            if self._leftover:
                self._handle(self._decoder.feed(self._leftover))
            while True:
                chunk = self._sock.recv(1 << 16)
                if not chunk:
                    break
                self._handle(self._decoder.feed(chunk))
        except ProtocolViolation as err:
            self.violation = err
        except OSError:
            pass
        finally:
            self._closed = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                pending = list(self._pending.values())
            for pend in pending:
                pend.done.set()
                pend.started.set()
                with pend.window:
                    pend.window.notify_all()

    def _handle(self, frames: list[tuple[Frame, int, bytes]]) -> None:
        for kind, ident, payload in frames:
            with self._lock:
                pend = self._pending.get(ident)
            if pend is None or pend.done.is_set():
                continue  # a request that already ended (a killed command's last words)
            self._dispatch(pend, kind, payload)

    def _dispatch(self, pend: Pending, kind: Frame, payload: bytes) -> None:
        if kind == Frame.ERROR:
            pend.error = GuestError(*p.decode_error(payload))
            pend.done.set()
            pend.started.set()
        elif pend.is_watch:
            self._watch_frame(pend, kind, payload)
        elif not pend.is_exec:
            if kind == Frame.ENTRIES:
                pend.answered += len(payload)
                pend.entries += p.decode_entries(payload)
                if len(pend.entries) > p.MAX_ENTRIES or pend.answered > p.MAX_LISTING:
                    raise ProtocolViolation("the guest sent more entries than a listing has")
                return
            if kind == Frame.COMMAND:
                pend.commands.append(p.decode_command(payload))
                if len(pend.commands) > p.MAX_EXECS:
                    raise ProtocolViolation("the guest listed more commands than it can run")
                return
            if kind not in (Frame.OK, Frame.PONG):
                raise ProtocolViolation(f"{kind.name} frame answers a request that is no command")
            pend.payload = payload
            pend.done.set()
        elif kind == Frame.STDOUT:
            pend.output(payload, pend.on_stdout, pend.stdout)
        elif kind == Frame.STDERR:
            pend.output(payload, pend.on_stderr, pend.stderr)
        elif kind == Frame.STDIN_ACK:
            taken = p.decode_u32(payload, "STDIN_ACK")
            with pend.window:
                if taken > pend.in_flight:
                    raise ProtocolViolation("the guest acknowledged stdin it was never sent")
                pend.in_flight -= taken
                pend.window.notify_all()
        elif kind == Frame.STARTED:
            if pend.pid is not None:
                raise ProtocolViolation("a command was said to start twice")
            pend.pid = p.decode_u32(payload, "STARTED")
            pend.started.set()
        elif kind == Frame.EXIT:
            pend.status = p.decode_exit(payload)
            pend.done.set()
            pend.started.set()
        else:
            raise ProtocolViolation(f"{kind.name} frame answers a command")

    @staticmethod
    def _watch_frame(pend: Pending, kind: Frame, payload: bytes) -> None:
        if kind == Frame.STARTED and not pend.started.is_set():
            pend.pid = p.decode_u32(payload, "STARTED")  # the directories watched
            pend.started.set()
        elif kind == Frame.EVENT and pend.started.is_set():
            ev = p.decode_event(payload)
            if pend.on_event is not None:
                pend.on_event(ev)
            elif len(pend.events) < MAX_EVENTS_KEPT:
                pend.events.append(ev)
            else:
                pend.truncated = True
        elif kind == Frame.OK:
            pend.done.set()
            pend.started.set()
        else:
            raise ProtocolViolation(f"{kind.name} frame answers a watch")

    def _new(self, **kw) -> tuple[int, Pending]:
        with self._lock:
            ident = self._next_id
            self._next_id += 1
            pend = Pending(**kw)
            self._pending[ident] = pend
        return ident, pend

    def finish(self, ident: int) -> None:
        with self._lock:
            self._pending.pop(ident, None)

    def _check(self, pend: Pending) -> None:
        if self.violation is not None:
            raise self.violation
        if self._closed and pend.status is None and pend.error is None and not pend.payload:
            raise AgentGone("the guest agent is gone")

    @property
    def closed(self) -> bool:
        return self._closed

    # --- requests -----------------------------------------------------------------------------

    def request(self, kind: Frame, payload: bytes = b"", timeout: float | None = 30) -> bytes:
        """A request answered by OK or PONG; raises GuestError, AgentGone or AgentTimeout."""
        return self._answer(kind, payload, timeout).payload

    def _answer(self, kind: Frame, payload: bytes, timeout: float | None) -> Pending:
        ident, pend = self._new()
        try:
            self._send(kind, ident, payload, timeout)
            finished = pend.done.wait(timeout)
            self._check(pend)
            if not finished:
                raise AgentTimeout(f"the guest agent did not answer within {timeout} s")
            if pend.error:
                raise pend.error
            return pend
        except SendTimeout:
            raise AgentTimeout(f"the guest agent did not answer within {timeout} s") from None
        finally:
            self.finish(ident)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
