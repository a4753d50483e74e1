"""Starting QEMU under a keeper, tied to this process's life until released; and watching a
QEMU process that may not be our child."""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qemubox.errors import SandboxError

_PR_SET_PDEATHSIG = 1

# Every QEMU runs under this keeper, its parent, in a session of its own:
# - tied to its starter until released: the keeper gets SIGHUP when the starter dies (its
#   parent-death signal; QEMU's own would be cleared by ``-runas``) and kills QEMU; SIGUSR1
#   releases it (a detached machine, once it is set up: a starter killed while it boots
#   leaves nothing behind);
# - it starts QEMU's helpers first (virtiofsd: each waited for until its socket is there)
#   and ends them after QEMU;
# - it keeps the console log small: the log's head is punched out when more than twice
#   ``keep`` bytes are on disk (the file's size and QEMU's offset stay valid);
# - when ``idle`` seconds pass with no client attached (no ``attach*.lock`` locked, as
#   /proc/locks says: trying the lock would race a client) and ``active`` untouched, it
#   runs ``on_idle`` (a shell command), and again after as long if QEMU still runs;
# - once the time in ``deadline`` (its first line: seconds since the epoch) has come, it
#   runs the shell command of its second line, once (the file is renamed);
# - it writes QEMU's exit status to ``exit``, holding ``alive.lock`` (its standard input,
#   and QEMU's fd 3) until then, so that whoever finds the lock free also finds the status.
# Its children other than QEMU do not inherit the lock.
_KEEPER = r"""d=$1 keep=$2 idle=$3 on_idle=$4 helpers=$5; shift 5
trap '' HUP USR1
exec 3<&0
h=
eval "$helpers"
"$@" & q=$!
echo "$q" > "$d/qemu.pid"
trap 'sig=1; [ -n "$tied" ] && kill -KILL "$q" $h 2>/dev/null' HUP
trap 'sig=1; tied=' USR1
tied=1
read -r _ _ _ ppid _ < /proc/$$/stat
[ "$ppid" = "$PPID" ] || kill -HUP $$
(
  exec 0</dev/null 3<&-
  trap - HUP USR1
  log="$d/console.log"
  while sleep 1 && kill -0 $$ 2>/dev/null; do
    set -- $(stat -c '%s %b' "$log" 2>/dev/null)
    if [ $# = 2 ] && [ $(($2 * 512)) -gt $((2 * keep)) ]; then
      fallocate -p -o 0 -l $(($1 - keep)) "$log" 2>/dev/null
    fi
    if [ -r "$d/deadline" ]; then
      { read -r at; read -r cmd; } < "$d/deadline"
      if [ "$(date +%s)" -ge "${at:-0}" ]; then
        mv -f "$d/deadline" "$d/deadline.passed"
        sh -c "$cmd" </dev/null >>"$d/keeper.log" 2>&1 &
      fi
    fi
    [ "$idle" -gt 0 ] || continue
    for f in "$d"/attach*.lock; do
      [ -e "$f" ] && grep -q ":$(stat -c %i "$f") " /proc/locks && touch "$d/active"
    done
    [ -e "$d/active" ] || touch "$d/active"
    if [ $(($(date +%s) - $(stat -c %Y "$d/active"))) -ge "$idle" ]; then
      touch "$d/active"  # should it not stop the machine, try again after another while
      sh -c "$on_idle" </dev/null >>"$d/keeper.log" 2>&1 &
    fi
  done
) & t=$!
while :; do
  sig=
  wait "$q"; rc=$?
  [ -n "$sig" ] || break
done
kill "$t" $h 2>/dev/null
echo "$rc" > "$d/exit"
"""


@dataclass(frozen=True)
class Keeping:
    """What the keeper of one QEMU is told: where the machine's directory is, how much
    console log to keep, and what to do after ``idle`` seconds unused (0: nothing)."""

    runtime_dir: Path
    console_keep: int
    lock_fd: int
    idle: int = 0
    on_idle: str = ""
    helpers: tuple[tuple[tuple[str, ...], str], ...] = ()  # (command, the socket it makes)

    def _helpers(self) -> str:
        """Shell lines starting each helper without the lock, then waiting (30 s at most,
        and only while it lives) for its socket."""
        lines = []
        for command, socket in self.helpers:
            lines.append(
                f'{shlex.join(command)} </dev/null 3<&- & h="$h $!"; n=0; '
                f"while [ ! -S {shlex.quote(socket)} ] && [ $n -lt 3000 ] && "
                "kill -0 $! 2>/dev/null; do sleep 0.01; n=$((n + 1)); done"
            )
        return "\n".join(lines)

    def args(self, qemu: Sequence[str]) -> list[str]:
        return [
            "sh",
            "-c",
            _KEEPER,
            "qemubox-keeper",
            str(self.runtime_dir),
            str(self.console_keep),
            str(self.idle),
            self.on_idle,
            self._helpers(),
            *qemu,
        ]


# The signals the keeper traps. A shell cannot trap a signal ignored when it started, and
# ignoring is inherited: under ``nohup`` (SIGHUP ignored) the keeper would let QEMU outlive a
# starter killed while it boots. The child takes them back to their defaults first.
_KEEPER_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)


def _die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """In the child: get ``sig`` when the thread that started us ends. That thread is the
    spawner below, which lives as long as the process, so: when the process dies, even by
    SIGKILL."""
    for caught in _KEEPER_SIGNALS:
        signal.signal(caught, signal.SIG_DFL)
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


def spawn(args: Sequence[str], keeping: Keeping, log: Path) -> subprocess.Popen:
    """Start QEMU under its keeper (see :data:`_KEEPER`), tied to this process until
    :func:`release`; QEMU's and the keeper's own messages go to ``log``."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
    parent = os.getpid()
    with open(log, "ab") as out:
        return _spawner.spawn(
            keeping.args(args),
            stdin=keeping.lock_fd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent, signal.SIGHUP),
        )


def release(keeper: int, started: int | None) -> None:
    """Let a QEMU outlive the process that started it."""
    if alive(keeper, started):
        os.kill(keeper, signal.SIGUSR1)


# Seconds a keeper may take to start QEMU: its helpers first, each waited for (30 s at most)
# until its socket is there — on a loaded host, much of that time.
QEMU_PID_TIMEOUT = 120


def qemu_pid(proc: subprocess.Popen, runtime_dir: Path, timeout: float = QEMU_PID_TIMEOUT) -> int:
    """QEMU's pid, as its keeper writes it once it started QEMU (its helpers are its
    children too); the keeper's own when it has ended (QEMU is gone: the keeper stands for
    it). A keeper that says nothing in time is ended with all it started (its session), and
    that is an error: taking the keeper for QEMU would leave QEMU running, unkillable, once
    the keeper was killed in its place."""
    written = runtime_dir / "qemu.pid"
    deadline = time.monotonic() + timeout
    pause = 0.001
    while proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            text = written.read_text()
            if text.endswith("\n"):
                return int(text)
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise SandboxError(f"QEMU did not start within {timeout:g} s (the host is overloaded?)")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.02)  # at once when it is quick; no busy wait when not
    return proc.pid


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


def wait_for_path(path: str | Path, alive: Callable[[], bool], deadline: float) -> bool:
    """Wait until ``path`` exists (a socket QEMU makes as it starts), while ``alive()``
    and until ``deadline`` (a time.monotonic()); whether it does."""
    while not os.path.exists(path):
        if time.monotonic() > deadline or not alive():
            return os.path.exists(path)
        time.sleep(0.002)
    return True


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
