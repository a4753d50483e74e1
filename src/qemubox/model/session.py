"""A session as validated: what the user asked for, checked and normalised into the devices
of a machine plan. The choices and defaults every door offers (the CLI's options, matrix
files, the Python API) come from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qemubox.model.egress import Egress
from qemubox.model.plan import DiskPlan, PortPlan, SharePlan

SECURITY_MODELS = ("passthrough", "mapped-xattr", "mapped-file", "none")
SHARE_FS = ("9p", "virtiofs")
# --net: allow=LIST and deny=LIST take egress rules (model/egress.py)
NETWORKS = ("none", "restricted", "user", "allow", "deny")
ACCELS = ("auto", "kvm", "tcg")
DEFAULT_MEMORY = "512M"
DEFAULT_CPUS = 1
DEFAULT_TIMEOUT = 60.0  # a command's, seconds
DEFAULT_BOOT_TIMEOUT = 60.0
DEFAULT_IMAGE = "minimal"
MIN_MEMORY = 64 << 20
KERNEL_ARGS_MAX = 1024  # characters of --append
# What qemubox's own command line decides: the console it reads, the init it runs (its
# agent), its root and what a panic does
OWN_KERNEL_ARGS = ("console", "rdinit", "init", "root", "qemubox.root", "panic")
MAX_CPUS = 64


@dataclass(frozen=True)
class ValidSession:
    """A session checked and normalised: sizes in bytes, paths resolved, devices as they
    go into the machine plan."""

    memory: int
    cpus: int
    balloon: bool
    shares: tuple[SharePlan, ...]
    disks: tuple[DiskPlan, ...]  # an ephemeral disk's path is "" until planned
    network: str  # one of NETWORKS
    ports: tuple[PortPlan, ...]
    kernel: str | None
    modules: Path | None
    timeout: float | None
    boot_timeout: float
    accel: str
    console_log: Path | None
    image: str = DEFAULT_IMAGE  # a name, or an image file's absolute path
    root_kind: str = "initramfs"  # initramfs, disk or share
    root_fs: str = "9p"  # a share root's
    overlay: str | None = None
    snapshot: bool = True
    arch: str | None = None  # the guest's (None: the host's, or the given kernel's)
    egress: Egress | None = None  # allow or deny's rules
    egress_log: Path | None = None  # where the egress proxy writes its decisions
    # Whether a crashed guest's memory can be saved (vm/crash.py), and where it goes when
    # the whole session says so (named sandboxes: each command says)
    crash_dumps: bool = False
    vmcore: Path | None = None
    kernel_args: str = ""  # added to the guest kernel's command line

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
