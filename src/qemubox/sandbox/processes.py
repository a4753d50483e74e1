"""Commands that run on while the caller does other things (``sandbox.processes``): started
with a handle to feed, signal and wait on; kept ones (started with a note) outlive the
client that started them, are listed with their notes by any later client, and are taken
over by pid — the model under a service whose processes outlive its requests."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from qemubox.errors import InputError
from qemubox.guest.client import AgentClient
from qemubox.guest.protocol import Kept
from qemubox.guest.transport import Pending
from qemubox.sandbox.commands import DEFAULT_ENV, ExecResult, User, UserHost, agent_faults

Output = Callable[[bytes], None] | None
START_TIMEOUT = 30  # seconds for the guest to say a command runs


class Process:
    """A command running in the guest, as this client follows it. Its output goes to the
    callbacks given, or is kept (``max_output`` bytes at most) for :meth:`wait`."""

    def __init__(self, box: UserHost, agent: AgentClient, ident: int, pend: Pending) -> None:
        self._box, self._agent, self._ident, self._pend = box, agent, ident, pend
        with agent_faults(box, "while a command started"):
            self.pid: int = agent.started(ident, pend, START_TIMEOUT)

    def wait(self, timeout: float | None = None) -> ExecResult | None:
        """The command's end (None if it runs on after ``timeout`` seconds); a GuestError
        if another client took it over meanwhile."""
        with agent_faults(self._box, "while a command ran"):
            if not self._agent.wait(self._ident, self._pend, timeout):
                return None
        pend = self._pend
        assert pend.status is not None
        return ExecResult(
            pend.status.code,
            b"".join(pend.stdout),
            b"".join(pend.stderr),
            pend.status.signal,
            truncated=pend.truncated,
            pid=self.pid,
        )

    def write_stdin(self, data: bytes) -> bool:
        """Send ``data`` to the command's stdin (its terminal's, for one on a terminal), at
        the pace it reads; False if it ended first."""
        with agent_faults(self._box, "while sending stdin"):
            return self._agent.write_stdin(self._ident, self._pend, data)

    def close_stdin(self) -> None:
        with agent_faults(self._box, "while closing stdin"):
            self._agent.close_stdin(self._ident)

    def signal(self, signo: int) -> None:
        """Send ``signo`` to the command's process group."""
        with agent_faults(self._box, "while signalling a command"):
            self._agent.signal(self._ident, signo)

    def kill(self) -> None:
        self.signal(9)

    def resize(self, rows: int, columns: int) -> None:
        """Give the command's terminal a new size."""
        try:
            with agent_faults(self._box, "while resizing a terminal"):
                self._agent.resize(self._ident, rows, columns)
        except ValueError as err:
            raise InputError(str(err)) from None

    @property
    def running(self) -> bool:
        return not self._pend.done.is_set()


class Processes:
    """``sandbox.processes``."""

    def __init__(self, box: UserHost) -> None:
        self._box = box

    def start(
        self,
        argv: Sequence[str | bytes],
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        user: User = None,
        tty: tuple[int, int] | None = None,
        stdin: bool = False,
        keep: bytes | None = None,
        on_stdout: Output = None,
        on_stderr: Output = None,
        max_output: int | None = None,
    ) -> Process:
        """Start ``argv`` (``env``, ``cwd``, ``user``, ``tty`` as ``Sandbox.exec`` takes
        them; ``stdin``: its stdin is fed through the handle, else it reads /dev/null) and
        return once it runs. With ``keep`` (a note of up to 64 KiB: what the caller wants
        said of it) it outlives this client: :meth:`list` shows it to any client, and
        :meth:`connect` takes it over; without, it ends when this client leaves."""
        if not argv:
            raise InputError("a process needs a command")
        box = self._box
        if isinstance(user, str):
            who = box.identity(user)
            env = {"HOME": who.home, **(env or {})}
            user = who.to_tuple()
        ids = box.ids_of(user)
        agent = box.agent()
        try:
            with agent_faults(box, "while starting a command"):
                ident, pend = agent.start(
                    argv, {**DEFAULT_ENV, **(env or {})}, cwd, stdin, on_stdout, on_stderr,
                    max_output, tty, ids, keep,
                )  # fmt: skip
        except ValueError as err:
            raise InputError(str(err)) from None
        return Process(box, agent, ident, pend)

    def list(self) -> list[Kept]:
        """The kept commands running in the guest, whoever started them."""
        with agent_faults(self._box, "while listing commands"):
            return self._box.agent().kept()

    def connect(
        self,
        pid: int,
        on_stdout: Output = None,
        on_stderr: Output = None,
        max_output: int | None = None,
    ) -> Process:
        """Take over the kept command ``pid``: its output from now on, its end; whichever
        client followed it before is told (its ``wait`` raises). A GuestError (``ESRCH``)
        when no kept command has that pid."""
        agent = self._box.agent()
        try:
            with agent_faults(self._box, "while taking over a command"):
                ident, pend = agent.attach_command(pid, on_stdout, on_stderr, max_output)
        except ValueError as err:
            raise InputError(str(err)) from None
        return Process(self._box, agent, ident, pend)
