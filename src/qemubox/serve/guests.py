"""A served sandbox's guest as the server holds it: one agent connection (attached when first
needed, again after it broke), the users it looked up, the commands it follows and their
subscribers, the polling watchers. Everything here blocks: the envd handlers call it from
worker threads; output and ends reach them through subscriber callbacks.

Every command started through envd is a kept command (its note: E2B's process config and
tag, as JSON): it outlives the request that started it, the client that follows it and a
restart of the server; it ends on its own, by a signal, or at its deadline (the request's
``connect-timeout-ms``), never because a client went away."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qemubox.errors import GuestError, InputError, QemuboxError
from qemubox.sandbox import named
from qemubox.sandbox.processes import Process
from qemubox.serve.model import DEFAULT_USER, Served

MAX_NOTE = 60000  # bytes of a kept command's note (the agent takes 64 KiB)
MAX_EVENTS = 10000  # a polling watcher's events kept between two polls

Event = tuple  # ("start", pid) | ("stdout"|"stderr"|"pty", bytes) | ("end", code, signal, error)


class Gone(Exception):
    """The sandbox does not run (killed, expired, paused, or its VM died)."""


@dataclass
class Who:
    ids: tuple[int, int, tuple[int, ...]] | None  # None: root
    home: str
    name: str


@dataclass
class Tracked:
    """A kept command this server follows, and who listens to it."""

    pid: int
    config: dict  # E2B's ProcessConfig, as JSON (cmd, args, envs, cwd)
    tag: str | None
    tty: bool
    process: Process | None = None
    subscribers: list[Callable[[Event], None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: Event | None = None
    timer: threading.Timer | None = None

    def emit(self, event: Event) -> None:
        with self.lock:
            if event[0] == "end":
                self.ended = event
            listeners = list(self.subscribers)
        for listen in listeners:
            listen(event)

    def subscribe(self, listen: Callable[[Event], None]) -> bool:
        """Add a listener; False when the command has ended already (it is told so)."""
        with self.lock:
            ended = self.ended
            if ended is None:
                self.subscribers.append(listen)
                return True
        listen(ended)
        return False

    def unsubscribe(self, listen: Callable[[Event], None]) -> None:
        with self.lock, contextlib.suppress(ValueError):
            self.subscribers.remove(listen)


def note_of(config: dict, tag: str | None) -> bytes:
    data = json.dumps({"config": config, "tag": tag}, separators=(",", ":")).encode()
    if len(data) > MAX_NOTE:  # its environment told in part: the command runs with all of it
        data = json.dumps({"config": {**config, "envs": {}}, "tag": tag}).encode()
    return data[:MAX_NOTE]


def parse_note(note: bytes) -> tuple[dict, str | None]:
    try:
        data = json.loads(note)
        return dict(data["config"]), data.get("tag")
    except (ValueError, KeyError, TypeError):
        return {"cmd": note.decode(errors="replace")[:200], "args": [], "envs": {}}, None


class Guest:
    def __init__(self, served: Served) -> None:
        self.served = served
        self.id = served.id
        self._box = None
        self._lock = threading.RLock()
        self._users: dict[str, Who] = {}
        self._names: tuple[dict[int, str], dict[int, str]] | None = None
        self.tracked: dict[int, Tracked] = {}
        self.watchers: dict[str, Watcher] = {}

    # --- the connection ---------------------------------------------------------------------

    def box(self):
        with self._lock:
            box = self._box
            if box is not None and box.machine is not None and box.machine.alive():
                return box
            self._box = None
            try:
                self._box = named.attach(self.id, timeout=30)
            except (QemuboxError, OSError) as err:
                raise Gone(str(err)) from None
            return self._box

    def broken(self) -> None:
        """The connection failed: the next call attaches again (or finds the VM gone)."""
        with self._lock:
            box, self._box = self._box, None
        if box is not None:
            with contextlib.suppress(Exception):
                box.detach()

    def close(self) -> None:
        """Let go of the guest (it runs on): commands, watchers, the connection."""
        for watcher in list(self.watchers.values()):
            watcher.stop()
        self.watchers.clear()
        for tracked in list(self.tracked.values()):
            if tracked.timer is not None:
                tracked.timer.cancel()
        self.tracked.clear()
        self.broken()

    def call(self, fn: Callable, *args, **kw):
        """``fn(box, ...)`` with the guest attached; a dead VM is :class:`Gone`."""
        box = self.box()
        try:
            return fn(box, *args, **kw)
        except GuestError:
            raise
        except InputError:
            raise
        except QemuboxError as err:
            self.broken()
            if not named.is_running(self.id):
                raise Gone(str(err)) from None
            raise

    # --- users ------------------------------------------------------------------------------

    def who(self, user: str | None) -> Who:
        """``user`` (None: E2B's default, ``user``, or root where the image has no such
        account) as ids and home; an unknown name is an InputError."""
        name = user or DEFAULT_USER
        with self._lock:
            if name in self._users:
                return self._users[name]
        if name == "root":
            who = Who(None, "/root", "root")
        else:
            try:
                identity = self.call(lambda box: box.identity(name))
            except InputError:
                if user is None:  # an image without E2B's user: its commands run as root
                    return self.who("root")
                raise
            who = Who(identity.to_tuple(), identity.home or "/", name)
        with self._lock:
            self._users[name] = who
        return who

    def names(self) -> tuple[dict[int, str], dict[int, str]]:
        """The guest's user and group names by id (read once)."""
        with self._lock:
            if self._names is not None:
                return self._names
        passwd, group = self.call(lambda box: box.accounts())
        found = []
        for text in (passwd, group):
            table = {}
            for line in text.splitlines():
                fields = line.split(":")
                if len(fields) > 2 and fields[2].isdigit():
                    table.setdefault(int(fields[2]), fields[0])
            found.append(table)
        with self._lock:
            self._names = (found[0], found[1])
        return self._names

    # --- commands ---------------------------------------------------------------------------

    def start(
        self,
        config: dict,
        tag: str | None,
        who: Who,
        tty: tuple[int, int] | None,
        stdin: bool,
        listen: Callable[[Event], None],
        timeout_s: float | None,
    ) -> Tracked:
        argv = [config["cmd"], *config.get("args", [])]
        env = {"HOME": who.home, "USER": who.name, "LOGNAME": who.name}
        env |= self.served.env | config.get("envs", {})
        cwd = config.get("cwd") or who.home
        tracked = Tracked(0, config, tag, tty is not None, subscribers=[listen])

        def output(kind: str) -> Callable[[bytes], None]:
            return lambda data: tracked.emit((kind, data))

        process = self.call(
            lambda box: box.processes.start(
                argv, env, cwd, who.ids, tty, stdin, note_of(config, tag),
                output("pty" if tty else "stdout"), output("stderr"),
            )
        )  # fmt: skip
        tracked.pid, tracked.process = process.pid, process
        self._follow(tracked, timeout_s)
        return tracked

    def _follow(self, tracked: Tracked, timeout_s: float | None) -> None:
        self.tracked[tracked.pid] = tracked
        if timeout_s:
            tracked.timer = threading.Timer(timeout_s, self._expire, (tracked,))
            tracked.timer.daemon = True
            tracked.timer.start()
        threading.Thread(target=self._wait, args=(tracked,), daemon=True).start()

    def _expire(self, tracked: Tracked) -> None:
        with contextlib.suppress(Exception):
            if tracked.process is not None and tracked.process.running:
                tracked.process.kill()

    def _wait(self, tracked: Tracked) -> None:
        assert tracked.process is not None
        try:
            result = tracked.process.wait()
            assert result is not None
            end = ("end", result.exit_code, result.signal, None)
        except GuestError as err:  # another client took it over
            end = ("end", -1, None, str(err))
        except Exception as err:  # the connection broke: the VM died or was paused
            end = ("end", -1, None, f"the sandbox's connection ended: {err}")
        if tracked.timer is not None:
            tracked.timer.cancel()
        if self.tracked.get(tracked.pid) is tracked:
            del self.tracked[tracked.pid]
        tracked.emit(end)

    def kept(self) -> list[tuple[int, dict, str | None, bool]]:
        """The guest's kept commands: (pid, config, tag, on a terminal)."""
        found = self.call(lambda box: box.processes.list())
        return [(k.pid, *parse_note(k.note), k.tty) for k in found]

    def find(self, pid: int | None, tag: str | None) -> Tracked:
        """The command of ``pid`` (or ``tag``), followed from now on if it was not; a
        GuestError ESRCH when there is none."""
        import errno

        for tracked in list(self.tracked.values()):
            if (pid and tracked.pid == pid) or (tag is not None and tracked.tag == tag):
                return tracked
        for kpid, config, ktag, tty in self.kept():
            if (pid and kpid == pid) or (tag is not None and ktag == tag):
                return self._take_over(kpid, config, ktag, tty)
        what = f"pid {pid}" if pid else f"tag {tag!r}"
        raise GuestError(errno.ESRCH, f"process with {what} not found")

    def _take_over(self, pid: int, config: dict, tag: str | None, tty: bool) -> Tracked:
        """Follow a kept command this server did not start (or started before a restart)."""
        tracked = Tracked(pid, config, tag, tty)

        def output(kind: str) -> Callable[[bytes], None]:
            return lambda data: tracked.emit((kind, data))

        out, err = output("pty" if tty else "stdout"), output("stderr")
        tracked.process = self.call(lambda box: box.processes.connect(pid, out, err))
        self._follow(tracked, None)
        return tracked


class Watcher:
    """A polling watcher (CreateWatcher / GetWatcherEvents / RemoveWatcher): the guest's
    watch, its events kept until taken."""

    def __init__(self, guest: Guest, path: str, recursive: bool) -> None:
        self.root = path
        self.events: list = []
        self.lock = threading.Lock()
        self.touched = time.monotonic()
        self.watch = guest.call(lambda box: box.files.watch(path, recursive, self._event))

    def _event(self, event) -> None:
        with self.lock:
            if len(self.events) < MAX_EVENTS:
                self.events.append(event)

    def take(self) -> list:
        with self.lock:
            taken, self.events = self.events, []
            self.touched = time.monotonic()
        return taken

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.watch.stop()
