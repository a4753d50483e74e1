"""Starting QEMU: tied to this process's life, or detached from it; and watching a QEMU
process that may not be our child."""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


# A QEMU that changes user (``-runas``) loses its parent-death signal: the kernel clears it
# on a change of credentials. It then runs under this keeper, its parent, which is told of
# our death instead and kills it (as its parent, it also keeps QEMU's pid from being reused).
# The keeper ignores the signal until it knows QEMU's pid, then checks that its parent did
# not die meanwhile.
_KEEPER = """trap '' HUP
"$@" & q=$!
trap 'kill -KILL "$q" 2>/dev/null; wait "$q"; exit 137' HUP
read -r _ _ _ ppid _ < /proc/$$/stat
[ "$ppid" = "$PPID" ] || kill -HUP $$
wait "$q"
"""


def _die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """In the child: get ``sig`` when the thread that started us ends. That thread is the
    spawner below, which lives as long as the process, so: when the process dies, even by
    SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the parent died between fork and prctl
        os._exit(1)


class _Spawner:
    """One thread that starts every tied QEMU. PR_SET_PDEATHSIG fires when the *thread*
    that forked the child exits; a thread pool's worker may exit long before the process,
    so the fork happens here, on a thread that never ends."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, name="qemubox-spawner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            args, kwargs, reply = self._jobs.get()
            try:
                reply.put((subprocess.Popen(args, **kwargs), None))
            except BaseException as err:  # handed to the caller
                reply.put((None, err))

    def spawn(self, args: Sequence[str], **kwargs) -> subprocess.Popen:
        reply: queue.Queue = queue.Queue(maxsize=1)
        self._jobs.put((list(args), kwargs, reply))
        proc, err = reply.get()
        if err is not None:
            raise err
        return proc


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def spawn(
    args: Sequence[str],
    log: Path,
    detached: bool,
    pass_fds: Sequence[int] = (),
    changes_user: bool = False,
) -> subprocess.Popen:
    """Start QEMU with its output in ``log``. Tied (``detached=False``): it dies with this
    process — through a keeper when it ``changes_user`` (see :func:`qemu_pid`). Detached: in
    a session of its own, it outlives us."""
    global _spawner
    with open(log, "ab") as out:
        kwargs = dict(
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, pass_fds=pass_fds
        )
        if detached:
            return subprocess.Popen(list(args), start_new_session=True, **kwargs)
        with _spawner_lock:
            if _spawner is None:
                _spawner = _Spawner()
        parent = os.getpid()
        if changes_user:
            return _spawner.spawn(
                ["sh", "-c", _KEEPER, "qemubox-keeper", *args],
                preexec_fn=lambda: _die_with_parent(parent, signal.SIGHUP),
                **kwargs,
            )
        return _spawner.spawn(args, preexec_fn=lambda: _die_with_parent(parent), **kwargs)


def qemu_pid(proc: subprocess.Popen, kept: bool, timeout: float = 5) -> int:
    """QEMU's pid: ``proc``'s own, or, under a keeper, the keeper's child's."""
    if not kept:
        return proc.pid
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            pids = children.read_text().split()
            if pids:
                return int(pids[0])
        time.sleep(0.001)
    return proc.pid  # QEMU is already gone: the keeper stands for it


def _stat(pid: int) -> tuple[str, int] | None:
    """The state letter and start time of process ``pid``, from /proc (None: no such
    process)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[19])


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot): with the pid, it names one
    process for good (a pid alone may be reused)."""
    stat = _stat(pid)
    return stat[1] if stat else None


def alive(pid: int, started: int | None) -> bool:
    """Whether that very process still runs (not a zombie, not a newer one with its pid)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and (started is None or stat[1] == started)


def wait_gone(pid: int, started: int | None, timeout: float) -> bool:
    """Wait until the process is gone (or a zombie); False on timeout. Works for processes
    that are not our children (a pidfd, no polling)."""
    import select

    if not alive(pid, started):
        return True
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return not alive(pid, started)
    try:
        if not alive(pid, started):  # the pid was reused before we opened it
            return True
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready) or not alive(pid, started)
    finally:
        os.close(fd)


def kill(pid: int, started: int | None) -> None:
    if alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
