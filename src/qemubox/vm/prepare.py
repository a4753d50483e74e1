"""From a session to a machine ready to start: what to plan with (looked up, nothing
made), then the plan's effects (made, explicitly)."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

from qemubox import arch as arches
from qemubox import paths
from qemubox.apt import program
from qemubox.errors import InputError, last_line
from qemubox.guest import initramfs
from qemubox.image import catalog
from qemubox.kernel import pvh
from qemubox.kernel.artifacts import choose_kernel
from qemubox.model.plan import DiskPlan, MachinePlan, PortPlan, RootPlan, make_plan
from qemubox.model.session import ValidSession
from qemubox.qemu.accel import choose_accel
from qemubox.qemu.cmdline import host_tsc_khz


def plan_session(spec: ValidSession, runtime_dir: Path, dry_run: bool = False) -> MachinePlan:
    """Look up the kernel, the accelerator's verdict and the initramfs's place, and plan.

    With ``dry_run`` nothing is fetched, probed, compiled or created: an unprobed KVM counts
    as TCG, and Debian's kernel must already be in the cache."""
    kernel = pvh.with_pvh_boot(
        choose_kernel(spec.kernel, spec.modules, fetch=not dry_run, arch=spec.arch),
        make=not dry_run,
    )
    record = arches.get(kernel.arch)
    choice = choose_accel(
        spec.accel,
        record.qemu_binary,
        kernel.image,
        kernel.arch,
        arches.host().name,
        probe=not dry_run,
    )
    initrd = initramfs.initramfs_path(kernel, spec.features())
    root = catalog.root_plan(
        spec.image, spec.root_kind, record.debian_arch, spec.root_fs, spec.overlay or ""
    )
    return make_plan(
        spec,
        kernel,
        choice.accel,
        choice.reason,
        str(runtime_dir),
        str(initrd),
        host_tsc_khz(),
        _qemu_user(spec),
        root,
    )


QEMU_USER = "nobody"


def _qemu_user(spec: ValidSession) -> str | None:
    """Whom QEMU runs as once it has opened its files, when qemubox is root: ``nobody``.
    A 9p share is served by QEMU at run time with the host's permissions, so a session
    with 9p shares keeps root (the shared files would otherwise be read as ``nobody``);
    virtiofs shares are served by virtiofsd, not QEMU."""
    host_root_9p = spec.root_kind == "share" and spec.root_fs == "9p"
    if os.geteuid() != 0 or host_root_9p or any(s.fs == "9p" for s in spec.shares):
        return None
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        return None
    return QEMU_USER


def realize(plan: MachinePlan) -> MachinePlan:
    """The plan's effects: the initramfs (agent, modules) in the cache, the disks, free
    ports for the ones asked as 0. Returns the plan with its ports settled."""
    built = initramfs.initramfs(plan.kernel, plan.features)
    if str(built) != plan.initrd:
        raise InputError(f"the initramfs came out at {built}, planned at {plan.initrd}")
    for disk in plan.disks:
        prepare_disk(disk)
    if plan.root.kind == "disk":
        catalog.ensure_built(plan.root, plan.arch)
        make_overlay(plan.root)
    ports = tuple(PortPlan(p.host or free_port(), p.guest) for p in plan.ports)
    return replace(plan, ports=ports)


def remade(plan: MachinePlan) -> MachinePlan:
    """A plan made earlier (a paused sandbox's), with the cache files it names made again
    when they were pruned since: the vmlinux unpacked from its bzImage, its initramfs. Its
    saved RAM holds the booted guest, so what QEMU is handed only has to load, booted the
    same way (through PVH, when it was)."""
    kernel = plan.kernel
    if kernel.boot and not os.path.exists(kernel.boot):
        kernel = pvh.with_pvh_boot(replace(kernel, boot=None))
    initrd = plan.initrd
    if not os.path.exists(initrd):
        initrd = str(initramfs.initramfs(kernel, plan.features))
    return replace(plan, kernel=kernel, initrd=initrd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_disk(disk: DiskPlan, path: Path) -> None:
    """A new ext4 image of the disk's size, made aside and linked into place, so that a
    failure leaves nothing at ``path`` and an existing file is never replaced. An ephemeral
    disk must fit in the free space under it: it would otherwise fill the host's
    filesystem mid-run."""
    if disk.ephemeral:
        st = os.statvfs(path.parent)
        free = st.f_bavail * st.f_frsize
        if disk.size > free:
            raise InputError(
                f"an ephemeral disk of {disk.size >> 20} MiB does not fit in {path.parent} "
                f"({free >> 20} MiB free): ask for less, or give it a PATH elsewhere"
            )
    tmp = paths.temp_beside(path)
    try:
        with open(tmp, "xb") as fh:
            fh.truncate(disk.size)
        proc = subprocess.run(
            [program("mkfs.ext4", "e2fsprogs"), "-q", "-F", "-E", "root_owner=0:0", str(tmp)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise InputError(f"mkfs.ext4 for disk {path} failed: {proc.stderr.strip()}")
        os.link(tmp, path)
    except FileExistsError:
        raise InputError(
            f"disk {path} appeared while it was being made; it was left as it is"
        ) from None
    except OSError as err:
        raise InputError(
            f"cannot make a {disk.size >> 20} MiB disk at {path}: {err.strerror}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _check_ext4(path: Path) -> None:
    """An existing image must hold an ext4 file system the guest can mount: its magic,
    and a superblock e2fsprogs can read."""
    if not catalog.is_ext4(path):
        raise InputError(
            f"disk {path} exists but is not an ext4 image; qemubox never reformats an existing disk"
        )
    dumpe2fs = program("dumpe2fs", "e2fsprogs")
    proc = subprocess.run([dumpe2fs, "-h", str(path)], capture_output=True, text=True)
    if proc.returncode != 0 or "Filesystem features" not in proc.stdout:
        why = last_line(proc.stderr, "unreadable superblock")
        raise InputError(f"disk {path} is not a usable ext4 image: {why}")


def make_overlay(root: RootPlan) -> None:
    """A disk root's qcow2 overlay over its image, unless it is there (a stopped named
    sandbox's root, as it left it). Made aside and linked into place."""
    overlay = Path(root.overlay)
    if overlay.exists():
        return
    tmp = paths.temp_beside(overlay)
    try:
        create = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", root.base_format]
        proc = subprocess.run(
            [*create, "-b", root.base, str(tmp)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            why = last_line(proc.stderr, "failed")
            raise InputError(f"cannot make the root overlay {overlay} over {root.base}: {why}")
        os.link(tmp, overlay)
    except FileExistsError:
        pass  # made meanwhile: the same empty overlay
    finally:
        tmp.unlink(missing_ok=True)


def prepare_disk(disk: DiskPlan) -> None:
    """Make a missing disk; an existing one is used as it is, and must be ext4."""
    path = Path(disk.path)
    if not path.exists():
        _make_disk(disk, path)
    else:
        _check_ext4(path)
