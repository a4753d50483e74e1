"""What a user asks for: a Session with its shares and disks, validated before anything starts."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from qemubox.errors import InputError
from qemubox.image import catalog
from qemubox.vm.plan import DiskPlan, PortPlan, SharePlan

SECURITY_MODELS = ("passthrough", "mapped-xattr", "mapped-file", "none")
SHARE_FS = ("9p", "virtiofs")
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"  # shipped with Debian's QEMU
NETWORKS = ("none", "restricted", "user")
ACCELS = ("auto", "kvm", "tcg")
_SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.I)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# QEMU's rule for 9p mount tags: at most 31 bytes; we also keep to characters that need no
# quoting anywhere (the guest's mount options, QEMU's option syntax).
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}")


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes in ``512M``, ``2G``, ``1024K``, ``64MiB``, ``4096B``; a bare number means MiB."""
    if isinstance(text, int):
        if text <= 0:
            raise InputError(f"{what} must be positive, got {text}")
        return text
    m = _SIZE_RE.fullmatch(str(text).strip())
    if not m:
        raise InputError(f"invalid {what} {text!r} (expected a size such as 512M or 2G)")
    unit = m.group(2).upper()
    # A bare number means MiB; a bare B means bytes.
    value = int(m.group(1)) * (1 if not unit and m.group(3) else _UNITS[unit])
    if value <= 0:
        raise InputError(f"{what} must be positive, got {text!r}")
    return value


def disk_size(text: str | int) -> int:
    """A disk's size in bytes: a size (see :func:`parse_size`) of at least 1M."""
    size = parse_size(text, "disk size")
    if size < 1 << 20:
        raise InputError(f"disk size {text!r} is too small (at least 1M)")
    return size


def _absolute_guest_path(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise InputError(f"{what} must be an absolute guest path, got {path!r}")
    if "\0" in path or "\n" in path:
        raise InputError(f"{what} contains a NUL or newline: {path!r}")
    normal = os.path.normpath(path)
    if normal in ("/", "/proc", "/sys", "/dev") or normal.startswith(("/proc/", "/sys/")):
        raise InputError(f"{what} {path!r} would hide a system directory")
    return normal


@dataclass(frozen=True)
class FSShare:
    """A host directory shared into the guest over 9p, or virtiofs (``fs="virtiofs"``:
    faster, served by virtiofsd as root; files keep their host owners)."""

    host_path: str
    mount_point: str
    mount_tag: str = ""
    read_only: bool = False
    security_model: str = "mapped-xattr"  # 9p's
    fs: str = "9p"


@dataclass(frozen=True)
class Disk:
    """An ext4 disk: ephemeral (made in the sandbox directory) or persistent at ``path``."""

    size: str | int
    mount_point: str
    path: str | None = None


@dataclass
class Session:
    memory: str | int = "512M"
    cpus: int = 1
    balloon: bool = False
    shares: list[FSShare] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)
    network: str = "none"
    ports: list[tuple[int, int]] = field(default_factory=list)
    kernel: str | None = None  # a path, "debian", or None for the best available
    modules: str | None = None
    timeout: float | None = 60.0  # default per-command timeout, seconds
    boot_timeout: float = 60.0
    accel: str = "auto"
    console_log: str | None = None
    # The root: minimal (the initramfs), host (this machine's / read-only, writes in
    # memory), debian, an image built with `qemubox image build`, or an ext4/qcow2 file.
    image: str = "minimal"
    overlay: str | None = None  # where a disk root's writes go (default: with the VM)
    # Start from a snapshot of a booted guest (recorded by the first start of its kind)
    # when the session allows it (see vm/snapshot.py); otherwise boot.
    snapshot: bool = True

    def validate(self) -> ValidSession:
        return validate(self)


@dataclass(frozen=True)
class ValidSession:
    """A session checked and normalised: sizes in bytes, paths resolved, devices as they
    go into the machine plan."""

    memory: int
    cpus: int
    balloon: bool
    shares: tuple[SharePlan, ...]
    disks: tuple[DiskPlan, ...]  # an ephemeral disk's path is "" until planned
    network: str
    ports: tuple[PortPlan, ...]
    kernel: str | None
    modules: Path | None
    timeout: float | None
    boot_timeout: float
    accel: str
    console_log: Path | None
    image: str = "minimal"  # a name, or an image file's absolute path
    root_kind: str = "initramfs"  # initramfs, disk or share
    root_fs: str = "9p"  # a share root's
    overlay: str | None = None
    snapshot: bool = True

    def features(self) -> tuple[str, ...]:
        """What the guest needs drivers for, beyond its console and agent port."""
        fs = {s.fs for s in self.shares} | ({self.root_fs} if self.root_kind == "share" else set())
        wanted = {
            "disks": bool(self.disks) or self.root_kind == "disk",
            "shares": "9p" in fs,
            "virtiofs": "virtiofs" in fs,
            "network": self.network != "none",
            "balloon": self.balloon,
            "overlay": self.root_kind == "share",
        }
        return tuple(name for name, on in wanted.items() if on)


def _port(value: object, what: str, allow_zero: bool) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{what} must be a number, got {value!r}")
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise InputError(f"{what} must be between {low} and 65535, got {value}")
    return value


def validate(s: Session) -> ValidSession:
    """Check everything before anything starts; raises InputError naming the culprit."""
    memory = parse_size(s.memory, "memory")
    if memory < 64 << 20:
        raise InputError(f"memory {s.memory!r} is too small (at least 64M)")
    if not isinstance(s.cpus, int) or isinstance(s.cpus, bool) or not 1 <= s.cpus <= 64:
        raise InputError(f"cpus must be a whole number from 1 to 64, got {s.cpus!r}")
    if s.network not in NETWORKS:
        raise InputError(f"network must be one of {', '.join(NETWORKS)}, got {s.network!r}")
    if s.accel not in ACCELS:
        raise InputError(f"accel must be one of {', '.join(ACCELS)}, got {s.accel!r}")
    ports = tuple(
        PortPlan(_port(h, "host port", True), _port(g, "guest port", False)) for h, g in s.ports
    )
    if ports and s.network == "none":
        raise InputError("published ports need a network (restricted or user), not none")
    used_points: set[str] = set()

    def claim(point: str) -> None:
        if point in used_points:
            raise InputError(f"two mounts at {point}")
        used_points.add(point)

    shares, tags = [], set()
    for i, share in enumerate(s.shares):
        host = Path(share.host_path)
        if not host.is_dir():
            raise InputError(f"share host path is not a directory: {share.host_path}")
        point = _absolute_guest_path(share.mount_point, "share mount point")
        claim(point)
        tag = share.mount_tag or f"share{i}"
        if not _TAG_RE.fullmatch(tag):
            raise InputError(f"invalid mount tag {tag!r}: 1 to 31 letters, digits, '_', '.' or '-'")
        if tag in tags:
            raise InputError(f"mount tag {tag!r} is used twice")
        tags.add(tag)
        if share.security_model not in SECURITY_MODELS:
            raise InputError(
                f"security_model must be one of {', '.join(SECURITY_MODELS)}, "
                f"got {share.security_model!r}"
            )
        if share.fs not in SHARE_FS:
            raise InputError(f"share fs must be one of {', '.join(SHARE_FS)}, got {share.fs!r}")
        if share.fs == "virtiofs":
            _check_virtiofs(share.host_path)
        shares.append(
            SharePlan(
                tag, str(host.resolve()), point, share.read_only, share.security_model, share.fs
            )
        )
    disks = []
    for i, disk in enumerate(s.disks):
        size = disk_size(disk.size)
        point = _absolute_guest_path(disk.mount_point, "disk mount point")
        claim(point)
        path = Path(disk.path) if disk.path else None
        if path is not None:
            if path.exists() and not path.is_file():
                raise InputError(f"disk path exists and is not a file: {disk.path}")
            if not path.exists() and not path.parent.is_dir():
                raise InputError(f"disk path's directory does not exist: {path.parent}")
        resolved = str(path.resolve()) if path else ""
        disks.append(DiskPlan(resolved, size, point, f"qbxdisk{i}", ephemeral=path is None))
    modules = None
    if s.modules:
        modules = Path(s.modules)
        if not (modules / "modules.dep").is_file():
            raise InputError(f"--modules {s.modules}: no modules.dep there")
    if s.timeout is not None and s.timeout <= 0:
        raise InputError(f"timeout must be positive, got {s.timeout}")
    image, root_kind = catalog.check(s.image)
    overlay = _overlay(s.overlay) if root_kind == "disk" else None
    return ValidSession(
        memory=memory,
        cpus=s.cpus,
        balloon=s.balloon,
        shares=tuple(shares),
        disks=tuple(disks),
        network=s.network,
        ports=ports,
        kernel=s.kernel,
        modules=modules,
        timeout=s.timeout,
        boot_timeout=s.boot_timeout,
        accel=s.accel,
        console_log=_console_log(s.console_log),
        image=image,
        root_kind=root_kind,
        root_fs=_root_fs() if root_kind == "share" else "9p",
        overlay=overlay,
        snapshot=bool(s.snapshot),
    )


def _root_fs() -> str:
    """How a host root is shared: virtiofs where virtiofsd can run (root), else 9p."""
    return "virtiofs" if os.geteuid() == 0 and os.access(VIRTIOFSD, os.X_OK) else "9p"


def _overlay(path: str | None) -> str | None:
    """A disk root's overlay file: absolute, in an existing directory; one that exists
    already must be qcow2 (it is the root as a stopped sandbox left it)."""
    if not path:
        return None
    p = Path(path).expanduser().absolute()
    if not p.parent.is_dir():
        raise InputError(f"overlay {path!r}: directory {p.parent} does not exist")
    if p.exists() and not catalog.is_qcow2(p):
        raise InputError(f"overlay {path!r} exists and is not a qcow2 file")
    return str(p)


def _check_virtiofs(host_path: str) -> None:
    if not os.access(VIRTIOFSD, os.X_OK):
        raise InputError(
            f"virtiofs share {host_path}: {VIRTIOFSD} is missing (apt-get install qemu-system-x86)"
        )
    if os.geteuid() != 0:
        raise InputError(
            f"virtiofs share {host_path}: virtiofsd must run as root; share it over 9p instead"
        )


def _console_log(path: str | None) -> Path | None:
    """Where to keep the console log: a file in an existing directory."""
    if not path:
        return None
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise InputError(f"console log {path!r} is a directory")
    if not p.parent.is_dir():
        raise InputError(f"console log {path!r}: directory {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise InputError(f"console log {path!r}: directory {p.parent} is not writable")
    return p


def session_to_dict(s: Session) -> dict:
    """A session as plain data (JSON), for records."""
    from dataclasses import asdict

    data = asdict(s)
    data["ports"] = [list(p) for p in s.ports]
    return data


def session_from_dict(data: dict) -> Session:
    """The session a record holds (see :func:`session_to_dict`)."""
    known = {f for f in Session.__dataclass_fields__}
    values = {k: v for k, v in data.items() if k in known}
    values["shares"] = [FSShare(**sh) for sh in data.get("shares", [])]
    values["disks"] = [Disk(**d) for d in data.get("disks", [])]
    values["ports"] = [(int(h), int(g)) for h, g in data.get("ports", [])]
    return Session(**values)
