"""File operations in a running sandbox's guest, each one agent request (no command run):
stat, list (``depth`` levels down), make a directory, rename, remove — as root or as a
user of the guest's root (``user`` as ``Sandbox.exec`` takes it)."""

from __future__ import annotations

from collections.abc import Callable

from qemubox.errors import InputError
from qemubox.guest.client import AgentClient
from qemubox.guest.protocol import Entry, Event, FsOp
from qemubox.guest.transport import Pending
from qemubox.sandbox.commands import User, UserHost, agent_faults

WATCH_TIMEOUT = 30  # seconds for the guest to say it watches


class Files:
    """``sandbox.files``. A refusal by the guest is a :class:`~qemubox.errors.GuestError`
    whose ``errno`` says why (``ENOENT``, ``EEXIST``, ``EACCES``...); paths are absolute."""

    def __init__(self, box: UserHost) -> None:
        self._box = box

    def stat(self, path: str, user: User = None) -> Entry:
        """The entry of ``path`` (a symlink's own, with its target)."""
        return self._op(FsOp.STAT, path, user=user)[0]

    def list(self, path: str, depth: int = 1, user: User = None) -> list[Entry]:
        """The entries under directory ``path``, ``depth`` levels down (symlinks are listed,
        not entered), in the guest's directory order."""
        return self._op(FsOp.LIST, path, depth=depth, user=user)

    def make_dir(self, path: str, user: User = None) -> Entry:
        """Make directory ``path`` and its missing parents, owned by ``user``: its entry
        (errno EEXIST when it was there)."""
        return self._op(FsOp.MKDIR, path, user=user)[0]

    def rename(self, path: str, to: str, user: User = None) -> Entry:
        """Move ``path`` to ``to``, making ``to``'s missing parents: the moved entry."""
        return self._op(FsOp.MOVE, path, to, user=user)[0]

    def remove(self, path: str, user: User = None) -> None:
        """Remove ``path``; a directory with everything in it."""
        self._op(FsOp.REMOVE, path, user=user)

    def watch(
        self,
        path: str,
        recursive: bool = False,
        on_event: Callable[[Event], None] | None = None,
    ) -> Watch:
        """Watch directory ``path`` (with ``recursive``, the directories under it too, those
        made later included) from now on: each event (``kind``: CREATE, WRITE, REMOVE,
        RENAME, CHMOD; ``path``) goes to ``on_event`` (on the connection's thread: keep it
        short) or is kept for :meth:`Watch.events`."""
        box = self._box
        agent = box.agent()
        try:
            with agent_faults(box, "while starting a watch"):
                ident, pend = agent.watch(path, recursive, on_event)
        except ValueError as err:
            raise InputError(str(err)) from None
        return Watch(box, agent, ident, pend)

    def _op(
        self, op: FsOp, path: str, to: str = "", depth: int = 0, user: User = None
    ) -> list[Entry]:
        box = self._box
        ids = box.ids_of(user)
        agent = box.agent()
        try:
            with agent_faults(box, "during a file operation"):
                return agent.fs(op, path, to, depth, ids)
        except ValueError as err:
            raise InputError(str(err)) from None


class Watch:
    """A directory watched in the guest, until :meth:`stop` (or its client leaves, or the
    directory goes, or events come faster than they are taken: a GuestError, EOVERFLOW)."""

    def __init__(self, box: UserHost, agent: AgentClient, ident: int, pend: Pending) -> None:
        self._box, self._agent, self._ident, self._pend = box, agent, ident, pend
        with agent_faults(box, "while starting a watch"):
            self.directories: int = agent.started(ident, pend, WATCH_TIMEOUT)  # watched now

    def events(self) -> list[Event]:
        """The events since the last call (kept ones: without ``on_event``). Events not
        taken pile up to 100,000; past that they are dropped, and a call says so once (a
        GuestError, EOVERFLOW) while the watch goes on."""
        with agent_faults(self._box, "while watching"):
            return self._agent.take_events(self._ident, self._pend)

    @property
    def active(self) -> bool:
        return not self._pend.done.is_set()

    def stop(self) -> None:
        with agent_faults(self._box, "while ending a watch"):
            self._agent.unwatch(self._ident, self._pend)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
