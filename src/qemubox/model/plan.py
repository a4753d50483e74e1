"""The machine plan: the one description of a VM, as plain data.

``make_plan`` is a pure function of (validated session, kernel, accelerator verdict,
paths): it starts, probes, compiles and creates nothing. The plan serialises to JSON with a
schema version and loads back equal, so it can be a sandbox's record; ``compat_key`` is the
part of it that decides what a booted guest looks like (for snapshots).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from qemubox import arch as arches
from qemubox.errors import InputError
from qemubox.model.egress import Egress

SCHEMA = 4
# Schemas this qemubox reads: older ones lack only fields that have defaults (1: root.source,
# root.config: a plan of 1 never boots a container image; 2: egress, egress_log; 3:
# crash_dumps, vmcore). 4 also has a vmcoreinfo device where its arch has one.
READS = (1, 2, 3, 4)


@dataclass(frozen=True)
class KernelPlan:
    image: str
    version: str
    arch: str
    modules: str | None  # lib/modules/<version>, when the kernel has modules
    config: str | None  # its .config, when known
    description: str
    mmio: bool  # it can find virtio-mmio devices, so the lean machine fits
    boot: str | None = None  # what QEMU boots, when not image: its vmlinux (kernel.pvh)

    @property
    def booted(self) -> str:
        """The file given to QEMU's ``-kernel``."""
        return self.boot or self.image


@dataclass(frozen=True)
class SharePlan:
    """A host directory shared over 9p (served by QEMU) or virtiofs (served by virtiofsd)."""

    tag: str
    host_path: str
    mount_point: str
    read_only: bool
    security_model: str  # 9p's
    fs: str = "9p"


@dataclass(frozen=True)
class DiskPlan:
    """An ext4 disk image, found by the guest through its serial."""

    path: str
    size: int
    mount_point: str
    serial: str
    ephemeral: bool  # made for this machine, removed with it


ROOT_ID = "qemubox-root"  # the root disk's serial, the root share's tag


@dataclass(frozen=True)
class RootPlan:
    """The guest's root. ``initramfs``: the busybox initramfs itself (in memory).
    ``disk``: an ext4 image booted through a qcow2 overlay that takes every write, so the
    image (``base``) is never written. ``share``: a host directory (``base``) shared
    read-only, under an overlay whose writes stay in guest memory."""

    kind: str = "initramfs"
    image: str = "minimal"  # as the user named it (model/session.py: DEFAULT_IMAGE)
    base: str = ""
    base_format: str = "raw"  # a disk's: raw or qcow2
    overlay: str = ""  # a disk's writes; "" until planned
    fs: str = "virtiofs"  # a share's: 9p or virtiofs
    recipe: dict | None = None  # how to build ``base`` when it is missing
    source: str = ""  # a container image's (skopeo's name): unpacked into ``base`` when missing
    config: dict | None = None  # a container image's run-time config (image/ociconfig.py)

    def kernel_argument(self) -> str:
        """What tells the agent (``qemubox.root=``) where its root is."""
        if self.kind == "disk":
            return f"qemubox.root=disk:{ROOT_ID}"
        if self.kind == "share":
            return f"qemubox.root={self.fs}:{ROOT_ID}"
        return ""

    def share(self) -> SharePlan | None:
        """A share root as the share it is exported as."""
        if self.kind != "share":
            return None
        return SharePlan(ROOT_ID, self.base, "/", True, "none", self.fs)


@dataclass(frozen=True)
class SnapshotPlan:
    """A booted guest saved as its RAM (a file on tmpfs) and its device state. ``record``:
    boot with RAM shared into ``ram`` and save the state once the agent is ready.
    ``restore``: map ``ram`` privately (the clone's writes stay its own; the template never
    changes) and load ``state`` instead of booting. ``resume``: load ``state``, which holds
    the whole RAM too (a paused sandbox's; ``ram`` is the template it was restored from, if
    it was)."""

    role: str  # record, restore or resume
    key: str
    ram: str
    state: str


@dataclass(frozen=True)
class PortPlan:
    host: int  # 0 until prepared: any free port
    guest: int


class Capability(StrEnum):
    """What may be done with a running machine beyond running it."""

    SNAPSHOT = "start from a snapshot"  # boot once, restore its saved state later
    POOL = "be pooled"  # restored ahead by a QEMU started before the session is known
    PAUSE = "be paused"  # saved whole to a file, its QEMU ended, resumed later


# The one table of what rules a capability out: (capability, test, why). A new device or
# root kind is decided here, for every capability at once.
LIMITS: tuple[tuple[Capability, Callable[[MachinePlan], bool], str], ...] = (
    *(
        (
            capability,
            lambda p: not p.arch_record.migrates,
            "QEMU does not restore this arch's machines reliably: a restored guest may hang",
        )
        for capability in Capability
    ),
    (
        Capability.SNAPSHOT,
        lambda p: p.shared_memory,
        "virtiofs needs guest RAM shared with virtiofsd",
    ),
    (Capability.SNAPSHOT, lambda p: p.balloon, "a balloon and a RAM template do not mix"),
    (
        Capability.SNAPSHOT,
        lambda p: p.root.kind != "initramfs",
        "its root is mounted while it boots",
    ),
    (
        Capability.SNAPSHOT,
        lambda p: bool(p.ports),
        "published ports are bound by the template too",
    ),
    (
        Capability.POOL,
        lambda p: bool(p.shares or p.disks) or p.root.kind != "initramfs",
        "it has shares or disks, whose host paths QEMU opens as it starts",
    ),
    (
        Capability.POOL,
        lambda p: p.egress is not None,
        "its egress rules are kept by a proxy that starts with its QEMU",
    ),
    (
        Capability.POOL,
        lambda p: p.crash_dumps,
        "its crash dumps are taken by a helper that starts with its QEMU",
    ),
    (
        Capability.PAUSE,
        lambda p: p.shared_memory,
        "its virtiofs shares cannot be saved (virtiofsd's state is not)",
    ),
    (
        Capability.PAUSE,
        lambda p: bool(p.shares) or p.root.kind == "share",
        "it has 9p shares mounted, which QEMU cannot save",
    ),
)

CLIENT_SLOTS = 4  # one more than the commands a user runs side by side: `stop` needs one


def _required(f) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


@dataclass(frozen=True)
class MachinePlan:
    arch: str
    machine: str  # microvm, q35 or virt
    accel: str  # kvm or tcg
    accel_note: str  # why TCG on a host with /dev/kvm, if so
    cpus: int
    memory_mib: int
    kernel: KernelPlan
    initrd: str
    features: tuple[str, ...]  # what the guest needs modules for: disks, shares, ...
    append: str
    runtime_dir: str  # sockets, pid, console log
    shares: tuple[SharePlan, ...] = ()
    disks: tuple[DiskPlan, ...] = ()
    network: str = "none"  # none, restricted, user, allow or deny (model/session.py)
    ports: tuple[PortPlan, ...] = ()
    balloon: bool = False
    run_as: str | None = None  # the user QEMU drops to once its files are open (when root)
    slots: int = CLIENT_SLOTS  # clients that can be attached at once
    root: RootPlan = field(default_factory=RootPlan)
    snapshot: SnapshotPlan | None = None
    egress: dict | None = None  # allow or deny's rules (model/egress.py: Egress.to_dict)
    egress_log: str = ""  # where the egress proxy writes its decisions ("": runtime_dir's)
    # Whether QEMU holds a guest that resets itself (a kernel panic) for a helper to save its
    # memory (vm/crash.py), and where to ("": where a command says, else nowhere)
    crash_dumps: bool = False
    vmcore: str = ""
    schema: int = field(default=SCHEMA)

    # --- places -----------------------------------------------------------------------------

    def qmp_socket(self, slot: int) -> str:
        return f"{self.runtime_dir}/qmp{slot}.sock"

    def agent_socket(self, slot: int) -> str:
        return f"{self.runtime_dir}/agent{slot}.sock"

    def virtiofs_socket(self, share: int) -> str:
        return f"{self.runtime_dir}/fs{share}.sock"

    def read_only_view(self, share: int) -> str:
        """Where a read-only virtiofs share is mounted for its virtiofsd alone."""
        return f"{self.runtime_dir}/ro{share}"

    @property
    def exported(self) -> tuple[SharePlan, ...]:
        """Every directory the host exports: the session's shares, then a share root."""
        root = self.root.share()
        return self.shares + ((root,) if root else ())

    @property
    def shared_memory(self) -> bool:
        """Whether guest RAM must be a shared memory file (virtiofsd maps it)."""
        return any(s.fs == "virtiofs" for s in self.exported)

    @property
    def keeps_writes(self) -> bool:
        """Whether something the guest writes outlives the machine on the host: a disk that
        is not ephemeral, a writable share, a disk root (its overlay may be kept). When not,
        the guest has nothing to sync, and it may be stopped at once."""
        return (
            self.root.kind == "disk"
            or any(not d.ephemeral for d in self.disks)
            or any(not s.read_only for s in self.shares)
        )

    def cannot(self, capability: Capability) -> str | None:
        """Why this machine cannot do ``capability``, if it cannot (see LIMITS)."""
        return next(
            (why for cap, rules_out, why in LIMITS if cap is capability and rules_out(self)), None
        )

    @property
    def netdev(self) -> str:
        """QEMU's user networking as the guest sees it: none, restricted or user (egress
        rules are kept on the host, outside the guest)."""
        return "user" if self.network in ("allow", "deny") else self.network

    @property
    def egress_rules(self) -> Egress | None:
        return Egress.from_dict(self.egress) if self.egress else None

    @property
    def egress_log_path(self) -> str:
        return self.egress_log or f"{self.runtime_dir}/egress.log"

    @property
    def console_log(self) -> str:
        return f"{self.runtime_dir}/console.log"

    @property
    def crash_monitor(self) -> str:
        """The socket of the crash helper's monitor, to which QEMU connects as it starts."""
        return f"{self.runtime_dir}/crash.sock"

    @property
    def arch_record(self) -> arches.Arch:
        return arches.get(self.arch)

    # --- as data ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MachinePlan:
        if data.get("schema") not in READS:
            raise InputError(
                f"a machine plan of schema {data.get('schema')!r}; this qemubox reads "
                f"{', '.join(map(str, READS))}"
            )
        try:
            values = {f.name: data[f.name] for f in fields(cls) if f.name in data or _required(f)}
            values["kernel"] = KernelPlan(**values["kernel"])
            values["features"] = tuple(values["features"])
            values["shares"] = tuple(SharePlan(**s) for s in values["shares"])
            values["disks"] = tuple(DiskPlan(**d) for d in values["disks"])
            values["ports"] = tuple(PortPlan(**pt) for pt in values["ports"])
            if "root" in values:
                values["root"] = RootPlan(**values["root"])
            if values.get("snapshot"):
                values["snapshot"] = SnapshotPlan(**values["snapshot"])
            return cls(**values)
        except (KeyError, TypeError) as err:
            raise InputError(f"a malformed machine plan: {err}") from None

    @classmethod
    def from_json(cls, text: str) -> MachinePlan:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise InputError(f"a machine plan that is not JSON: {err}") from None
        if not isinstance(data, dict):
            raise InputError("a machine plan must be a JSON object")
        return cls.from_dict(data)

    def compat_key(self) -> str:
        """What decides the booted guest: kernel, initramfs, size, machine, accelerator,
        device layout. Two plans with one key can share a booted guest's snapshot. Every
        field is either here or in OUTSIDE_KEY, with the reason (a test holds the plan's
        fields to that: a new one forces the decision, and a bump of SCHEMA)."""
        layout = {
            "schema": self.schema,
            "arch": self.arch,
            "machine": self.machine,
            "accel": self.accel,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "kernel": self.kernel.image,
            "version": self.kernel.version,
            "initrd": self.initrd,
            "append": self.append,
            "shares": [(s.tag, s.read_only, s.security_model, s.fs) for s in self.shares],
            "disks": [(d.serial, d.size) for d in self.disks],  # a disk's size is the device's
            "network": self.netdev,
            "slots": self.slots,
            "balloon": self.balloon,
            "root": [self.root.kind, self.root.base, self.root.fs],
        }
        return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()


# The plan's fields that do not decide a booted guest, and why.
OUTSIDE_KEY = {
    "accel_note": "a message for the user",
    "kernel.arch": "the machine and the kernel file say it",
    "kernel.modules": "modules are loaded after boot, by the session",
    "kernel.config": "the kernel file says what it was built with",
    "kernel.description": "a message for the user",
    "kernel.mmio": "the machine says it",
    "kernel.boot": "the kernel file (image) says it",
    "features": "the devices say it",
    "runtime_dir": "where a machine's sockets are, per machine",
    "shares.host_path": "what a share shows is set up after boot",
    "shares.mount_point": "mounted after boot",
    "disks.path": "what a disk holds is opened as the machine starts",
    "disks.mount_point": "mounted after boot",
    "disks.ephemeral": "what happens to the file afterwards",
    "ports": "snapshots are refused with published ports (LIMITS)",
    "run_as": "the host user QEMU drops to",
    "root.image": "the name the user gave base",
    "root.base_format": "base says it",
    "root.overlay": "where a disk root's writes go, per machine",
    "root.recipe": "how base is made, not what it is",
    "root.source": "where base is unpacked from, not what it is",
    "root.config": "how commands start, after boot",
    "snapshot": "what a start does with the key, not the guest",
    "egress": "kept on the host, by QEMU's shim and the egress proxy",
    "egress_log": "where the egress proxy writes, on the host",
    "crash_dumps": "a host-side monitor, and what QEMU does once the guest has reset",
    "vmcore": "where the host saves a crashed guest's memory",
}


def kernel_cmdline(arch: arches.Arch, accel: str, tsc_khz: int | None, extra: str = "") -> str:
    """The guest's command line. Under TCG an x86 guest's TSC runs at the host's rate; saying
    so spares a calibration that fails when the host is busy (microvm has no HPET or PM
    timer to calibrate against, and the boot then hangs)."""
    line = f"console={arch.console} panic=-1 quiet loglevel=3 rdinit=/init"
    if accel == "tcg" and arch.name == "x86_64" and tsc_khz:
        line += f" tsc_early_khz={tsc_khz}"
    return f"{line} {extra}".strip()


def make_plan(
    session,
    kernel: KernelPlan,
    accel: str,
    accel_note: str,
    runtime_dir: str,
    initrd: str,
    tsc_khz: int | None,
    run_as: str | None = None,
    root: RootPlan | None = None,
) -> MachinePlan:
    """The plan of a VM for a validated session (``vm.spec.ValidSession``), whose root is
    ``root`` (the initramfs by default). Pure."""
    record = arches.get(kernel.arch)
    if session.vmcore and not record.vmcoreinfo:
        have = ", ".join(a.name for a in arches.ARCHES.values() if a.vmcoreinfo)
        raise InputError(
            f"--vmcore: {record.name}'s machines have no vmcoreinfo device, so its dumps would "
            f"not open in drgn or crash (these have: {have})"
        )
    disks = tuple(
        d if d.path else replace(d, path=f"{runtime_dir}/disk{i}.img")
        for i, d in enumerate(session.disks)
    )
    root = root or RootPlan()
    if root.kind == "disk" and not root.overlay:
        root = replace(root, overlay=f"{runtime_dir}/root.qcow2")
    return MachinePlan(
        arch=record.name,
        machine=record.machine(kernel.mmio),
        accel=accel,
        accel_note=accel_note,
        cpus=session.cpus,
        memory_mib=session.memory >> 20,
        kernel=kernel,
        initrd=initrd,
        features=session.features(),
        append=kernel_cmdline(
            record, accel, tsc_khz, f"{root.kernel_argument()} {session.kernel_args}".strip()
        ),
        runtime_dir=runtime_dir,
        shares=session.shares,
        disks=disks,
        network=session.network,
        ports=session.ports,
        egress=session.egress.to_dict() if session.egress else None,
        egress_log=str(session.egress_log or ""),
        crash_dumps=session.crash_dumps and record.vmcoreinfo,
        vmcore=str(session.vmcore or ""),
        balloon=session.balloon,
        run_as=run_as,
        root=root,
    )
