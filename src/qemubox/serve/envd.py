"""envd's Connect services, ``process.Process`` and ``filesystem.Filesystem``, over a served
sandbox's guest (``guests.Guest``): each RPC parsed from E2B's messages into one call of
qemubox's own model (``sandbox.processes``, ``sandbox.files``) and its answer made back
into E2B's messages. The Connect protocol itself (framing, codecs, errors, streams) is the
``connectrpc`` library's; the messages are generated from E2B's envd protos
(``serve/proto``).

Which sandbox a request is for, and whether it may reach it, the application in front
(``serve.app``) has decided from its headers before a service sees it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import secrets
import stat as statmod
from collections.abc import AsyncIterator, Callable

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.server import ConnectASGIApplication, Endpoint
from protobuf import Oneof
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from qemubox.errors import GuestError, InputError, QemuboxError
from qemubox.guest.protocol import Entry
from qemubox.serve.guests import Gone, Guest, Tracked, Watcher, Who
from qemubox.serve.proto import filesystem_pb as fs
from qemubox.serve.proto import process_pb as pr

KEEPALIVE = 50  # seconds between keepalive events on a quiet stream, unless the client says
MAX_MESSAGE = 4 << 20  # bytes of one request message
QUEUED_MAX = 64 << 20  # bytes of output waiting for a slow stream before it is dropped
MAX_WATCHERS = 32  # polling watchers per sandbox

_ERRNO_CODES = {
    errno.ENOENT: Code.NOT_FOUND,
    errno.ESRCH: Code.NOT_FOUND,
    errno.EEXIST: Code.ALREADY_EXISTS,
    errno.EACCES: Code.PERMISSION_DENIED,
    errno.EPERM: Code.PERMISSION_DENIED,
    errno.ENOTDIR: Code.INVALID_ARGUMENT,
    errno.EISDIR: Code.INVALID_ARGUMENT,
    errno.EINVAL: Code.INVALID_ARGUMENT,
    errno.ENOTEMPTY: Code.INVALID_ARGUMENT,
    errno.EBUSY: Code.FAILED_PRECONDITION,
    errno.ENOSPC: Code.RESOURCE_EXHAUSTED,
    errno.E2BIG: Code.RESOURCE_EXHAUSTED,
    errno.ENAMETOOLONG: Code.INVALID_ARGUMENT,
}


def not_found_message(sandbox_id: str) -> str:
    """What E2B's proxy says of a sandbox that does not run (the SDKs look for it)."""
    return f"The sandbox {sandbox_id} was not found"


def connect_error(err: BaseException, sandbox_id: str) -> ConnectError:
    if isinstance(err, ConnectError):
        return err
    if isinstance(err, Gone):
        return ConnectError(Code.UNAVAILABLE, not_found_message(sandbox_id))
    if isinstance(err, GuestError):
        return ConnectError(_ERRNO_CODES.get(err.errno or 0, Code.UNKNOWN), str(err))
    if isinstance(err, InputError | ValueError):
        return ConnectError(Code.INVALID_ARGUMENT, str(err))
    if isinstance(err, QemuboxError):
        return ConnectError(Code.INTERNAL, str(err))
    return ConnectError(Code.INTERNAL, f"internal error: {type(err).__name__}")


class Context:
    """What the application in front found for a request: the guest, and the user the
    request runs as (``Authorization: Basic`` with E2B's ``username:``; None: the default)."""

    def __init__(self, lookup: Callable[[str], Guest]) -> None:
        self._lookup = lookup

    def of(self, ctx) -> tuple[Guest, str | None]:
        headers = ctx.request_headers
        sandbox_id = headers.get("e2b-sandbox-id", "")
        try:
            guest = self._lookup(sandbox_id)
        except Gone:
            raise ConnectError(Code.UNAVAILABLE, not_found_message(sandbox_id)) from None
        return guest, user_of(headers.get("authorization"))


def user_of(authorization: str | None) -> str | None:
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except ValueError:
        raise ConnectError(Code.INVALID_ARGUMENT, "Authorization: not base64 'user:'") from None
    return decoded.partition(":")[0] or None


def resolve(path: str, who: Who) -> str:
    """A path as envd takes it: relative to the user's home, ``~`` being the home."""
    if path == "~" or path.startswith("~/"):
        path = who.home + path[1:]
    elif not path.startswith("/"):
        path = f"{who.home.rstrip('/')}/{path}"
    if len(path) > 4096 or "\0" in path:
        raise ConnectError(Code.INVALID_ARGUMENT, "path: at most 4096 bytes, no NUL")
    return path


async def call(guest: Guest, fn: Callable, *args):
    """``fn(*args)`` on a worker thread, its errors as Connect's."""
    try:
        return await asyncio.to_thread(fn, *args)
    except Exception as err:
        raise connect_error(err, guest.id) from None


class Listener:
    """A stream's end of a followed command: events queued from the connection's thread,
    taken here; keepalives while it is quiet."""

    def __init__(self, interval: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.interval = interval
        self.queued = 0
        self.dropped = False

    def __call__(self, event) -> None:  # on the connection's thread
        size = len(event[1]) if event[0] in ("stdout", "stderr", "pty") else 0
        if self.dropped:
            return
        if self.queued + size > QUEUED_MAX:  # said once, then this stream ends
            self.dropped = True
            event, size = ("dropped",), 0
        self.queued += size
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self) -> AsyncIterator[pr.ProcessEvent]:
        while True:
            try:
                event = await asyncio.wait_for(self.queue.get(), self.interval)
            except TimeoutError:
                yield pr.ProcessEvent(event=Oneof("keepalive", pr.ProcessEvent.KeepAlive()))
                continue
            kind = event[0]
            if kind in ("stdout", "stderr", "pty"):
                self.queued -= len(event[1])
                data = pr.ProcessEvent.DataEvent(output=Oneof(kind, event[1]))
                yield pr.ProcessEvent(event=Oneof("data", data))
                continue
            if kind == "end":
                yield pr.ProcessEvent(event=Oneof("end", end_event(*event[1:])))
                return
            if kind == "dropped":
                raise ConnectError(
                    Code.RESOURCE_EXHAUSTED,
                    f"over {QUEUED_MAX >> 20} MiB of output waited for this client: it runs "
                    "on; connect again to follow it",
                )


def end_event(code: int, signal: int | None, error: str | None) -> pr.ProcessEvent.EndEvent:
    if signal:
        names = {9: "killed", 15: "terminated", 2: "interrupt", 1: "hangup", 13: "broken pipe"}
        status = f"signal: {names.get(signal, signal)}"
        return pr.ProcessEvent.EndEvent(exit_code=-1, exited=False, status=status, error=error)
    if error is not None:
        return pr.ProcessEvent.EndEvent(exit_code=-1, exited=False, status=error, error=error)
    return pr.ProcessEvent.EndEvent(exit_code=code, exited=True, status=f"exit status {code}")


def keepalive_of(ctx) -> float:
    text = ctx.request_headers.get("keepalive-ping-interval", "")
    return float(text) if text.isdigit() and 1 <= int(text) <= 3600 else KEEPALIVE


def timeout_of(ctx) -> float | None:
    ms = ctx.timeout_ms
    return ms / 1000 if ms else None


def selector(sel: pr.ProcessSelector | None) -> tuple[int | None, str | None]:
    chosen = sel.selector if sel is not None else None
    if chosen is None:
        raise ConnectError(Code.INVALID_ARGUMENT, "process: a pid or a tag is needed")
    return (chosen.value, None) if chosen.field == "pid" else (None, chosen.value)


class ProcessService:
    def __init__(self, context: Context) -> None:
        self.context = context

    async def _found(self, ctx, sel) -> tuple[Guest, Tracked]:
        guest, _ = self.context.of(ctx)
        pid, tag = selector(sel)
        return guest, await call(guest, guest.find, pid, tag)

    async def start(self, request: pr.StartRequest, ctx) -> AsyncIterator[pr.StartResponse]:
        guest, user = self.context.of(ctx)
        p = request.process
        if p is None or not p.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd: a command is needed")
        config = {"cmd": p.cmd, "args": list(p.args), "envs": dict(p.envs)}
        if p.has_field("cwd"):
            config["cwd"] = p.cwd
        tty = None
        if request.has_field("pty") and request.pty is not None:
            size = request.pty.size
            tty = (size.rows, size.cols) if size is not None else (24, 80)
        stdin = request.stdin if request.has_field("stdin") else True
        tag = request.tag if request.has_field("tag") else None
        listen = Listener(keepalive_of(ctx))
        who = await call(guest, guest.who, user)
        if "cwd" in config:
            config["cwd"] = resolve(config["cwd"], who)
        tracked = await call(
            guest, guest.start, config, tag, who, tty, stdin, listen, timeout_of(ctx)
        )
        start = pr.ProcessEvent.StartEvent(pid=tracked.pid)
        yield pr.StartResponse(event=pr.ProcessEvent(event=Oneof("start", start)))
        try:
            async for event in listen.events():
                yield pr.StartResponse(event=event)
        finally:
            tracked.unsubscribe(listen)

    async def connect(self, request: pr.ConnectRequest, ctx) -> AsyncIterator[pr.ConnectResponse]:
        _, tracked = await self._found(ctx, request.process)
        listen = Listener(keepalive_of(ctx))
        start = pr.ProcessEvent.StartEvent(pid=tracked.pid)
        yield pr.ConnectResponse(event=pr.ProcessEvent(event=Oneof("start", start)))
        tracked.subscribe(listen)
        try:
            async for event in listen.events():
                yield pr.ConnectResponse(event=event)
        finally:
            tracked.unsubscribe(listen)

    async def list(self, request: pr.ListRequest, ctx) -> pr.ListResponse:
        guest, _ = self.context.of(ctx)
        found = await call(guest, guest.kept)
        infos = []
        for pid, config, tag, _tty in found:
            kw = {"cwd": config["cwd"]} if config.get("cwd") else {}
            proc = pr.ProcessConfig(
                cmd=str(config.get("cmd", "")),
                args=[str(a) for a in config.get("args", [])],
                envs={str(k): str(v) for k, v in dict(config.get("envs", {})).items()},
                **kw,
            )
            info = pr.ProcessInfo(config=proc, pid=pid, **({"tag": tag} if tag else {}))
            infos.append(info)
        return pr.ListResponse(processes=infos)

    async def _input(self, guest: Guest, tracked: Tracked, data: pr.ProcessInput | None):
        chosen = data.input if data is not None else None
        if chosen is None:
            return
        process = tracked.process
        assert process is not None
        await call(guest, process.write_stdin, chosen.value)

    async def send_input(self, request: pr.SendInputRequest, ctx) -> pr.SendInputResponse:
        guest, tracked = await self._found(ctx, request.process)
        await self._input(guest, tracked, request.input)
        return pr.SendInputResponse()

    async def stream_input(self, requests, ctx) -> pr.StreamInputResponse:
        found: tuple[Guest, Tracked] | None = None
        async for message in requests:
            event = message.event
            if event is None or event.field == "keepalive":
                continue
            if event.field == "start":
                found = await self._found(ctx, event.value.process)
            elif found is None:
                raise ConnectError(Code.INVALID_ARGUMENT, "input came before the start event")
            else:
                await self._input(*found, event.value.input)
        return pr.StreamInputResponse()

    async def send_signal(self, request: pr.SendSignalRequest, ctx) -> pr.SendSignalResponse:
        guest, tracked = await self._found(ctx, request.process)
        signo = {pr.Signal.SIGKILL: 9, pr.Signal.SIGTERM: 15}.get(request.signal)
        if signo is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "signal: SIGKILL or SIGTERM")
        assert tracked.process is not None
        await call(guest, tracked.process.signal, signo)
        return pr.SendSignalResponse()

    async def close_stdin(self, request: pr.CloseStdinRequest, ctx) -> pr.CloseStdinResponse:
        guest, tracked = await self._found(ctx, request.process)
        if tracked.tty:
            raise ConnectError(Code.FAILED_PRECONDITION, "a terminal's stdin is not closed")
        assert tracked.process is not None
        await call(guest, tracked.process.close_stdin)
        return pr.CloseStdinResponse()

    async def update(self, request: pr.UpdateRequest, ctx) -> pr.UpdateResponse:
        guest, tracked = await self._found(ctx, request.process)
        pty = request.pty if request.has_field("pty") else None
        if pty is not None and pty.size is not None:
            if not tracked.tty:
                raise ConnectError(Code.FAILED_PRECONDITION, "the process has no terminal")
            assert tracked.process is not None
            await call(guest, tracked.process.resize, pty.size.rows, pty.size.cols)
        return pr.UpdateResponse()


# --- files ----------------------------------------------------------------------------------


def permissions(mode: int) -> str:
    return statmod.filemode(mode)


def entry_info(entry: Entry, names: tuple[dict[int, str], dict[int, str]]) -> fs.EntryInfo:
    kinds = {"file": fs.FileType.FILE, "dir": fs.FileType.DIRECTORY}
    kinds["symlink"] = fs.FileType.SYMLINK
    users, groups = names
    kw = {"symlink_target": entry.target} if entry.kind == "symlink" else {}
    return fs.EntryInfo(
        name=entry.name,
        type=kinds.get(entry.kind, fs.FileType.UNSPECIFIED),
        path=entry.path,
        size=entry.size,
        mode=statmod.S_IMODE(entry.mode),
        permissions=permissions(entry.mode),
        owner=users.get(entry.uid, str(entry.uid)),
        group=groups.get(entry.gid, str(entry.gid)),
        modified_time=Timestamp(
            seconds=entry.mtime_ns // 1_000_000_000, nanos=entry.mtime_ns % 1_000_000_000
        ),
        **kw,
    )


def fs_event(event, root: str) -> fs.FilesystemEvent:
    name = event.path
    prefix = root.rstrip("/") + "/"
    if name.startswith(prefix):
        name = name[len(prefix) :]
    return fs.FilesystemEvent(name=name, type=fs.EventType(int(event.kind)))


class FilesystemService:
    def __init__(self, context: Context) -> None:
        self.context = context

    async def _op(self, ctx, path: str, what: Callable) -> tuple[Guest, list]:
        guest, user = self.context.of(ctx)
        who = await call(guest, guest.who, user)
        full = resolve(path, who)
        return guest, await call(guest, lambda: what(guest, full, who))

    async def _info(self, guest: Guest, entry: Entry) -> fs.EntryInfo:
        return entry_info(entry, await call(guest, guest.names))

    async def stat(self, request: fs.StatRequest, ctx) -> fs.StatResponse:
        guest, entry = await self._op(
            ctx, request.path, lambda g, p, w: g.call(lambda b: b.files.stat(p, w.ids))
        )
        return fs.StatResponse(entry=await self._info(guest, entry))

    async def make_dir(self, request: fs.MakeDirRequest, ctx) -> fs.MakeDirResponse:
        guest, entry = await self._op(
            ctx, request.path, lambda g, p, w: g.call(lambda b: b.files.make_dir(p, w.ids))
        )
        return fs.MakeDirResponse(entry=await self._info(guest, entry))

    async def move(self, request: fs.MoveRequest, ctx) -> fs.MoveResponse:
        guest, user = self.context.of(ctx)
        who = await call(guest, guest.who, user)
        src, dst = resolve(request.source, who), resolve(request.destination, who)
        entry = await call(guest, guest.call, lambda b: b.files.rename(src, dst, who.ids))
        return fs.MoveResponse(entry=await self._info(guest, entry))

    async def list_dir(self, request: fs.ListDirRequest, ctx) -> fs.ListDirResponse:
        depth = request.depth or 1
        if depth > 64:
            raise ConnectError(Code.INVALID_ARGUMENT, f"depth: {depth}, at most 64")
        guest, entries = await self._op(
            ctx, request.path, lambda g, p, w: g.call(lambda b: b.files.list(p, depth, w.ids))
        )
        names = await call(guest, guest.names)
        return fs.ListDirResponse(entries=[entry_info(e, names) for e in entries])

    async def remove(self, request: fs.RemoveRequest, ctx) -> fs.RemoveResponse:
        await self._op(
            ctx, request.path, lambda g, p, w: g.call(lambda b: b.files.remove(p, w.ids))
        )
        return fs.RemoveResponse()

    async def watch_dir(self, request: fs.WatchDirRequest, ctx) -> AsyncIterator:
        guest, user = self.context.of(ctx)
        who = await call(guest, guest.who, user)
        root = resolve(request.path, who)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        watch = await call(
            guest, guest.call, lambda b: b.files.watch(root, request.recursive, on_event)
        )
        interval = keepalive_of(ctx)
        try:
            start = fs.WatchDirResponse.StartEvent()
            yield fs.WatchDirResponse(event=Oneof("start", start))
            quiet = 0.0
            while watch.active or not queue.empty():
                try:
                    event = await asyncio.wait_for(queue.get(), 1)
                except TimeoutError:
                    quiet += 1
                    if quiet >= interval:
                        quiet = 0
                        alive = fs.WatchDirResponse.KeepAlive()
                        yield fs.WatchDirResponse(event=Oneof("keepalive", alive))
                    continue
                quiet = 0
                yield fs.WatchDirResponse(event=Oneof("filesystem", fs_event(event, root)))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(watch.stop)

    async def create_watcher(self, request: fs.CreateWatcherRequest, ctx):
        guest, user = self.context.of(ctx)
        who = await call(guest, guest.who, user)
        root = resolve(request.path, who)
        if len(guest.watchers) >= MAX_WATCHERS:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, f"at most {MAX_WATCHERS} watchers")
        watcher = await call(guest, Watcher, guest, root, request.recursive)
        watcher_id = secrets.token_hex(8)
        guest.watchers[watcher_id] = watcher
        return fs.CreateWatcherResponse(watcher_id=watcher_id)

    async def get_watcher_events(self, request: fs.GetWatcherEventsRequest, ctx):
        guest, _ = self.context.of(ctx)
        watcher = guest.watchers.get(request.watcher_id)
        if watcher is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher {request.watcher_id!r} not found")
        events = [fs_event(e, watcher.root) for e in watcher.take()]
        return fs.GetWatcherEventsResponse(events=events)

    async def remove_watcher(self, request: fs.RemoveWatcherRequest, ctx):
        guest, _ = self.context.of(ctx)
        watcher = guest.watchers.pop(request.watcher_id, None)
        if watcher is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher {request.watcher_id!r} not found")
        await asyncio.to_thread(watcher.stop)
        return fs.RemoveWatcherResponse()


# --- binding -----------------------------------------------------------------------------------


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


class Service(ConnectASGIApplication):
    """One of envd's services as a Connect ASGI application: every method of the service's
    descriptor bound to the implementation's method of the same (snake_case) name."""

    def __init__(self, pb_module, service_name: str, impl) -> None:
        desc = next(s for s in pb_module.desc().services if s.type_name == service_name)
        self._path = f"/{service_name}"
        kinds = {
            "unary": Endpoint.unary,
            "server_streaming": Endpoint.server_stream,
            "client_streaming": Endpoint.client_stream,
        }

        def endpoints(svc) -> dict:
            table = {}
            for m in desc.methods:
                info = MethodInfo(
                    name=m.name,
                    service_name=service_name,
                    input=getattr(pb_module, m.input.name),
                    output=getattr(pb_module, m.output.name),
                    idempotency_level=IdempotencyLevel.UNKNOWN,
                )
                bind = kinds[str(m.method_kind)]
                table[f"/{service_name}/{m.name}"] = bind(
                    method=info, function=getattr(svc, _snake(m.name))
                )
            return table

        super().__init__(service=impl, endpoints=endpoints, read_max_bytes=MAX_MESSAGE)

    @property
    def path(self) -> str:
        return self._path
