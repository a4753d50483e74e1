"""A sandbox's ports other than envd's: an HTTP request for port P of a sandbox (E2B's
``P-ID.DOMAIN`` host, or the ``E2b-Sandbox-Port`` header) is relayed to 127.0.0.1:P inside
its guest — through the agent, with qemubox's own busybox ``nc`` as a command whose stdin
and stdout are the connection. No guest network is needed for it, and a service that
listens on the guest's loopback only is reached as well as one on every address.

One connection per request (``Connection: close``): the request is written with h11 as it
is read from the client, the response parsed with h11 and streamed back as it comes. What
the client has not taken yet is bounded (a client that reads too slowly loses its
response, not the server its memory); a client that goes away ends the relay."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Iterable

import h11

from qemubox.errors import QemuboxError
from qemubox.guest.protocol import GUEST_BUSYBOX
from qemubox.serve.control import error
from qemubox.serve.envd import not_found_message
from qemubox.serve.guests import Gone, Guest

MAX_BUFFERED = 16 << 20  # bytes of a response read from the guest, not yet sent on
MAX_NC_ERROR = 4096  # bytes of what nc says, kept for the error
# Headers of one connection, not of the request or response it carries (RFC 9110 7.6.1),
# and those that address the sandbox here: not passed on.
_NOT_PASSED = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"e2b-sandbox-id",
    b"e2b-sandbox-port",
    b"e2b-traffic-access-token",
}


def closed_message(sandbox_id: str, port: int | str) -> str:
    """What E2B's proxy says of a port nothing listens on."""
    return f"The sandbox {sandbox_id} is running but port {port} is not open"


def relay_argv(port: int) -> list[str]:
    return [GUEST_BUSYBOX, "nc", "127.0.0.1", str(port)]


def parse_port(text: str) -> int | None:
    """A TCP port from its decimal text; None when it is not one."""
    if not text.isdigit() or len(text) > 5 or not 1 <= int(text) <= 65535:
        return None
    return int(text)


def request_of(scope) -> h11.Request:
    """The request to send on: the client's method, target and headers, less those of its
    connection; its body framed anew (chunked when the client gave no length)."""
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _NOT_PASSED]
    names = {k.lower() for k, _ in headers}
    if b"content-length" not in names and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
        headers.append((b"transfer-encoding", b"chunked"))
    if b"host" not in names:
        headers.append((b"host", b"localhost"))
    headers.append((b"connection", b"close"))
    return h11.Request(method=scope["method"], target=target, headers=headers)


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A response's headers as the client gets them: its connection's left out (the
    server frames the body for its own connection)."""
    return [(k, v) for k, v in headers if k.lower() not in _NOT_PASSED]


class _Closed(Exception):
    """The relay ended with no response: nothing listens on the port, or its service
    closed the connection without a word."""


_CLIENT_GONE = object()  # queued when the client disconnects


async def relay(guest: Guest, port: int, scope, receive, send) -> None:
    """Answer one HTTP request with what the guest's service on ``port`` answers; a port
    nothing listens on is E2B's 502."""
    await _Relay(guest, port, scope, receive, send).run()


class _Relay:
    def __init__(self, guest: Guest, port: int, scope, receive, send) -> None:
        self.guest, self.port = guest, port
        self.scope, self.receive, self.send = scope, receive, send
        self.loop = asyncio.get_running_loop()
        self.incoming: asyncio.Queue = asyncio.Queue()  # bytes; None at nc's end
        self.buffered = 0
        self.got_any = False
        self.started = False  # the response's head was sent on
        self.said: list[bytes] = []  # nc's stderr
        self.connection = h11.Connection(h11.CLIENT)
        self.process = None
        self.answering: asyncio.Future | None = None
        self.too_slow = False  # its client left more than MAX_BUFFERED untaken

    async def _error(self, status: int, message: str, **fields) -> None:
        response = error(status, message, sandboxId=self.guest.id, **fields)
        await response(self.scope, self.receive, self.send)

    def _start(self, box):
        def on_stdout(data: bytes) -> None:  # on the agent's reader thread
            self.loop.call_soon_threadsafe(self._arrived, data)

        def on_stderr(data: bytes) -> None:
            if sum(map(len, self.said)) < MAX_NC_ERROR:
                self.said.append(data)

        return box.processes.start(
            relay_argv(self.port), stdin=True, on_stdout=on_stdout, on_stderr=on_stderr
        )

    def _arrived(self, data: bytes) -> None:
        self.buffered += len(data)
        self.incoming.put_nowait(data)
        if self.buffered > MAX_BUFFERED and not self.too_slow and self.answering is not None:
            self.too_slow = True  # the answer waits on the client: it is stopped, not awaited
            self.answering.cancel()

    async def run(self) -> None:
        try:
            self.process = await asyncio.to_thread(self.guest.call, self._start)
        except Gone:
            await self._error(502, not_found_message(self.guest.id))
            return
        except QemuboxError as err:  # the guest's commands at their bound (64 at once)
            await self._error(503, f"port {self.port}: no connection relayed now: {err}")
            return
        # nc's end, waited for on a thread of its own (a relay may be held open for long:
        # none of the worker threads creates and envd calls need is held by it)
        threading.Thread(target=self._wait_end, name="relay-end", daemon=True).start()
        sender = asyncio.ensure_future(self._send_request())
        self.answering = asyncio.ensure_future(self._answer())
        try:
            await self.answering
        except asyncio.CancelledError:
            if not self.too_slow:
                raise
            self._cut("its client took it too slowly")
        except _Closed:
            said = b"".join(self.said).decode(errors="replace")
            if "can't connect" in said or not said:
                await self._error(502, closed_message(self.guest.id, self.port), port=self.port)
            else:
                why = f"the sandbox's service on port {self.port} answered nothing: {said.strip()}"
                await self._error(502, why[:500], port=self.port)
        except h11.RemoteProtocolError as err:
            if self.started:
                self._cut(str(err))
            else:
                why = f"the sandbox's service on port {self.port} gave no HTTP response: {err}"
                await self._error(502, why[:500], port=self.port)
        finally:
            sender.cancel()
            if self.process.running:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.process.signal, signal.SIGKILL)

    def _cut(self, why: str) -> None:
        """A response that cannot be passed on whole (its service broke off, or its client
        reads too slowly): left unfinished, so that the server drops the client's connection
        rather than end the response as if it were complete; one line for the operator."""
        where = f"sandbox {self.guest.id} port {self.port}"
        print(f"qemubox serve: {where}: a response cut short: {why}", file=sys.stderr)

    def _wait_end(self) -> None:
        with contextlib.suppress(Exception):  # a broken connection ends it as well
            self.process.wait()
        with contextlib.suppress(RuntimeError):  # the server's loop closed meanwhile
            self.loop.call_soon_threadsafe(self.incoming.put_nowait, None)  # after its output

    async def _answer(self) -> None:
        """Pass the response on as it comes, until its end."""
        c = self.connection
        while True:
            data = await self.incoming.get()
            if data is _CLIENT_GONE:
                return
            if data is None and not self.got_any:
                raise _Closed
            if data is not None:
                self.got_any = True
                self.buffered -= len(data)
            c.receive_data(data or b"")
            while (event := c.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Response):
                    headers = response_headers(event.headers.raw_items())
                    start = {"type": "http.response.start", "status": event.status_code}
                    await self.send(start | {"headers": headers})
                    self.started = True
                elif isinstance(event, h11.Data):
                    await self.send(
                        {"type": "http.response.body", "body": bytes(event.data), "more_body": True}
                    )
                elif isinstance(event, h11.EndOfMessage):
                    await self.send({"type": "http.response.body", "body": b""})
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    raise h11.RemoteProtocolError("the connection closed mid-response")
                # an informational response (100 Continue): the client's server said its own

    async def _send_request(self) -> None:
        """Write the client's request to the guest's service as it is read; then wait for
        the client to go away (which ends the relay, answered or not). A write that fails
        (nc ended: the service closed its end) ends the sending only: what the service
        answered still comes."""
        c, process = self.connection, self.process
        assert process is not None

        async def write(data: bytes) -> bool:
            try:
                return await asyncio.to_thread(process.write_stdin, data)
            except Exception:  # the connection to the guest broke: its end says so
                return False

        writing = await write(c.send(request_of(self.scope)))
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.incoming.put_nowait(_CLIENT_GONE)
                return
            body = message.get("body", b"")
            if writing and body:
                writing = await write(c.send(h11.Data(data=body)))
            if not message.get("more_body", False):
                break
        if writing and (end := c.send(h11.EndOfMessage())):
            await write(end)
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.incoming.put_nowait(_CLIENT_GONE)
