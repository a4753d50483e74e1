"""Creating, listing and removing VMs: their directories under ``VMs``."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from qemubox import arch as arches
from qemubox import paths
from qemubox.errors import InputError, ToolError, last_line
from qemubox.model.size import parse_size
from qemubox.vm.prepare import free_port
from qemubox.vmpy import config as vmconfig
from qemubox.vmpy import control
from qemubox.vmpy.layout import VmDir

_PORT_RE = re.compile(r"^ssh_port\s*=\s*(\d+)\s*$", re.M)


def _ports_taken(vms: Path) -> set[int]:
    """The ssh ports other VMs' config.py files name (read, not executed)."""
    taken = set()
    for cfg in vms.glob("*/config.py"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            taken |= {int(p) for p in _PORT_RE.findall(cfg.read_text())}
    return taken


def _run(args: list[str], what: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ToolError(f"{what} failed: {last_line(proc.stderr)}")


def create(
    vms: Path, name: str, cpus: int, memory: str, size: str, arch: str, force: bool
) -> list[str]:
    """A new VM: its blank qcow2 disk, an ssh key and its config.py. Returns notes (what
    was kept aside with ``force``)."""
    vm = VmDir.of(vms, name)
    if cpus < 1:
        raise InputError(f"--cpu must be at least 1, got {cpus}")
    parse_size(memory, "--memory")
    size_bytes = parse_size(size, "--size")
    record = arches.get(arch)
    notes: list[str] = []
    if vm.root.exists() and any(vm.root.iterdir()):
        if not force:
            raise InputError(
                f"VM {name!r} exists ({vm.root}); --force makes it anew, keeping its disk "
                "and config.py as backups"
            )
        if control.running(vm) is not None:
            raise InputError(f"VM {name!r} is running: stop it before re-creating it")
        for old in (vm.disk, vm.config):
            if old.exists():
                backup = paths.set_aside(old)
                notes.append(f"kept the old {old.name} as {backup}")
        for derived in (vm.install_record, vm.ssh_key, vm.ssh_public_key):
            derived.unlink(missing_ok=True)
        vm.known_hosts.unlink(missing_ok=True)
    vm.root.mkdir(parents=True, exist_ok=True)
    taken = _ports_taken(vms)
    port = free_port()
    while port in taken:
        port = free_port()
    disk = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "nocow=on", str(vm.disk)]
    _run([*disk, str(size_bytes)], "qemu-img create")
    key = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"qemubox-vm-{name}"]
    _run([*key, "-f", str(vm.ssh_key)], "ssh-keygen")
    text = vmconfig.render(name, cpus, memory, record, port)
    tmp = vm.config.with_name(".config.py.tmp")
    tmp.write_text(text)
    os.replace(tmp, vm.config)
    return notes


def names(vms: Path) -> list[str]:
    if not vms.is_dir():
        return []
    return sorted(p.name for p in vms.iterdir() if (p / "config.py").is_file())


def describe(vms: Path, name: str) -> dict:
    """What ``vm ls`` shows of one VM."""
    vm = VmDir(name, vms / name)
    row: dict = {"name": name, "path": str(vm.root)}
    try:
        cfg = vmconfig.load(vm.config)
    except InputError as exc:
        row["error"] = str(exc)
    else:
        row |= {
            "arch": cfg.arch.uname,
            "cpus": cfg.cpus(),
            "memory": cfg.memory_bytes(),
            "ssh_port": cfg.ssh_port,
        }
    info = control.disk_info(vm.disk)
    row["disk_size"] = info.get("virtual-size")
    row["disk_used"] = info.get("actual-size")
    found = control.running(vm)
    row["running"] = found is not None
    row["pid"] = found.pid if found else None
    row["mode"] = found.record.get("mode") if found else None
    row["kernel"] = found.record.get("kernel") if found else None
    row["installed"] = vm.install_record.is_file()
    return row


def remove(vms: Path, name: str, force: bool) -> None:
    vm = VmDir.of(vms, name).must_exist()
    if control.running(vm) is not None:
        if not force:
            raise InputError(f"VM {name!r} is running: stop it first, or rm --force kills it")
        control.kill(vm)
    shutil.rmtree(vm.root)
    shutil.rmtree(vm.runtime, ignore_errors=True)
