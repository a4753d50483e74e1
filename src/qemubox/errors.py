"""Every error the user can see, and the one table of exit statuses.

Each error is one line (``str(err)``) with an exit status; sandbox errors also carry the
guest console's last lines. Everything derives from :class:`QemuboxError`.
"""

from __future__ import annotations

import re
from enum import IntEnum

# Control characters but newline and tab: a guest's escape sequences (OSC 52 writes the
# clipboard, OSC 0 the title, others worse) must not reach the user's terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters shown as ``\\xNN``. Guest text is made printable
    where it enters (the console tail, the agent's error messages), so that whatever shows
    it — the CLI, a log, an API user's terminal — is safe."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def last_line(text: str, default: str = "no output") -> str:
    """The last line a failing tool printed: what its one-line error quotes."""
    return (text.strip().splitlines() or [default])[-1]


class Exit(IntEnum):
    """qemubox's exit statuses. A command run in a sandbox exits with its own status,
    128+N when signal N killed it."""

    OK = 0
    MISMATCH = 1  # a check ran and found a difference
    INPUT = 2  # bad usage or bad input: nothing was done
    INTERNAL = 70  # a bug in qemubox
    BUSY = 120  # another client is attached to the sandbox
    BOOT = 121  # the guest did not boot in time
    PANIC = 122  # the guest kernel panicked
    VM_DIED = 123  # the VM died, or the guest broke the agent protocol
    TIMEOUT = 124  # the command ran past its timeout and was killed
    START = 125  # the kernel or QEMU could not start, or the host failed the VM
    CANNOT_EXECUTE = 126  # the command exists but could not be run
    NOT_FOUND = 127  # the command was not found
    SIGNAL_BASE = 128  # + N: killed by signal N
    INTERRUPTED = 130  # Ctrl-C


class QemuboxError(Exception):
    """An error meant for the user: ``str(err)`` is the whole message, one line."""

    exit_code: int = Exit.INPUT

    @property
    def details(self) -> dict[str, object]:
        """What the error knows, as plain data (for ``--json`` output and records)."""
        return {"error": type(self).__name__, "message": str(self), "exit_code": self.exit_code}


class InputError(QemuboxError):
    """Bad input: a file, a value, an option. Nothing was changed."""


class ToolError(QemuboxError):
    """An external program (make, tar, apt-get, ...) failed on what it was given."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class VerifyError(QemuboxError):
    """A configuration did not end up as asked."""

    exit_code = Exit.MISMATCH


class SandboxError(QemuboxError):
    """The sandbox itself failed; ``console_tail`` holds the guest console's last lines."""

    exit_code = Exit.START

    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(message)
        self.console_tail = console_tail

    @property
    def details(self) -> dict[str, object]:
        return {**super().details, "console_tail": self.console_tail}


class KernelError(SandboxError):
    """The kernel or QEMU could not be started."""

    exit_code = Exit.START


class BootError(SandboxError):
    """The guest never reached the agent within the boot timeout."""

    exit_code = Exit.BOOT


class KernelPanic(SandboxError):
    """The guest kernel panicked; ``vmcore``: where its memory was saved (``path``,
    ``bytes``, ``seconds``) or why it was not (``error``), when a dump was asked for."""

    exit_code = Exit.PANIC

    def __init__(self, message: str, console_tail: str = "", vmcore: dict | None = None) -> None:
        super().__init__(message, console_tail)
        self.vmcore = vmcore

    @property
    def details(self) -> dict[str, object]:
        return {**super().details, "vmcore": self.vmcore}


class VMDied(SandboxError):
    """QEMU exited while the sandbox was in use."""

    exit_code = Exit.VM_DIED


class ProtocolViolation(VMDied):
    """The guest sent what the agent protocol does not allow; the sandbox was stopped."""


class AgentTimeout(SandboxError, TimeoutError):
    """The guest agent did not answer a request in time: the guest hangs, or the host is too
    busy to run it. A TimeoutError too, for callers that wait on it as on any timeout."""

    exit_code = Exit.VM_DIED


class HostIOError(SandboxError):
    """The host could not read or write a disk image under the VM (its filesystem full,
    say); the guest saw an I/O error."""

    exit_code = Exit.START


class TimedOut(SandboxError):
    """A command ran past its timeout and the guest would not end it: the VM was stopped."""

    exit_code = Exit.TIMEOUT


class BusyError(SandboxError):
    """Every client slot of the sandbox is taken (or it is still starting)."""

    exit_code = Exit.BUSY


class GuestError(QemuboxError):
    """The guest could not do what was asked (a mount, a command); the message is the
    guest's, made printable. ``errno`` is the guest's error number."""

    exit_code = Exit.START

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(printable(message))
        self.errno = errno
