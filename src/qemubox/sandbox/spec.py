"""What a user asks for: a Session with its shares and disks, validated before anything starts."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from qemubox import arch as arches
from qemubox.errors import InputError
from qemubox.image import catalog
from qemubox.model.egress import parse_network
from qemubox.model.plan import DiskPlan, PortPlan, SharePlan
from qemubox.model.session import (
    ACCELS,
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_CPUS,
    DEFAULT_IMAGE,
    DEFAULT_MEMORY,
    DEFAULT_TIMEOUT,
    KERNEL_ARGS_MAX,
    MAX_CPUS,
    MIN_MEMORY,
    OWN_KERNEL_ARGS,
    SECURITY_MODELS,
    SHARE_FS,
    ValidSession,
)
from qemubox.model.size import disk_size, whole_mib
from qemubox.qemu.virtiofs import VIRTIOFSD

# QEMU's rule for 9p mount tags: at most 31 bytes; we also keep to characters that need no
# quoting anywhere (the guest's mount options, QEMU's option syntax).
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}")


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
    memory: str | int = DEFAULT_MEMORY
    cpus: int = DEFAULT_CPUS
    balloon: bool = False
    shares: list[FSShare] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)
    # none, restricted, user, or egress rules: allow=LIST / deny=LIST (model/egress.py)
    network: str = "none"
    ports: list[tuple[int, int]] = field(default_factory=list)
    add_hosts: list[str] = field(default_factory=list)  # NAME:IP, pinned for the rules
    egress_log: str | None = None  # where egress decisions are written (default: the VM's)
    # Should the guest kernel panic, its memory is saved here (an ELF core with VMCOREINFO)
    vmcore: str | None = None
    crash_dumps: bool = False  # able to save it where a command says (named sandboxes)
    kernel_args: str = ""  # added to the guest kernel's command line (-- --append)
    kernel: str | None = None  # a path, "debian", or None for the best available
    modules: str | None = None
    timeout: float | None = DEFAULT_TIMEOUT  # default per-command timeout, seconds
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    accel: str = "auto"
    console_log: str | None = None
    # The root: minimal (the initramfs), host (this machine's / read-only, writes in
    # memory), debian, an image built with `qemubox image build`, or an ext4/qcow2 file.
    image: str = DEFAULT_IMAGE
    overlay: str | None = None  # where a disk root's writes go (default: with the VM)
    # Start from a snapshot of a booted guest (recorded by the first start of its kind)
    # when the session allows it (see vm/snapshot.py); otherwise boot.
    snapshot: bool = True
    # The guest's architecture (x86_64, arm64, armhf, i386, ppc64le, s390x, riscv64,
    # mips64el); None: the host's, or that of the kernel given.
    arch: str | None = None

    def validate(self) -> ValidSession:
        return validate(self)


def _port(value: object, what: str, allow_zero: bool) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{what} must be a number, got {value!r}")
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise InputError(f"{what} must be between {low} and 65535, got {value}")
    return value


def validate(s: Session) -> ValidSession:
    """Check everything before anything starts; raises InputError naming the culprit."""
    memory = whole_mib(s.memory, "memory")
    if memory < MIN_MEMORY:
        raise InputError(f"memory {s.memory!r} is too small (at least 64M)")
    if not isinstance(s.cpus, int) or isinstance(s.cpus, bool) or not 1 <= s.cpus <= MAX_CPUS:
        raise InputError(f"cpus must be a whole number from 1 to {MAX_CPUS}, got {s.cpus!r}")
    network, egress = parse_network(s.network, tuple(s.add_hosts))
    if s.accel not in ACCELS:
        raise InputError(f"accel must be one of {', '.join(ACCELS)}, got {s.accel!r}")
    ports = tuple(
        PortPlan(_port(h, "host port", True), _port(g, "guest port", False)) for h, g in s.ports
    )
    if ports and network == "none":
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
    guest_arch = arches.get(s.arch).name if s.arch else None
    image, root_kind = catalog.check(s.image)
    overlay = _overlay(s.overlay) if root_kind == "disk" else None
    return ValidSession(
        memory=memory,
        cpus=s.cpus,
        balloon=s.balloon,
        shares=tuple(shares),
        disks=tuple(disks),
        network=network,
        ports=ports,
        egress=egress,
        egress_log=_egress_log(s.egress_log, egress),
        crash_dumps=bool(s.crash_dumps or s.vmcore),
        kernel_args=_kernel_args(s.kernel_args),
        vmcore=writable_file(s.vmcore, "vmcore"),
        kernel=s.kernel,
        modules=modules,
        timeout=s.timeout,
        boot_timeout=s.boot_timeout,
        accel=s.accel,
        console_log=writable_file(s.console_log),
        image=image,
        root_kind=root_kind,
        root_fs=_root_fs() if root_kind == "share" else "9p",
        overlay=overlay,
        snapshot=bool(s.snapshot),
        arch=guest_arch,
    )


def _kernel_args(text: str) -> str:
    """Words for the guest kernel's command line: printable, bounded, none of qemubox's own."""
    if not isinstance(text, str):
        raise InputError(f"kernel arguments must be a string, got {text!r}")
    if len(text) > KERNEL_ARGS_MAX:
        raise InputError(f"--append: {len(text)} characters, at most {KERNEL_ARGS_MAX}")
    if any(not (" " <= c <= "~") for c in text):
        raise InputError(f"--append {text!r}: printable ASCII on one line only")
    for word in text.split():
        if word.split("=", 1)[0] in OWN_KERNEL_ARGS:
            raise InputError(f"--append {word}: qemubox sets {word.split('=', 1)[0]}= itself")
    return " ".join(text.split())


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


def writable_file(path: str | None, what: str = "console log") -> Path | None:
    """Where to write a file the host keeps (a console log, a log, a dump): a file in an
    existing, writable directory."""
    if not path:
        return None
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise InputError(f"{what} {path!r} is a directory")
    if not p.parent.is_dir():
        raise InputError(f"{what} {path!r}: directory {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise InputError(f"{what} {path!r}: directory {p.parent} is not writable")
    return p


def _egress_log(path: str | None, egress) -> Path | None:
    """Where the egress proxy writes its decisions, when not in the VM's directory."""
    if path and egress is None:
        raise InputError("--egress-log needs egress rules (--net allow=LIST or deny=LIST)")
    return writable_file(path, "egress log")


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
