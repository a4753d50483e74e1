"""qemubox's egress proxy: one per machine with egress rules, started before its QEMU by the
keeper (``python -m qemubox.egress DIR LOG``) and gone with it.

QEMU's preloaded shim (``shim.c``) hands it every TCP connection the guest opens, with the
destination, over ``DIR/egress.sock``; it answers at once (allowed or refused, by the rules
in ``DIR/egress.json``, read again whenever that file changes), connects to the pinned
address, and holds the guest's first bytes until their TLS server name or HTTP Host agrees
with the name the guest resolved. Its resolver answers the guest's DNS (see ``names.py``).
Every decision is a JSON line in LOG: time, what, name, address, port, verdict, rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import struct
import sys
from datetime import UTC, datetime
from pathlib import Path

from qemubox.egress import RULES
from qemubox.egress import names as dnsnames
from qemubox.egress.sniff import MAX_HEAD, sniff
from qemubox.model.egress import Address, Egress, Verdict, address

LOG_KEEP = 16 << 20  # the log is rotated to LOG.1 past this size
CONNECT_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 5.0
CHUNK = 256 << 10
MAX_CONNECTIONS = 1024  # carried at once; more are refused
MAX_QUERIES = 256  # DNS queries in flight; more are dropped (the guest asks again)
MSG = struct.Struct("!BBH16s")  # kind, family (4 or 6), port, address
CONNECT, DATAGRAM = 1, 2


class Log:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, what: str, name: str | None, addr, port, verdict: Verdict) -> None:
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "what": what,
            "name": name,
            "address": str(addr) if addr is not None else None,
            "port": port,
            "verdict": "allowed" if verdict else "refused",
            "rule": verdict.rule,
        }
        with contextlib.suppress(OSError):
            if self.path.exists() and self.path.stat().st_size > LOG_KEEP:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")


class Proxy:
    def __init__(self, directory: Path, log: Path) -> None:
        self.dir = directory
        self.log = Log(log)
        self.names = dnsnames.Names()
        self._rules: Egress | None = None
        self._seen: tuple[int, int] | None = None
        self.connections: set[asyncio.Task] = set()
        self.queries: set[asyncio.Task] = set()

    def spawn(self, tasks: set[asyncio.Task], work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def rules(self) -> Egress:
        """The rules now in force: the file's, read again when it changed (a file that
        does not parse leaves the rules as they were)."""
        path = self.dir / RULES
        with contextlib.suppress(OSError):
            st = path.stat()
            if (st.st_mtime_ns, st.st_size) != self._seen:
                try:
                    self._rules = Egress.from_dict(json.loads(path.read_text()))
                    self._seen = (st.st_mtime_ns, st.st_size)
                except Exception as err:  # a bad file: keep what was in force
                    print(f"egress: {path}: {err}", file=sys.stderr)
        if self._rules is None:
            raise SystemExit(f"egress: no rules in {path}")
        return self._rules

    # --- DNS --------------------------------------------------------------------------------

    async def resolve(self, name: str) -> tuple[Address, ...]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT
            )
        except (TimeoutError, OSError, UnicodeError):
            return ()
        return tuple(dict.fromkeys(address(info[4][0].split("%")[0]) for info in infos))

    async def dns(self, transport: asyncio.DatagramTransport, data: bytes, peer) -> None:
        found = await dnsnames.answer(data, self.rules(), self.names, self.resolve)
        if found is None:
            return
        if found.verdict is not None:
            shown = ",".join(found.addresses) or None
            self.log.write("resolve", found.name, shown, 53, found.verdict)
        transport.sendto(found.wire, peer)

    # --- connections ------------------------------------------------------------------------

    def decide(self, addr: Address, port: int) -> tuple[str | None, list[Address], Verdict]:
        """Where a guest's connection to ``addr``:``port`` may go: the name it was resolved
        from (a pool address), the addresses to try, and the verdict."""
        rules = self.rules()
        if addr in dnsnames.POOL:
            name = self.names.name_of(addr)
            if name is None:
                return None, [], Verdict(False, "a pool address the resolver never gave")
            allowed, rule = dnsnames.targets(rules, name, self.names.resolved(name))
            return name, allowed, Verdict(bool(allowed), rule)
        verdict = rules.address_verdict(addr)
        return None, [addr] if verdict else [], verdict

    def handed(self, data: bytes, fds: list[int]) -> None:
        """A message from the shim: a connection (with its socket) or a refused datagram."""
        if len(data) != MSG.size:
            for fd in fds:
                os.close(fd)
            return
        kind, family, port, raw = MSG.unpack(data)
        if family not in (4, 6) or kind not in (CONNECT, DATAGRAM):
            for fd in fds:
                os.close(fd)
            return
        addr = address(str(ipaddress.ip_address(raw[:4] if family == 4 else raw)))
        if kind == DATAGRAM or not fds:
            self.log.write("datagram", None, addr, port, Verdict(False, "only DNS datagrams"))
            return
        for extra in fds[1:]:
            os.close(extra)
        guest = socket.socket(fileno=fds[0])
        name, targets, verdict = self.decide(addr, port)
        if verdict and len(self.connections) >= MAX_CONNECTIONS:
            verdict = Verdict(False, f"{MAX_CONNECTIONS} connections open already")
        shown = ",".join(str(t) for t in targets) if targets else addr
        self.log.write("connect", name, shown, port, verdict)
        if not verdict:
            guest.close()
            return
        guest.setblocking(False)
        try:
            guest.send(b"\x01")
        except OSError:
            guest.close()
            return
        self.spawn(self.connections, self.carry(guest, name, targets, port))

    async def carry(self, guest: socket.socket, name: str | None, targets, port: int) -> None:
        g_reader, g_writer = await asyncio.open_connection(sock=guest, limit=CHUNK)
        upstream = None
        for target in targets:
            try:
                upstream = await asyncio.wait_for(
                    asyncio.open_connection(str(target), port, limit=CHUNK), CONNECT_TIMEOUT
                )
                break
            except (TimeoutError, OSError):
                continue
        if upstream is None:
            why = f"no answer from {','.join(map(str, targets))} in {CONNECT_TIMEOUT:g} s"
            self.log.write("unreachable", name, targets[0], port, Verdict(True, why))
            g_writer.close()
            return
        u_reader, u_writer = upstream
        down = asyncio.create_task(_pump(u_reader, g_writer))
        try:
            head = await self._head(g_reader)
            found = sniff(head)
            if name is not None and found.name is not None and found.name != name:
                why = f"{found.protocol} asks for {found.name}, not {name}"
                self.log.write("connect", name, targets[0], port, Verdict(False, why))
                return
            if head:
                u_writer.write(head)
                await _pump(g_reader, u_writer)
            else:
                with contextlib.suppress(OSError):
                    u_writer.write_eof()
            await down
        except OSError:
            pass
        finally:
            down.cancel()
            for w in (g_writer, u_writer):
                w.close()

    async def _head(self, reader: asyncio.StreamReader) -> bytes:
        """The guest's first bytes, as many as it takes to know what they ask for."""
        head = b""
        while True:
            chunk = await reader.read(MAX_HEAD - len(head))
            head += chunk
            if not chunk or sniff(head).complete or len(head) >= MAX_HEAD:
                return head

    # --- the control socket -----------------------------------------------------------------

    async def serve(self, listener: socket.socket) -> None:
        """Serve the QEMU that connects to ``listener`` (the control socket), until it
        goes."""
        loop = asyncio.get_running_loop()
        dns4, _ = await loop.create_datagram_endpoint(
            lambda: _Resolver(self), local_addr=("127.0.0.1", 0)
        )
        ports = [dns4.get_extra_info("sockname")[1], 0]
        with contextlib.suppress(OSError):
            dns6, _ = await loop.create_datagram_endpoint(
                lambda: _Resolver(self), local_addr=("::1", 0)
            )
            ports[1] = dns6.get_extra_info("sockname")[1]
        self.rules()  # no rules, no proxy
        listener.setblocking(False)
        conn, _ = await loop.sock_accept(listener)
        listener.close()  # one QEMU: the proxy ends with it
        conn.setblocking(False)
        conn.send(struct.pack("!HH", *ports))
        done = loop.create_future()
        loop.add_reader(conn.fileno(), self._readable, conn, done)
        await done

    def _readable(self, conn: socket.socket, done: asyncio.Future) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(conn, MSG.size, 4)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                asyncio.get_running_loop().remove_reader(conn.fileno())
                if not done.done():
                    done.set_result(None)
                return
            self.handed(data, fds)


class _Resolver(asyncio.DatagramProtocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        busy = len(self.proxy.queries) >= MAX_QUERIES
        if len(data) <= 4096 and self.transport is not None and not busy:
            self.proxy.spawn(self.proxy.queries, self.proxy.dns(self.transport, data, addr))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(CHUNK):
        writer.write(chunk)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


def main(directory: Path, log: Path, listener: socket.socket) -> int:
    """Run the proxy of the machine in ``directory`` (see ``__main__.py``)."""
    proxy = Proxy(directory, log)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(proxy.serve(listener))
    return 0
