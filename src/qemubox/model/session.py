"""A session as validated: what the user asked for, checked and normalised into the devices
of a machine plan. The choices and defaults every door offers (the CLI's options, matrix
files, the Python API) come from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qemubox.model.plan import DiskPlan, PortPlan, SharePlan

SECURITY_MODELS = ("passthrough", "mapped-xattr", "mapped-file", "none")
SHARE_FS = ("9p", "virtiofs")
NETWORKS = ("none", "restricted", "user")
ACCELS = ("auto", "kvm", "tcg")
DEFAULT_MEMORY = "512M"
DEFAULT_CPUS = 1
DEFAULT_TIMEOUT = 60.0  # a command's, seconds
DEFAULT_BOOT_TIMEOUT = 60.0
DEFAULT_IMAGE = "minimal"
MIN_MEMORY = 64 << 20
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
    network: str
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
