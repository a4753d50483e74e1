"""Where qemubox keeps its files, and the disciplines every writer follows.

Three places, each with one job:

- the cache (``~/.cache/qemubox``, ``QEMUBOX_CACHE_DIR``): anything that can be rebuilt —
  agent binaries, initramfs archives, kernel sources and builds, module indexes, the KVM
  verdict. Entries are filled by :func:`fill` (built aside, renamed into place), so a reader
  never sees half an entry, and any number of processes may fill it at once;
- the state directory (``~/.local/state/qemubox``, ``QEMUBOX_STATE_DIR``): records that must
  survive, written with :func:`atomic_write`;
- the runtime directory (``$XDG_RUNTIME_DIR/qemubox`` or ``/tmp/qemubox-<uid>``): one short
  directory per running machine with its sockets, pid and console log; paths stay short
  because a unix socket's path is limited to 107 bytes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import platformdirs

from qemubox.errors import InputError

SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with its NUL


def _dir(env: str, default: str) -> Path:
    override = os.environ.get(env)
    path = Path(override) if override else Path(default)
    path.mkdir(parents=True, exist_ok=True)
    return trusted(path)


def trusted(path: Path) -> Path:
    """``path``, a directory whose contents qemubox runs or boots, if only its owner could
    have put them there: it must be the user's, and not writable by group or others."""
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise InputError(f"{path} belongs to uid {st.st_uid}, not to you: refusing to use it")
    if st.st_mode & 0o022:
        raise InputError(
            f"{path} is writable by others (mode {st.st_mode & 0o777:o}): refusing to use it "
            f"(chmod go-w {path})"
        )
    return path


def cache_dir() -> Path:
    """The user cache directory (``QEMUBOX_CACHE_DIR`` overrides it)."""
    return _dir("QEMUBOX_CACHE_DIR", platformdirs.user_cache_dir("qemubox"))


def state_dir() -> Path:
    """Records that must survive (``QEMUBOX_STATE_DIR`` overrides it)."""
    return _dir("QEMUBOX_STATE_DIR", platformdirs.user_state_dir("qemubox"))


def runtime_root() -> Path:
    """Where machines keep sockets and pids (``QEMUBOX_RUNTIME_DIR`` overrides it).

    Not created here: a dry run must create nothing."""
    override = os.environ.get("QEMUBOX_RUNTIME_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and len(base) < 60:
        return Path(base) / "qemubox"
    return Path(tempfile.gettempdir()) / f"qemubox-{os.getuid()}"


def new_machine_id() -> str:
    return os.urandom(4).hex()


def is_machine_id(name: str) -> bool:
    """Whether ``name`` is one :func:`new_machine_id` could give."""
    return len(name) == 8 and all(c in "0123456789abcdef" for c in name)


def machine_runtime_dir(machine_id: str) -> Path:
    path = runtime_root() / machine_id
    longest = path / "agent99.sock"
    if len(str(longest)) > SOCKET_PATH_MAX:
        path = Path(tempfile.gettempdir()) / f"qemubox-{os.getuid()}" / machine_id
    return path


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) readable by its owner only; its parent (the
    runtime root, in a shared /tmp perhaps) must be the user's own."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    trusted(path.parent)
    path.mkdir(exist_ok=True, mode=0o700)
    return trusted(path)


# --- writing ----------------------------------------------------------------------------------


def temp_beside(path: Path) -> Path:
    """A name no other writer uses, beside ``path``: made there, then renamed or linked in."""
    return path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(3).hex()}.tmp")


def atomic_write(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()


def fill(target: Path, make: Callable[[Path], None]) -> Path:
    """A cache entry: ``target`` if it is there, else made by ``make(temp)`` beside it and
    renamed into place. ``make`` writes a file or a directory at ``temp`` and raises if it
    cannot; a half-made entry is never seen under ``target``. Concurrent fillers of one
    target wait for each other, so the work is done once."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.with_name(f".{target.name}.lock")):
        if target.exists():
            return target
        tmp = temp_beside(target)
        try:
            make(tmp)
            os.replace(tmp, target)
        finally:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with suppress(FileNotFoundError):
                    tmp.unlink()
    return target


def least_recently_used(
    entries: list[Path],
    keep: int,
    used: Callable[[Path], float],
    max_age: float | None = None,
    grace: float = 0.0,
) -> list[Path]:
    """Which cache entries to remove: those beyond the ``keep`` used last, and those not
    used for ``max_age`` seconds — never one used within the last ``grace`` seconds (a
    start may be about to use it). ``used(entry)``: when it was last used (an entry gone
    meanwhile is left out)."""
    when = {}
    for entry in entries:
        with suppress(OSError):
            when[entry] = used(entry)
    now = time.time()
    newest_first = sorted(when, key=when.__getitem__, reverse=True)
    old = [
        e
        for i, e in enumerate(newest_first)
        if i >= keep or (max_age is not None and now - when[e] > max_age)
    ]
    return [e for e in old if now - when[e] > grace]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def try_lock(path: Path, create: bool = True) -> int | None:
    """An exclusive lock on ``path`` taken without waiting: the open fd holding it (close it
    to let go), or None when another holds it (or, without ``create``, the file is gone).
    A lock held this way outlives any ``with`` block, and passes to a child that inherits
    the fd."""
    try:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_locked(path: Path) -> bool:
    """Whether some process holds a lock on ``path`` (as /proc/locks says: looking does not
    take the lock, so it never makes another process's :func:`try_lock` fail)."""
    try:
        st = path.stat()
        locks = Path("/proc/locks").read_text()
    except OSError:
        return False
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(line.split()[5] == dev for line in locks.splitlines() if len(line.split()) > 5)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; empty when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (readers see the old or the new file)."""
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def updating_json(path: Path) -> Iterator[dict]:
    """Read-modify-write a JSON object under its lock: other writers wait, readers see the
    old or the new file."""
    with locked(path.with_name(f".{path.name}.lock")):
        data = read_json(path)
        yield data
        write_json(path, data)


def punch_head(path: Path, keep: int) -> None:
    """Free all but about the last ``keep`` bytes of a file another process appends to
    (QEMU's console log): the head becomes a hole, so the file's size is unchanged and the
    writer's offset stays valid, but it holds no more than ``keep`` bytes on disk."""
    import ctypes

    with open(path, "rb+") as fh:
        st = os.fstat(fh.fileno())
        block = max(st.st_blksize, 4096)
        end = (max(0, st.st_size - keep) // block) * block
        if end <= 0:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        punch_hole, keep_size = 0x02, 0x01
        if libc.fallocate(fh.fileno(), punch_hole | keep_size, 0, end) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))


def copy_data(src: Path, dst: Path) -> None:
    """Copy what ``src`` holds, skipping a leading hole (see :func:`punch_head`)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fin.seek(os.lseek(fin.fileno(), 0, os.SEEK_DATA))
        except OSError:  # all hole, or no SEEK_DATA here
            fin.seek(0)
        shutil.copyfileobj(fin, fout)


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` (made anew), its holes left holes: only the data is read
    and written, in the kernel (``copy_file_range``: a reflink where the file system
    shares extents)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # no data after pos
                break
            end = os.lseek(fin.fileno(), pos, os.SEEK_HOLE)
            while pos < end:
                done = os.copy_file_range(fin.fileno(), fout.fileno(), end - pos, pos, pos)
                if done == 0:  # shrunk meanwhile: nothing more to read (not ever, here)
                    end = size = pos
                pos += done
        fout.truncate(size)


def set_aside(path: Path) -> Path:
    """Rename ``path`` to ``<path>.bak`` (or, when that is taken, a dated ``.bak``) so that
    nothing the user had is lost; returns the new name."""
    backup = path.with_name(path.name + ".bak")
    if backup.exists():
        backup = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.bak")
    os.replace(path, backup)
    return backup


def write_keeping_old(path: Path, text: str) -> Path | None:
    """Write ``text`` to ``path``; a different file already there is kept as ``<path>.old``.

    Returns the backup's path when one was made. An identical file is not touched.
    """
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    backup = None
    if path.exists():
        if path.read_text(encoding="utf-8", errors="replace") == text:
            return None
        backup = path.with_name(path.name + ".old")
        shutil.copy2(path, backup)
    atomic_write(path, text)
    return backup
