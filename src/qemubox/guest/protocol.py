"""The agent protocol's wire format, once: frame types, limits, encoding and decoding.

The guest agent (``agent.c``) mirrors every constant here; a test reads them from the C
source and fails when the two disagree.

A frame, in both directions: u8 type (never 0), u32 id, u32 payload length, payload.
Integers are little-endian; a string is a u32 length and its bytes. Zero bytes where a frame
would begin are padding and are skipped: a client that attaches after another one left in
the middle of a frame first sends ``SYNC_PADDING`` zero bytes, which completes any partial
frame the agent is holding, then HELLO.

A session: the client sends HELLO with a random nonce; the agent ends whatever the previous
client had running and answers READY with the same nonce, its protocol version and the guest
kernel's release. The client ignores everything before that READY (leftovers of an earlier
client). Requests then carry ids chosen by the client; the agent's frames answer them.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from enum import IntEnum

from qemubox.errors import ProtocolViolation

VERSION = 4
HEADER = struct.Struct("<BII")  # type, id, payload length
MAX_PAYLOAD = 256 * 1024  # any frame, either way
CHUNK = 64 * 1024  # stdin and output chunks
NONCE_SIZE = 16
SYNC_PADDING = HEADER.size + MAX_PAYLOAD
STDIN_WINDOW = 1024 * 1024  # stdin bytes in flight per command before the guest acknowledges


class Frame(IntEnum):
    # host -> guest
    HELLO = 1  # nonce
    EXEC = 2  # ExecRequest
    STDIN = 3  # bytes; empty: end of input
    SIGNAL = 4  # u32 signal number, to the command's process group
    MOUNT = 5  # MountRequest
    PING = 6  # anything, echoed by PONG
    POWEROFF = 7  # sync and power off; answered by OK
    BYE = 8  # the client leaves: end its commands; answered by OK
    RESIZE = 9  # u32 rows, u32 columns: the size of a command's terminal
    RENEW = 10  # u64 ns since the epoch, then seed bytes: a starting guest's clock and RNG
    FS = 11  # FsRequest: a file operation, answered by ENTRIES frames (if any), then OK
    KEPT = 12  # empty: answered by a COMMAND frame per kept command, then OK
    ATTACH = 13  # u32 pid: take over a kept command (STARTED, its output from now, its EXIT)
    WATCH = 14  # u32 flags (WATCH_*), path: STARTED (u32 directories), EVENTs, then OK
    UNWATCH = 15  # empty, on a watch's id: it ends (OK)
    # guest -> host
    READY = 20  # nonce, u32 version, release string
    STDOUT = 21  # bytes
    STDERR = 22  # bytes
    EXIT = 23  # ExitStatus
    ERROR = 24  # u32 errno, message
    OK = 25  # empty
    PONG = 26  # the PING's payload
    STDIN_ACK = 27  # u32 bytes of stdin the command has taken
    ENTRIES = 28  # u32 count, then Entry records: a file operation's answer, in parts
    STARTED = 29  # u32 pid: the command runs (before any of its output); for a watch, u32
    # directories watched
    COMMAND = 30  # u32 pid, u32 flags (KEPT_*), the note: a kept command
    EVENT = 31  # u32 kind (FsEvent), path: what happened under a watched directory


_VALUES = frozenset(f.value for f in Frame)
HOST_FRAMES = frozenset(f for f in Frame if f < 20)
GUEST_FRAMES = frozenset(f for f in Frame if f >= 20)
EXEC_STDIN = 1  # ExecRequest flag: the command reads stdin from the host
EXEC_TTY = 2  # ExecRequest flag: the command runs on a pseudo-terminal (rows, columns follow)
EXEC_USER = 4  # ExecRequest flag: uid, gid, the supplementary groups' count and ids follow
MAX_GROUPS = 64
MAX_EXECS = 64  # commands the agent runs at once
EXEC_KEEP = 8  # ExecRequest flag: the command outlives its client; its note follows
MAX_NOTE = 64 * 1024  # bytes of a kept command's note: what the host says of it
KEPT_ATTACHED = 1  # COMMAND flag: a client has the command now
KEPT_TTY = 2  # COMMAND flag: it runs on a terminal
FS_USER = 1  # FsRequest flag: uid, gid, the supplementary groups' count and ids follow
MAX_DEPTH = 64  # levels a listing goes down at most
MAX_ENTRIES = 100_000  # entries of one listing at most
MAX_LISTING = 64 * 1024 * 1024  # bytes of ENTRIES payloads one request gets at most
MAX_PATH = 4096  # bytes of an entry's path, or of a symlink's target


WATCH_RECURSIVE = 1  # WATCH flag: the directories under the path too, later ones included
MAX_WATCHES = 32  # directories watched at once (each with its subdirectories)


class FsEvent(IntEnum):
    """What happened to a path under a watched directory (E2B's event types)."""

    CREATE = 1  # made, or moved in
    WRITE = 2
    REMOVE = 3
    RENAME = 4  # moved away (or the watched directory itself moved)
    CHMOD = 5  # its attributes changed


class FsOp(IntEnum):
    STAT = 1  # the path's entry (a symlink's own, with its target)
    LIST = 2  # the entries under a directory, ``depth`` levels down (symlinks not entered)
    MKDIR = 3  # make the directory and its parents: its entry (EEXIST when it was there)
    MOVE = 4  # rename to ``to``, making its parents: the moved entry
    REMOVE = 5  # remove the path, a directory with all it holds


# The agent keeps its initramfs's busybox here whatever the root: qemubox's own commands
# (network setup, cp, file transfers) run on it, so any root serves them.
GUEST_BUSYBOX = "/run/qemubox/busybox"


def own_shell(script: str, *args: str) -> list[str]:
    """argv running ``script`` (with ``$1``... = ``args``) in the agent's busybox shell,
    whose applets win over the root's commands."""
    return [GUEST_BUSYBOX, "sh", "-c", script, "sh", *args]


def encode(kind: Frame, ident: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"{kind.name} frame of {len(payload)} bytes is over the limit")
    return HEADER.pack(kind, ident, len(payload)) + payload


def _str(value: str | bytes) -> bytes:
    data = value.encode(errors="surrogateescape") if isinstance(value, str) else value
    return struct.pack("<I", len(data)) + data


class Reader:
    """Fields of one payload, read front to back; anything short or left over is a
    violation by the sender."""

    def __init__(self, payload: bytes, what: str) -> None:
        self._data = memoryview(payload)
        self._at = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if n > len(self._data) - self._at:
            raise ProtocolViolation(f"{self._what} frame is too short")
        out = bytes(self._data[self._at : self._at + n])
        self._at += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def i32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]

    def string(self) -> bytes:
        return self.take(self.u32())

    def rest(self) -> bytes:
        return self.take(len(self._data) - self._at)

    def end(self) -> None:
        if self._at != len(self._data):
            raise ProtocolViolation(
                f"{self._what} frame has {len(self._data) - self._at} extra bytes"
            )


# --- payloads -----------------------------------------------------------------------------------


def exec_request(
    argv: list[bytes],
    env: list[bytes],
    cwd: bytes,
    with_stdin: bool,
    tty: tuple[int, int] | None = None,
    user: tuple[int, int, tuple[int, ...]] | None = None,
    keep: bytes | None = None,
) -> bytes:
    """An EXEC payload; with ``tty`` (rows, columns) the command gets a pseudo-terminal for
    its stdin, stdout and stderr (its output then comes as STDOUT only); with ``user``
    (uid, gid, supplementary groups) it runs as that user; with ``keep`` (a note, up to
    MAX_NOTE bytes) it outlives its client, listed with the note, until it ends."""
    flags = (EXEC_STDIN if with_stdin or tty else 0) | (EXEC_TTY if tty else 0)
    flags |= (EXEC_USER if user else 0) | (EXEC_KEEP if keep is not None else 0)
    if keep is not None and len(keep) > MAX_NOTE:
        raise ValueError(f"a note of {len(keep)} bytes (at most {MAX_NOTE})")
    payload = struct.pack("<II", flags, len(argv))
    payload += b"".join(_str(a) for a in argv)
    payload += struct.pack("<I", len(env)) + b"".join(_str(e) for e in env)
    payload += _str(cwd)
    if tty:
        payload += resize_request(*tty)
    if user:
        payload += user_request(*user)
    if keep is not None:
        payload += _str(keep)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(
            f"the command and its environment take {len(payload)} bytes (at most {MAX_PAYLOAD})"
        )
    return payload


def user_request(uid: int, gid: int, groups: tuple[int, ...]) -> bytes:
    if not all(0 <= n < (1 << 32) - 1 for n in (uid, gid, *groups)):
        raise ValueError(f"user {uid}:{gid} (groups {groups}): ids from 0 to {(1 << 32) - 2}")
    if len(groups) > MAX_GROUPS:
        raise ValueError(f"{len(groups)} supplementary groups (at most {MAX_GROUPS})")
    return struct.pack(f"<III{len(groups)}I", uid, gid, len(groups), *groups)


def resize_request(rows: int, columns: int) -> bytes:
    if not (0 < rows < 1 << 16 and 0 < columns < 1 << 16):
        raise ValueError(f"a terminal of {rows} rows and {columns} columns")
    return struct.pack("<II", rows, columns)


RENEW_SEED = 64  # bytes of host randomness a RENEW carries


def renew_request(now_ns: int, seed: bytes) -> bytes:
    if len(seed) != RENEW_SEED:
        raise ValueError(f"a seed of {len(seed)} bytes, not {RENEW_SEED}")
    return struct.pack("<Q", now_ns) + seed


def fs_request(
    op: FsOp,
    path: str,
    to: str = "",
    depth: int = 0,
    user: tuple[int, int, tuple[int, ...]] | None = None,
) -> bytes:
    """An FS payload: u32 op, flags, depth; the path, the target; the user, if any."""
    if not path.startswith("/") or (op == FsOp.MOVE and not to.startswith("/")):
        raise ValueError(f"{to if path.startswith('/') else path!r} is not an absolute path")
    if op == FsOp.LIST and not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"a listing {depth} levels deep (1 to {MAX_DEPTH})")
    payload = struct.pack("<III", op, FS_USER if user else 0, depth) + _str(path) + _str(to)
    if user:
        payload += user_request(*user)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a path of {len(path) + len(to)} bytes")
    return payload


@dataclass(frozen=True)
class Entry:
    """A file's entry in the guest, as lstat(2) gives it."""

    path: str
    mode: int  # st_mode: type and permission bits
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: str = ""  # a symlink's

    @property
    def kind(self) -> str:
        """``file``, ``dir``, ``symlink`` or ``other``."""
        if stat.S_ISREG(self.mode):
            return "file"
        if stat.S_ISDIR(self.mode):
            return "dir"
        return "symlink" if stat.S_ISLNK(self.mode) else "other"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rpartition("/")[2] or "/"


_ENTRY = struct.Struct("<IIIQQ")  # mode, uid, gid, size, mtime_ns


def decode_entries(payload: bytes) -> list[Entry]:
    r = Reader(payload, "ENTRIES")
    out = []
    for _ in range(r.u32()):
        path = r.string().decode(errors="surrogateescape")
        mode, uid, gid, size, mtime = _ENTRY.unpack(r.take(_ENTRY.size))
        target = r.string().decode(errors="surrogateescape")
        if len(path) > MAX_PATH or len(target) > MAX_PATH:
            raise ProtocolViolation("an entry's path or target is longer than a path can be")
        out.append(Entry(path, mode, uid, gid, size, mtime, target))
    r.end()
    return out


def entries(items: list[Entry]) -> bytes:
    """An ENTRIES payload (what the agent sends; for tests and fakes)."""
    return struct.pack("<I", len(items)) + b"".join(
        _str(e.path.encode(errors="surrogateescape"))
        + _ENTRY.pack(e.mode, e.uid, e.gid, e.size, e.mtime_ns)
        + _str(e.target.encode(errors="surrogateescape"))
        for e in items
    )


@dataclass(frozen=True)
class Kept:
    """A command that outlives its client, as the agent lists it."""

    pid: int
    attached: bool  # a client has it now
    tty: bool
    note: bytes  # what the client that started it said of it


def decode_command(payload: bytes) -> Kept:
    r = Reader(payload, "COMMAND")
    pid, flags = r.u32(), r.u32()
    note = r.string()
    r.end()
    if len(note) > MAX_NOTE:
        raise ProtocolViolation(f"a kept command's note of {len(note)} bytes")
    return Kept(pid, bool(flags & KEPT_ATTACHED), bool(flags & KEPT_TTY), note)


def command(kept: Kept) -> bytes:
    """A COMMAND payload (what the agent sends; for tests and fakes)."""
    flags = (KEPT_ATTACHED if kept.attached else 0) | (KEPT_TTY if kept.tty else 0)
    return struct.pack("<II", kept.pid, flags) + _str(kept.note)


def watch_request(path: str, recursive: bool) -> bytes:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    return struct.pack("<I", WATCH_RECURSIVE if recursive else 0) + _str(path)


@dataclass(frozen=True)
class Event:
    kind: FsEvent
    path: str


def decode_event(payload: bytes) -> Event:
    r = Reader(payload, "EVENT")
    kind = r.u32()
    path = r.string().decode(errors="surrogateescape")
    r.end()
    if kind not in FsEvent.__members__.values():
        raise ProtocolViolation(f"an EVENT of kind {kind}, which no file operation is")
    return Event(FsEvent(kind), path)


def event(ev: Event) -> bytes:
    """An EVENT payload (what the agent sends; for tests and fakes)."""
    return struct.pack("<I", ev.kind) + _str(ev.path.encode(errors="surrogateescape"))


def mount_request(source: str, target: str, fstype: str, options: str, flags: int) -> bytes:
    return b"".join(_str(x) for x in (source, target, fstype, options)) + struct.pack("<I", flags)


@dataclass(frozen=True)
class Ready:
    nonce: bytes
    version: int
    release: str


def decode_ready(payload: bytes) -> Ready:
    r = Reader(payload, "READY")
    nonce = r.take(NONCE_SIZE)
    version = r.u32()
    release = r.rest().decode(errors="replace")
    return Ready(nonce, version, release)


def ready(nonce: bytes, release: str) -> bytes:
    """A READY payload (what the agent sends; for tests and fakes)."""
    return nonce + struct.pack("<I", VERSION) + release.encode()


@dataclass(frozen=True)
class ExitStatus:
    signal: int | None  # the signal that killed the command, if one did
    code: int  # its exit status, or 128 + signal

    @property
    def killed(self) -> bool:
        return self.signal is not None


def decode_exit(payload: bytes) -> ExitStatus:
    r = Reader(payload, "EXIT")
    kind, value = r.i32(), r.i32()
    r.end()
    if kind == 0 and 0 <= value <= 255:
        return ExitStatus(None, value)
    if kind == 1 and 1 <= value <= 64:
        return ExitStatus(value, 128 + value)
    raise ProtocolViolation(f"an EXIT frame says ({kind}, {value}), which no command can end with")


def exit_status(code: int, signal: int | None = None) -> bytes:
    return struct.pack("<ii", 1, signal) if signal else struct.pack("<ii", 0, code)


def decode_error(payload: bytes) -> tuple[int, str]:
    r = Reader(payload, "ERROR")
    errno = r.u32()
    return errno, r.rest().decode(errors="replace")


def error(errno: int, message: str) -> bytes:
    return struct.pack("<I", errno) + message.encode()


def decode_u32(payload: bytes, what: str) -> int:
    r = Reader(payload, what)
    value = r.u32()
    r.end()
    return value


# --- a byte stream into frames --------------------------------------------------------------------


class Decoder:
    """Frames from a byte stream fed in pieces of any size. Memory stays bounded: a header
    announcing more than MAX_PAYLOAD, an unknown type, or a frame the peer may not send is a
    ProtocolViolation at once, before its payload is read."""

    def __init__(self, allowed: frozenset[Frame] = GUEST_FRAMES) -> None:
        self._buf = bytearray()
        self._allowed = allowed

    def feed(self, data: bytes) -> list[tuple[Frame, int, bytes]]:
        self._buf += data
        frames = []
        while True:
            padding = len(self._buf) - len(self._buf.lstrip(b"\0"))  # zeros between frames
            del self._buf[:padding]
            if len(self._buf) < HEADER.size:
                return frames
            kind, ident, size = HEADER.unpack_from(self._buf)
            if kind not in _VALUES or Frame(kind) not in self._allowed:
                raise ProtocolViolation(f"unexpected frame type {kind}")
            if size > MAX_PAYLOAD:
                raise ProtocolViolation(
                    f"{Frame(kind).name} frame claims {size} bytes (at most {MAX_PAYLOAD})"
                )
            end = HEADER.size + size
            if len(self._buf) < end:
                return frames
            frames.append((Frame(kind), ident, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]

    @property
    def pending(self) -> int:
        return len(self._buf)

    def rest(self) -> bytes:
        """The bytes fed and not yet a whole frame (handed on to the next decoder)."""
        return bytes(self._buf)


def find_ready(stream: bytes, nonce: bytes) -> int | None:
    """Where in ``stream`` the READY frame answering ``nonce`` begins, if it is there (its
    whole header and nonce); what comes before it is an earlier client's leftovers."""
    at = stream.find(nonce)
    while at >= 0:
        start = at - HEADER.size
        if start >= 0:
            kind, _, size = HEADER.unpack_from(stream, start)
            if kind == Frame.READY and NONCE_SIZE <= size <= MAX_PAYLOAD:
                return start
        at = stream.find(nonce, at + 1)
    return None
