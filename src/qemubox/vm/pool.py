"""A warm pool: machines restored from one snapshot ahead of the starts that take them.

Each member is restored as a start would restore it, runs one command (so that under TCG
the guest's exec path is already translated when the first real command comes: that
first command otherwise costs some 60 ms) and is then stopped: a waiting member holds its
RAM but takes no CPU. A start that takes it only continues it; the taker then renews its
clock and randomness before anything of its own runs, as after any restore.

A pool is one snapshot key's: ``<runtime>/pool/<key>/`` holds an empty file per waiting
machine, named by its id, and ``size`` (how many the pool keeps). A start takes a member
by removing its file (whoever removes it has it), checks that the member's plan is its
own but for the runtime directory, and continues it; it then starts another to take its
place. Members are ordinary detached machines whose keeper stops them after ``ttl``
seconds without a client: a pool left alone, or a member whose taker was killed, does not
live on.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from qemubox import paths
from qemubox.errors import GuestError, InputError, SandboxError
from qemubox.guest.client import AgentGone
from qemubox.guest.protocol import GUEST_BUSYBOX
from qemubox.model.plan import Capability, MachinePlan
from qemubox.model.state import State
from qemubox.vm import snapshot
from qemubox.vm.machine import Machine

DEFAULT_TTL = 3600
WARM_UP = [GUEST_BUSYBOX, "true"]  # a member's first command, run before it waits
WARM_TIMEOUT = 30.0


def root() -> Path:
    return paths.runtime_root() / "pool"


def pool_dir(key: str) -> Path:
    return root() / key


def unpoolable(plan: MachinePlan) -> str | None:
    """Why starts of ``plan`` cannot come from a pool, if they cannot: its QEMU would have
    to be started with host paths of the session's own."""
    return plan.cannot(Capability.POOL)


def fits(plan: MachinePlan) -> bool:
    """Whether a start of ``plan`` can come from a pool: a restore, and poolable."""
    snap = plan.snapshot
    return snap is not None and snap.role == "restore" and unpoolable(plan) is None


def _entries(key: str) -> list[Path]:
    """The pool's member files (its own files begin with a dot)."""
    d = pool_dir(key)
    return [e for e in sorted(d.iterdir()) if not e.name.startswith(".")] if d.is_dir() else []


def waiting(key: str) -> list[str]:
    """The ids of the pool's members that still wait (entries of dead ones removed)."""
    alive = []
    for entry in _entries(key):
        try:
            up = Machine.open(entry.name).state is State.RUNNING
        except InputError:
            up = False
        if up:
            alive.append(entry.name)
        else:
            entry.unlink(missing_ok=True)
    return alive


def take(plan: MachinePlan) -> Machine | None:
    """A waiting member for ``plan``, now ours (None: the pool is empty or has no pool)."""
    for entry in _entries(plan.snapshot.key) if plan.snapshot else []:
        try:
            entry.unlink()  # the one who removes it has it
        except FileNotFoundError:
            continue
        try:
            machine = Machine.open(entry.name)
        except InputError:
            continue
        ours = replace(machine.plan, runtime_dir=plan.runtime_dir) == plan
        if ours and machine.state is State.RUNNING:
            with contextlib.suppress(SandboxError):
                _command(machine, "cont")
                return machine
        _end(machine)  # dead, another session's, of another qemubox, or not continued
    return None


def _end(machine: Machine) -> None:
    machine.kill()
    machine.stop(1)  # its runtime directory removed


def _warm(machine: Machine) -> None:
    """Run one command in a restored member, then stop it until it is taken."""
    agent = machine.attach(WARM_TIMEOUT)
    try:
        ident, pend = agent.start(WARM_UP, {}, "/", False)
        if not agent.wait(ident, pend, WARM_TIMEOUT):
            raise TimeoutError(f"its first command did not end within {WARM_TIMEOUT} s")
    finally:
        machine.detach()
    _command(machine, "stop")


def _command(machine: Machine, name: str) -> None:
    """A QMP command to a member no client holds."""
    deadline = time.monotonic() + WARM_TIMEOUT
    mon = snapshot.starter_monitor(machine.plan, deadline, machine.alive)
    try:
        mon.command(name)
    finally:
        mon.close()


def spawn(plan: MachinePlan, ttl: int) -> str:
    """Start one member for ``plan`` (a restore plan); returns its id."""
    member = replace(plan, runtime_dir=str(paths.machine_runtime_dir(paths.new_machine_id())))
    expire = shlex.join([sys.executable, "-m", "qemubox.vm.pool", member.runtime_dir])
    with Machine.runtime_dir(member) as lock:
        snapshot.seed_console(member)
        machine = Machine.launch(member, lock, True, ttl, expire)
    try:
        snapshot.load(member, alive=machine.alive)
        _warm(machine)
    except (SandboxError, AgentGone, GuestError, TimeoutError) as err:
        said = machine.qemu_log().splitlines()[-1:]  # read before its directory goes
        _end(machine)
        raise SandboxError(f"a pool member did not start: {' '.join([str(err), *said])}") from None
    machine.release()
    d = pool_dir(plan.snapshot.key)
    d.mkdir(parents=True, exist_ok=True)
    (d / machine.id).touch()
    return machine.id


def fill(plan: MachinePlan, size: int, ttl: int = DEFAULT_TTL) -> int:
    """Keep ``size`` members waiting for ``plan`` (the pool's size is remembered for
    :func:`top_up`); returns how many were started."""
    if not fits(plan):
        why = unpoolable(plan) or "it does not start from a snapshot"
        raise InputError(f"this session cannot be pooled: {why}")
    key = plan.snapshot.key
    with _locked(key):
        pool_dir(key).mkdir(parents=True, exist_ok=True)
        paths.atomic_write(pool_dir(key) / ".size", f"{size} {ttl}\n")
        started = 0
        for _ in range(size - len(waiting(key))):
            spawn(plan, ttl)
            started += 1
    return started


def _locked(key: str):
    """Held while a pool's members are counted and started, or it is drained."""
    root().mkdir(parents=True, exist_ok=True)
    return paths.locked(root() / f".{key}.lock")


def top_up(plan: MachinePlan) -> None:
    """After a member was taken: start another, up to the pool's size (unless the pool
    was stopped meanwhile)."""
    key = plan.snapshot.key
    with _locked(key), contextlib.suppress(OSError, ValueError):
        size, ttl = map(int, (pool_dir(key) / ".size").read_text().split())
        if len(waiting(key)) < size:
            spawn(plan, ttl)


def pools() -> dict[str, dict]:
    """Every pool: key -> waiting members and size."""
    out = {}
    for d in sorted(root().iterdir()) if root().is_dir() else []:
        if d.name.startswith("."):
            continue
        size = 0
        with contextlib.suppress(OSError, ValueError):
            size = int((d / ".size").read_text().split()[0])
        out[d.name] = {"key": d.name, "size": size, "waiting": waiting(d.name)}
    return out


def drain(key: str) -> int:
    """End a pool: its waiting members stopped, its directory removed; returns how many."""
    ended = 0
    with _locked(key):
        for member in waiting(key):
            with contextlib.suppress(FileNotFoundError):
                (pool_dir(key) / member).unlink()
                _end(Machine.open(member))
                ended += 1
        shutil.rmtree(pool_dir(key), ignore_errors=True)
    return ended


def _expire(runtime_dir: str) -> None:
    """A member's keeper's idle action: the member ends (out of the pool first)."""
    machine_id = Path(runtime_dir).name
    for entry in root().glob(f"*/{machine_id}"):
        entry.unlink(missing_ok=True)
    with contextlib.suppress(InputError):
        _end(Machine.open(machine_id))


if __name__ == "__main__":
    _expire(sys.argv[1])
