"""Snapshots of booted guests, and starts that restore one instead of booting.

A snapshot is recorded once per key — everything that decides what a booted guest holds:
kernel, initramfs (agent, modules), machine, accelerator, size, device layout, QEMU — by
the first start of that key, at no cost worth naming to it: its machine boots with its RAM
shared into a file on tmpfs; once the agent is ready it is stopped, its device state saved
(``x-ignore-shared``: the RAM stays in the file, the state is some 60 kB), its RAM file
copied to be the template, and it goes on as the session's machine. A restore maps the
template privately (``share=off``: each clone's writes are its own, the template never
changes and its pages are shared between clones), loads the state over QMP (``-incoming
defer``, an ``fd:`` channel: QEMU's seccomp filter forbids ``exec:``) and continues.
Nothing of a session is in a snapshot: shares, disks and the network are set up after the
restore, as after a boot, and the clone's clock and RNG are renewed before the first
command.

Files: ``/dev/shm/qemubox-<uid>/<cache>/<key>.ram`` (tmpfs, gone at reboot) and
``<cache>/snapshots/<key>/`` (``state``, ``meta.json``, and ``console``: what the boot
printed, which a clone's console log starts with); a snapshot is whole only with the
first three, and is recorded again otherwise. The RAM files of all of a user's caches are
kept within one budget (:func:`budget`): recording one first removes the least recently
used beyond it, whichever cache holds them, and a RAM file whose record is gone; a start
that tmpfs has no room to record boots without recording.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from qemubox import paths
from qemubox.errors import SandboxError
from qemubox.model.plan import Capability, MachinePlan, SnapshotPlan
from qemubox.qemu.process import wait_for_path

FORMAT = 1  # bumped when what a snapshot holds changes
MIGRATION_TIMEOUT = 30.0
STORE_MARK = "store"  # in a RAM directory: the snapshot store it belongs to
BUDGET_MAX = 4 << 30  # bytes of RAM files at most, and a quarter of the tmpfs
SHM = Path("/dev/shm")  # the tmpfs the RAM files live on
SPARE = 64 << 20  # bytes left free on tmpfs beyond a recording's two RAM files


class SnapshotError(SandboxError):
    """A snapshot could not be recorded or restored (the caller boots cold instead)."""


def unfit(plan: MachinePlan) -> str | None:
    """Why this machine cannot start from a snapshot, if it cannot."""
    return plan.cannot(Capability.SNAPSHOT)


def _file_id(path: str) -> list:
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def key(plan: MachinePlan) -> str:
    """What decides a booted guest, as a digest: the plan's own (``compat_key``: machine,
    size, command line, device layout), the arch's record, and the files behind the paths
    it names — a kernel, initramfs or QEMU rebuilt in place is another guest. Equal keys
    restore each other's snapshots."""
    qemu = plan.arch_record.qemu_binary
    inputs = {
        "format": FORMAT,
        "plan": plan.compat_key(),
        "arch": dataclasses.asdict(plan.arch_record),  # its machine, CPU, device placement
        "kernel": _file_id(plan.kernel.image),
        "initrd": _file_id(plan.initrd),
        "qemu": _file_id(shutil.which(qemu) or qemu),
    }
    blob = json.dumps(inputs, sort_keys=True, default=repr)  # repr: the record's magic bytes
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def ram_dir() -> Path:
    """Ours on tmpfs (a directory someone else made there is refused), one per cache
    directory: a RAM file belongs with the state file beside which it was recorded."""
    return _ram_dir(str(SHM), str(store_dir().absolute()))


def _user_dir() -> Path:
    """This user's directory on tmpfs, holding one directory per cache."""
    return SHM / f"qemubox-{os.getuid()}"


@functools.cache
def _ram_dir(shm: str, store: str) -> Path:
    d = _user_dir()
    d.mkdir(mode=0o700, exist_ok=True)
    paths.trusted(d)
    mine = d / hashlib.sha256(store.encode()).hexdigest()[:12]
    if (mine / STORE_MARK).is_file():
        return mine
    if mine.is_dir():  # made before directories were marked
        paths.atomic_write(mine / STORE_MARK, store)
        return mine
    new = d / f".{mine.name}.{os.getpid()}"  # made whole, then named: never seen unmarked
    new.mkdir(mode=0o700)
    (new / STORE_MARK).write_text(store)
    try:
        new.rename(mine)
    except OSError:  # another process made it first
        shutil.rmtree(new, ignore_errors=True)
    _drop_orphans(d)
    return mine


def _drop_orphans(d: Path) -> None:
    """Remove the RAM files of cache directories that are gone (a clone still running maps
    its file privately and keeps it), and those of the layout before these directories."""
    for old in d.glob("*.ram"):
        old.unlink(missing_ok=True)
    for sub, store in _caches(d):
        if store is None or not store.parent.is_dir():
            shutil.rmtree(sub, ignore_errors=True)


def _caches(d: Path) -> list[tuple[Path, Path | None]]:
    """The cache directories in this user's directory ``d`` (those still being made are
    named with a dot), each with the snapshot store it belongs to (None: unmarked)."""
    found = []
    for sub in d.iterdir():
        if not sub.is_dir() or sub.name.startswith("."):
            continue
        try:
            found.append((sub, Path((sub / STORE_MARK).read_text())))
        except OSError:
            found.append((sub, None))
    return found


def store_dir() -> Path:
    return paths.cache_dir() / "snapshots"


def _places(k: str) -> tuple[Path, Path, Path]:
    d = store_dir() / k
    return ram_dir() / f"{k}.ram", d / "state", d / "meta.json"


def find(plan: MachinePlan, k: str | None = None) -> SnapshotPlan | None:
    """The snapshot this plan (of key ``k``, when known) can restore, when one is whole
    (it is then the most recently used: its ``meta.json`` is touched)."""
    k = k or key(plan)
    ram, state, meta = _places(k)
    if ram.is_file() and state.is_file() and meta.is_file():
        with contextlib.suppress(OSError):
            os.utime(meta)
            os.utime(ram)  # its time among all caches' RAM files (see make_room)
        return SnapshotPlan("restore", k, str(ram), str(state))
    return None


def seed_console(plan: MachinePlan) -> None:
    """Start a restoring machine's console log with what its snapshot's boot printed (QEMU
    appends to it)."""
    if plan.snapshot is None or plan.snapshot.role != "restore":
        return
    with contextlib.suppress(OSError):
        paths.copy_data(store_dir() / plan.snapshot.key / "console", Path(plan.console_log))


def remove(k: str) -> None:
    ram, state, _ = _places(k)
    ram.unlink(missing_ok=True)
    shutil.rmtree(state.parent, ignore_errors=True)


def budget() -> int:
    """Bytes the RAM files of all of a user's caches may take on tmpfs: a quarter of it,
    at most ``BUDGET_MAX``."""
    st = os.statvfs(ram_dir())
    return min(BUDGET_MAX, st.f_blocks * st.f_frsize // 4)


@dataclasses.dataclass(frozen=True)
class _RamFile:
    path: Path
    store: Path | None  # the snapshot store it belongs to (None: its directory is unmarked)
    used: float  # touched when it is restored
    size: int

    @property
    def key(self) -> str:
        return self.path.name.removesuffix(".ram")

    def held(self) -> bool:
        """Whether its recorder holds its key's lock now (it may be between its files)."""
        return self.store is not None and paths.is_locked(self.store / f".{self.key}.lock")

    def recorded(self) -> bool:
        d = self.store / self.key if self.store else None
        return d is not None and (d / "state").is_file() and (d / "meta.json").is_file()

    def drop(self) -> None:
        """Remove it and its record (its cache's snapshot of this key is no longer whole)."""
        self.path.unlink(missing_ok=True)
        if self.store is not None:
            shutil.rmtree(self.store / self.key, ignore_errors=True)


def _ram_files() -> list[_RamFile]:
    """The snapshots' RAM files of all of this user's caches (a recorder's own
    ``.KEY.PID.ram`` is not one yet), least recently used first."""
    found = []
    for sub, store in _caches(_user_dir()):
        for ram in sub.iterdir():
            if ram.name.startswith(".") or ram.suffix != ".ram":
                continue
            with contextlib.suppress(OSError):
                st = ram.stat()
                found.append(_RamFile(ram, store, st.st_mtime, st.st_blocks * 512))
    return sorted(found, key=lambda f: f.used)


def make_room(memory: int) -> None:
    """Before a machine of ``memory`` bytes is recorded: remove the RAM files whose record
    is gone, then the least recently used of all of this user's caches until they and this
    one fit the budget (a file whose recorder holds its lock is never taken). OSError when
    tmpfs has still no room for the recording (its machine's RAM file and the template's
    copy, and ``SPARE``): a guest whose shared RAM cannot be backed would die of SIGBUS."""
    _drop_orphans(_user_dir())
    files = []
    for f in _ram_files():
        if f.recorded() or f.held():
            files.append(f)
        else:
            f.drop()
    total = sum(f.size for f in files)
    limit = budget() - memory
    for f in files:
        if total <= limit:
            break
        if not f.held():
            f.drop()
            total -= f.size
    st = os.statvfs(_user_dir())
    free, need = st.f_bavail * st.f_frsize, 2 * memory + SPARE
    if free < need:
        raise OSError(f"{SHM} has {free >> 20} MiB free, recording needs {need >> 20} MiB")


def starter_monitor(plan: MachinePlan, deadline: float, alive: Callable[[], bool]):
    """QMP on the first slot, before any client: the starter's, while the machine starts
    (or while no client holds it)."""
    from qemubox.qemu.qmp import Monitor

    path = plan.qmp_socket(0)
    if not wait_for_path(path, alive, deadline):
        raise SnapshotError(f"QEMU made no QMP socket at {path}")
    while True:
        try:
            return Monitor(path)
        except Exception as err:  # qemu.qmp's ConnectError: bound, not yet listening; or gone
            if time.monotonic() > deadline or not alive():
                raise SnapshotError(f"no QMP at {path}: {err}") from None
            time.sleep(0.002)


def _wait_migration(mon, deadline: float) -> None:
    while True:
        status = mon.command("query-migrate").get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            why = mon.command("query-migrate").get("error-desc") or "QEMU gave no reason"
            raise SnapshotError(f"the migration {status}: {why}")
        if time.monotonic() > deadline:
            raise SnapshotError(f"the migration did not end in time ({status})")
        time.sleep(0.002)


def _ignore_shared(mon, on: bool = True) -> None:
    caps = [{"capability": "x-ignore-shared", "state": on}]
    mon.command("migrate-set-capabilities", capabilities=caps)


def save(mon, state: str, whole: bool = False, timeout: float = MIGRATION_TIMEOUT) -> None:
    """Stop a machine (its clients gone) and save its device state into ``state``: with
    ``whole``, its RAM too (a pause); otherwise RAM stays in its shared file (a template)."""
    mon.command("stop")
    _ignore_shared(mon, not whole)  # explicit: a restored machine has it on
    fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        mon.send_fd("snapshot", fd)
    finally:
        os.close(fd)
    mon.command("migrate", uri="fd:snapshot")
    _wait_migration(mon, time.monotonic() + timeout)


def load(
    plan: MachinePlan,
    timeout: float = MIGRATION_TIMEOUT,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Bring a machine started with ``-incoming defer`` to its snapshot (or its paused
    state), running. ``alive``: whether its QEMU still runs (one that exits at once, on a
    RAM file gone, say, is not waited for)."""
    snap = plan.snapshot
    assert snap is not None and snap.role in ("restore", "resume")
    deadline = time.monotonic() + timeout
    mon = starter_monitor(plan, deadline, alive)
    try:
        if snap.role == "restore":
            _ignore_shared(mon)
        try:
            fd = os.open(snap.state, os.O_RDONLY)
        except OSError as err:
            raise SnapshotError(f"snapshot state {snap.state}: {err.strerror}") from None
        try:
            mon.send_fd("snapshot", fd)
        finally:
            os.close(fd)
        mon.command("migrate-incoming", uri="fd:snapshot")
        _wait_migration(mon, deadline)
        mon.command("cont")
    except Exception as err:  # refused, or QEMU gone (it exits on a state it cannot load)
        why = str(err) or type(err).__name__
        raise SnapshotError(f"restoring snapshot {snap.key} failed: {why}") from None
    finally:
        mon.close()


def claim(plan: MachinePlan, k: str) -> tuple[SnapshotPlan, int] | None:
    """Become the recorder of ``plan``'s key ``k``: the snapshot plan its machine boots
    with (RAM shared into a file of its own) and the key's lock, held until :func:`take`
    is done (:func:`release`). None when another process records that key now (boot
    without)."""
    store_dir().mkdir(parents=True, exist_ok=True)
    fd = paths.try_lock(_lock(k))
    if fd is None:
        return None
    try:
        for stale in ram_dir().glob(f".{k}.*"):  # a recorder of this key that was killed
            stale.unlink(missing_ok=True)
        prune()
        make_room(plan.memory_mib << 20)
        _, state, _ = _places(k)
        state.parent.mkdir(parents=True, exist_ok=True)
        tag = f"{k}.{os.getpid()}"
        ram_tmp, state_tmp = ram_dir() / f".{tag}.ram", state.with_name(f".{tag}.state")
        return SnapshotPlan("record", k, str(ram_tmp), str(state_tmp)), fd
    except BaseException:
        os.close(fd)
        raise


def take(machine, snap: SnapshotPlan) -> None:
    """Save a machine booted with ``snap`` (a record plan), its agent ready and no client
    connected to it, as the snapshot of ``snap.key``, and let it run on: its device state
    is saved, its RAM file copied (the copy is the template; the machine goes on writing
    into its own file, which is unlinked: nothing it does later reaches the snapshot)."""
    ram, state, meta = _places(snap.key)
    ram_copy = Path(snap.ram).with_suffix(".copy")
    mon = machine.monitor()
    try:
        save(mon, snap.state)
        paths.copy_sparse(Path(snap.ram), ram_copy)
        os.replace(ram_copy, ram)
        os.replace(snap.state, state)
        with contextlib.suppress(OSError):
            paths.copy_data(Path(machine.plan.console_log), state.parent / "console")
        info = {"key": snap.key, "recorded": time.time(), "kernel": machine.plan.kernel.image}
        info["initrd"] = machine.plan.initrd
        info |= {"memory_mib": machine.plan.memory_mib, "host": socket.gethostname()}
        paths.write_json(meta, info)
    except (OSError, SandboxError) as err:
        raise SnapshotError(f"recording snapshot {snap.key} failed: {err}") from None
    finally:
        ram_copy.unlink(missing_ok=True)
        _run_on(mon)


def _run_on(mon, timeout: float = 5.0) -> None:
    """Let a machine that was saved run again: once its migration has settled (its state
    ``postmigrate``; a ``cont`` sent earlier is undone as the migration ends), continue it
    and see it running."""
    deadline = time.monotonic() + timeout
    while True:
        status = mon.command("query-status").get("status")
        if status == "running":
            return
        if status != "finish-migrate":
            with contextlib.suppress(SandboxError):  # refused while it settles
                mon.command("cont")
        if time.monotonic() > deadline:
            raise SandboxError(f"the machine did not run again after its snapshot ({status})")
        time.sleep(0.002)


def release(claimed: tuple[SnapshotPlan, int]) -> None:
    """Let go of a key :func:`claim` gave, removing what its recorder left (its machine
    keeps its RAM mapped: the file is not needed)."""
    snap, fd = claimed
    for leftover in (snap.ram, snap.state):
        Path(leftover).unlink(missing_ok=True)
    os.close(fd)


def _lock(k: str) -> Path:
    return store_dir() / f".{k}.lock"


def list_all() -> list[dict]:
    """The snapshots kept: key, when recorded, bytes of RAM file (on tmpfs) and state."""
    out = []
    root = store_dir()
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not d.is_dir():
            continue
        with contextlib.suppress(OSError, ValueError):
            info = json.loads((d / "meta.json").read_text())
            ram = ram_dir() / f"{d.name}.ram"
            info["ram_bytes"] = ram.stat().st_blocks * 512 if ram.exists() else 0
            info["state_bytes"] = (d / "state").stat().st_size
            info["whole"] = ram.exists()
            info["used"] = (d / "meta.json").stat().st_mtime
            out.append(info)
    return out


def prune(older_than: float | None = None, max_bytes: int | None = None) -> list[str]:
    """Remove the snapshots that cannot serve (their RAM file gone with a reboot, their
    kernel or initramfs gone), those recorded more than ``older_than`` seconds ago, then
    the least recently used until they take at most ``max_bytes``. Returns the keys
    removed."""
    for leftover in ram_dir().glob(".*"):  # of killed recorders, unless one runs now
        fd = paths.try_lock(_lock(leftover.name.split(".")[1]))
        if fd is not None:
            leftover.unlink(missing_ok=True)
            os.close(fd)
    removed = []
    kept = []
    now = time.time()
    for info in sorted(list_all(), key=lambda i: i["used"]):
        needed = [f for f in (info.get("kernel", ""), info.get("initrd")) if f is not None]
        stale = not info["whole"] or not all(os.path.exists(f) for f in needed)
        if stale or (older_than is not None and now - info.get("recorded", 0) > older_than):
            remove(info["key"])
            removed.append(info["key"])
        else:
            kept.append(info)
    total = sum(i["ram_bytes"] + i["state_bytes"] for i in kept)
    while max_bytes is not None and kept and total > max_bytes:
        oldest = kept.pop(0)
        remove(oldest["key"])
        removed.append(oldest["key"])
        total -= oldest["ram_bytes"] + oldest["state_bytes"]
    return removed
