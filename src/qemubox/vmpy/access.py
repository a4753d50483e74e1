"""Getting into a running VM: ssh with the VM's own key (interactive, or a command with its
real exit status), and its serial console's socket."""

from __future__ import annotations

import os
import selectors
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from qemubox import paths
from qemubox.errors import BootError, GuestError, InputError, VMDied
from qemubox.vmpy import config as vmconfig
from qemubox.vmpy import control
from qemubox.vmpy.layout import VmDir

DEFAULT_USER = "vmuser"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}  # runuser -l makes the rest
DETACH = b"\x1d"  # Ctrl-]
SSH_FAILED = 255  # what ssh exits with when it, not the command, failed


def user_of(installed: dict) -> str:
    """The user ``vm install`` made (its record), for ssh and commands."""
    return installed.get("user") or DEFAULT_USER


def ssh_args(vm: VmDir, port: int, user: str, batch: bool) -> list[str]:
    args = [
        "ssh",
        "-p",
        str(port),
        "-i",
        str(vm.ssh_key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        f"UserKnownHostsFile={vm.known_hosts}",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
    ]
    if batch:
        args += ["-T", "-o", "BatchMode=yes"]
    return [*args, f"{user}@127.0.0.1"]


def _port(vm: VmDir) -> int:
    port = vmconfig.load(vm.config).ssh_port
    if port is None:
        raise InputError(f"{vm.config}: no ssh_port, so qemubox does not know where ssh is")
    if not vm.ssh_key.is_file():
        raise InputError(f"VM {vm.name!r} has no ssh key ({vm.ssh_key})")
    return port


def ssh(vm: VmDir, command: Sequence[str]) -> None:
    """This process becomes ssh: a login shell, or ``command`` as the remote shell's words."""
    control.must_run(vm)
    args = ssh_args(vm, _port(vm), user_of(paths.read_json(vm.install_record)), batch=False)
    if command:
        args += ["--", *command]
    os.execvp(args[0], args)


def exec_command(vm: VmDir, argv: Sequence[str], wait: float = 0, via: str = "auto") -> int:
    """Run ``argv`` (each word kept as it is) in the VM, as its user in a login shell; its
    exit status. Through the guest agent when the install put one in (``via`` auto or
    agent), else ssh. ``wait``: keep trying that many seconds while the VM boots."""
    if not argv:
        raise InputError("vm exec needs a command after --")
    control.must_run(vm)
    installed = paths.read_json(vm.install_record)
    if via == "agent" and not installed.get("agent"):
        raise InputError(f"VM {vm.name!r} has no guest agent (vm install puts one in)")
    if via != "ssh" and installed.get("agent"):
        return _exec_agent(vm, argv, user_of(installed), wait)
    args = ssh_args(vm, _port(vm), user_of(installed), batch=True)
    if wait > 0:
        _wait_for_ssh(vm, args, wait)
    proc = subprocess.run([*args, "--", shlex.join(argv)], check=False)
    if proc.returncode == SSH_FAILED and _unreachable(args):
        raise BootError(f"cannot reach VM {vm.name!r} over ssh (is sshd up in it?)")
    return proc.returncode


def _unreachable(args: list[str]) -> bool:
    quiet = subprocess.run(
        [*args, "--", "true"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return quiet.returncode != 0


def _wait_for_ssh(vm: VmDir, args: list[str], wait: float) -> None:
    """Quietly try ssh until it gets in, for at most ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while _unreachable(args):
        if time.monotonic() >= deadline or control.running(vm) is None:
            raise BootError(f"cannot reach VM {vm.name!r} over ssh within {wait:g} s")
        time.sleep(1)


def _exec_agent(vm: VmDir, argv: Sequence[str], user: str, wait: float) -> int:
    """The command through the guest agent: output streamed as it comes, standard input
    forwarded when it is not a terminal."""
    from qemubox.guest.client import AgentClient, AgentGone, exec_exit_code

    def alive() -> None:
        if control.running(vm) is None:
            raise VMDied(f"VM {vm.name!r} stopped")

    try:
        agent = AgentClient.attach(vm.agent, max(wait, 10), alive, resync=True)
    except (TimeoutError, AgentGone) as exc:
        raise BootError(f"the guest agent of {vm.name!r} does not answer ({exc})") from None
    out, err = sys.stdout.buffer, sys.stderr.buffer

    def write(stream):
        def put(data: bytes) -> None:
            stream.write(data)
            stream.flush()

        return put

    login = ["runuser", "-l", user, "-c", shlex.join(argv)]
    feed = not sys.stdin.isatty()
    try:
        ident, pend = agent.start(login, ENV, "/", feed, write(out), write(err))
        if feed:
            while chunk := sys.stdin.buffer.read1(65536):
                if not agent.write_stdin(ident, pend, chunk):
                    break
            else:
                agent.close_stdin(ident)
        agent.wait(ident, pend, None)
    except GuestError as exc:
        err.write(f"qemubox: {exc}\n".encode())
        return exec_exit_code(exc)
    except AgentGone:
        raise VMDied(f"the guest agent of {vm.name!r} went away") from None
    finally:
        agent.bye()
        agent.close()
    assert pend.status is not None
    return pend.status.code


def console(vm: VmDir) -> socket.socket:
    """A connection to the serial console of a VM run with -d."""
    control.must_run(vm)
    if not vm.console.exists():
        raise InputError(
            f"VM {vm.name!r} has its console on the terminal that started it "
            f"(run it with -d to attach later)"
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(vm.console))
    except OSError as exc:
        sock.close()
        raise VMDied(f"cannot attach to {vm.name!r}'s console: {exc.strerror}") from None
    return sock


def relay(sock: socket.socket, terminal: bool) -> None:
    """Standard input to the console and the console to standard output: until Ctrl-] on
    a ``terminal`` (the caller puts it in raw mode), else until standard input ends and
    the console has been quiet a second."""
    with sock:
        _relay(sock, sys.stdin.fileno(), terminal)


def _relay(sock: socket.socket, fd: int, terminal: bool) -> None:
    out = sys.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(fd, selectors.EVENT_READ)
    stdin_open = True
    quiet_until = None  # without a terminal: after input ends, print what follows a while
    while True:
        timeout = None if quiet_until is None else max(0.0, quiet_until - time.monotonic())
        events = sel.select(timeout)
        if not events and quiet_until is not None:
            return
        for key, _ in events:
            if key.fileobj is sock:
                data = sock.recv(65536)
                if not data:
                    return
                os.write(out, data)
                if quiet_until is not None:
                    quiet_until = time.monotonic() + 1.0
            elif stdin_open:
                data = os.read(fd, 4096)
                if terminal and DETACH in data:
                    data = data.split(DETACH, 1)[0]
                    if data:
                        sock.sendall(data)
                    return
                if not data:
                    sel.unregister(fd)
                    stdin_open = False
                    quiet_until = time.monotonic() + 1.0
                    continue
                sock.sendall(data if terminal else data.replace(b"\n", b"\r"))
