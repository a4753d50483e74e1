"""A VM's ``config.py``: a Python file defining ``qemu_options`` and ``kernel_cmdline``
(lists of strings) and optionally ``qemu_arch``. Written once by ``vm create``; executed
(it may hold logic) by every command that needs it."""

from __future__ import annotations

import runpy
import traceback
from dataclasses import dataclass
from pathlib import Path

from qemubox import arch as arches
from qemubox.errors import InputError
from qemubox.model.size import parse_size


@dataclass(frozen=True)
class VmConfig:
    qemu_options: tuple[str, ...]
    kernel_cmdline: tuple[str, ...]
    arch: arches.Arch
    ssh_port: int | None  # where the guest's port 22 is forwarded on 127.0.0.1

    def option(self, *names: str) -> str | None:
        """The value of the last of ``names`` in qemu_options (``-m``, ``-smp``...)."""
        value = None
        for i, word in enumerate(self.qemu_options[:-1]):
            if word in names:
                value = self.qemu_options[i + 1]
        return value

    def cpus(self) -> int | None:
        smp = self.option("-smp")
        if smp is None:
            return 1
        first = smp.split(",")[0]
        first = first.removeprefix("cpus=")
        return int(first) if first.isdigit() else None

    def memory_bytes(self) -> int | None:
        text = self.option("-m")
        if text is None:
            return 128 << 20  # QEMU's default
        text = text.split(",")[0].removeprefix("size=")
        try:
            return parse_size(text, "-m")
        except InputError:
            return None


def render(name: str, cpus: int, memory: str, arch: arches.Arch, ssh_port: int) -> str:
    """The config.py of a new VM: virtio-net on user networking with an ssh forward, the
    virtio-blk disk beside this file, the serial console on the terminal."""
    device = "virtio-{}-pci"
    return f"""\
# qemubox VM {name!r}. `qemubox vm run {name}` executes this file as Python and reads
# qemu_options, kernel_cmdline and (optionally) qemu_arch; edit it freely, it may hold logic.
# qemubox adds -machine, -accel and -cpu (KVM where it works, TCG otherwise) unless these
# options name their own.
import os

here = os.path.dirname(os.path.abspath(__file__))
disk = os.path.join(here, {name + ".qcow2"!r}).replace(",", ",,")

# The guest's ssh port, forwarded from this port on 127.0.0.1 (`qemubox vm ssh {name}`).
ssh_port = {ssh_port}

qemu_arch = {arch.uname!r}

qemu_options = [
    '-nodefaults',
    '-nographic',
    '-serial', 'mon:stdio',

    '-smp', {str(cpus)!r},
    '-m', {memory!r},
    '-device', {device.format("rng")!r},

    # More forwards: add hostfwd=tcp:127.0.0.1:HOSTPORT-:GUESTPORT to -netdev.
    '-netdev', f'user,id=net0,hostfwd=tcp:127.0.0.1:{{ssh_port}}-:22',
    '-device', {device.format("net") + ",netdev=net0"!r},

    '-drive', f'file={{disk}},format=qcow2,if=virtio,index=0,media=disk,discard=unmap',
]

kernel_cmdline = [
    'root=/dev/vda1',
    'console={arch.console},115200',
]
"""


def _strings(value: object, what: str, path: Path) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{path}: {what} must be a list of strings")
    return tuple(value)


def load(path: Path) -> VmConfig:
    """Execute ``path`` and read its variables; a mistake in it is one line naming it."""
    try:
        found = runpy.run_path(str(path), run_name="qemubox_vm_config")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except SyntaxError as exc:
        raise InputError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:  # the user's code: whatever it raises is its mistake
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
        where = f"{path}:{frames[-1].lineno}" if frames else str(path)
        raise InputError(f"{where}: {type(exc).__name__}: {exc}") from None
    if "qemu_options" not in found or "kernel_cmdline" not in found:
        raise InputError(f"{path}: must define qemu_options and kernel_cmdline")
    options = _strings(found["qemu_options"], "qemu_options", path)
    cmdline = _strings(found["kernel_cmdline"], "kernel_cmdline", path)
    qemu_arch = found.get("qemu_arch", "x86_64")
    if not isinstance(qemu_arch, str):
        raise InputError(f"{path}: qemu_arch must be a string such as 'x86_64' or 'aarch64'")
    try:
        arch = arches.get(qemu_arch)
    except InputError as exc:
        raise InputError(f"{path}: qemu_arch: {exc}") from None
    port = found.get("ssh_port")
    if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
        raise InputError(f"{path}: ssh_port must be a port number, got {port!r}")
    return VmConfig(options, cmdline, arch, port)
