"""A command in a sandbox's guest: started through the agent, its stdin fed or pumped at
the pace it reads, waited for within its timeout (then its process group killed), its
output kept or streamed; what ends it (exit, signal, a guest error, a dead VM) turned into
one result or one error."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from qemubox.errors import (
    GuestError,
    InputError,
    ProtocolViolation,
    SandboxError,
    TimedOut,
    VMDied,
)
from qemubox.guest.client import AgentClient, AgentGone, SendTimeout, exec_exit_code

if TYPE_CHECKING:
    from qemubox.image.ociconfig import Identity

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TERM": "dumb",
    "LANG": "C.UTF-8",
}
KILL_GRACE = 3  # seconds a killed command has to report its end
CHUNK = 65536  # what a stdin pump reads at once


@dataclass
class ExecResult:
    exit_code: int  # 128+N when killed by signal N
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    timed_out: bool = False
    truncated: bool = False  # output past max_output was dropped
    pid: int | None = None  # the command's process id in the guest (None: it did not start)


class Host(Protocol):
    """What a command needs of the sandbox it runs in."""

    terminals: set[int]

    def agent(self) -> AgentClient: ...
    def fail(self) -> None: ...
    def console_tail(self) -> str: ...
    def vm_gone(self, doing: str) -> None: ...
    def check_host_io(self) -> None: ...


User = str | tuple[int, int, tuple[int, ...]] | None  # as Sandbox.exec takes it


class UserHost(Host, Protocol):
    """A sandbox that also knows its guest's users."""

    def ids_of(self, user: User) -> tuple[int, int, tuple[int, ...]] | None: ...
    def identity(self, user: str) -> Identity: ...


def execute(
    box: Host,
    argv: Sequence[str | bytes],
    env: Mapping[str, str] | None,
    cwd: str,
    stdin: bytes | None,
    timeout: float | None,
    on_stdout: Callable[[bytes], None] | None,
    on_stderr: Callable[[bytes], None] | None,
    stdin_stream,
    max_output: int | None,
    tty: tuple[int, int] | None,
    user: tuple[int, int, tuple[int, ...]] | None = None,
) -> ExecResult:
    """Run ``argv`` in ``box``'s guest (see ``Sandbox.exec``)."""
    agent = box.agent()
    if not argv:
        raise InputError("exec needs a command")
    full_env = {**DEFAULT_ENV, **(env or {})}
    with_stdin = stdin is not None or stdin_stream is not None or tty is not None
    stop_pump = threading.Event()
    ident = -1
    try:
        try:
            ident, pend = agent.start(
                argv, full_env, cwd, with_stdin, on_stdout, on_stderr, max_output, tty, user
            )
        except ValueError as err:
            raise InputError(str(err)) from None
        if tty is not None:
            box.terminals.add(ident)
        if stdin_stream is not None:
            feeder, source = _pump_stdin, stdin_stream
        elif stdin is not None:
            feeder, source = _feed_stdin, stdin
        else:
            feeder = None
        if feeder is not None:
            threading.Thread(
                target=feeder, args=(agent, ident, pend, source, stop_pump), daemon=True
            ).start()
        timed_out = False
        if not agent.wait(ident, pend, timeout):
            timed_out = True
            stop_pump.set()
            _kill(box, agent, ident, pend)
    except GuestError as err:
        message = f"qemubox: {err}\n".encode()
        if on_stderr:
            on_stderr(message)
        return ExecResult(exec_exit_code(err), b"", b"" if on_stderr else message)
    except (ProtocolViolation, AgentGone) as err:
        raise broken(box, err, "while running a command") from None
    finally:
        stop_pump.set()
        box.terminals.discard(ident)
    box.check_host_io()
    status = pend.status
    assert status is not None
    return ExecResult(
        status.code,
        b"".join(pend.stdout),
        b"".join(pend.stderr),
        status.signal,
        timed_out,
        pend.truncated,
        pend.pid,
    )


def broken(box: Host, err: ProtocolViolation | AgentGone, doing: str) -> VMDied:
    """The error to raise when the agent's connection broke ``doing`` something: the guest
    broke the protocol (the machine is failed) or went away."""
    if isinstance(err, ProtocolViolation):
        box.fail()
        return ProtocolViolation(f"protocol violation by the guest: {err}", box.console_tail())
    box.vm_gone(doing)
    return VMDied("the guest agent went away", box.console_tail())


@contextlib.contextmanager
def agent_faults(box: Host, doing: str) -> Iterator[None]:
    """The agent's connection breaking (or not taking a request) ``doing`` something, raised
    as the sandbox's error."""
    try:
        yield
    except (ProtocolViolation, AgentGone) as err:
        raise broken(box, err, doing) from None
    except SendTimeout:
        raise SandboxError(f"the guest agent took no request {doing}", box.console_tail()) from None


def _kill(box: Host, agent: AgentClient, ident: int, pend) -> None:
    """SIGKILL a timed-out command; a guest that does not let it go within seconds (it
    stopped reading its port, say) loses the VM."""
    try:
        agent.signal(ident, signal.SIGKILL, timeout=2)
        if agent.wait(ident, pend, KILL_GRACE):
            return
    except (SendTimeout, TimeoutError):
        pass
    box.fail()
    raise TimedOut(
        "the command timed out and the guest did not end it; the VM was stopped",
        box.console_tail(),
    )


def _feed_stdin(agent: AgentClient, ident: int, pend, data: bytes, stop) -> None:
    with contextlib.suppress(AgentGone, OSError, SendTimeout):
        if agent.write_stdin(ident, pend, data, stop):
            agent.close_stdin(ident)


def _pump_stdin(agent: AgentClient, ident: int, pend, stream, stop) -> None:
    with contextlib.suppress(AgentGone, OSError, ValueError, SendTimeout):
        while not stop.is_set():
            chunk = stream.read1(CHUNK) if hasattr(stream, "read1") else stream.read(CHUNK)
            if not chunk:
                agent.close_stdin(ident)
                return
            if not agent.write_stdin(ident, pend, chunk, stop):
                return
