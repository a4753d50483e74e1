"""File operations in a running sandbox's guest, each one agent request (no command run):
stat, list (``depth`` levels down), make a directory, rename, remove — as root or as a
user of the guest's root (``user`` as ``Sandbox.exec`` takes it)."""

from __future__ import annotations

from qemubox.errors import InputError
from qemubox.guest.protocol import Entry, FsOp
from qemubox.sandbox.commands import User, UserHost, agent_faults


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
