"""The QEMU command of ``vm run``, a pure function of the VM's config and the run's choices.

config.py's options come first and win: qemubox adds ``-machine``, ``-accel`` and
``-cpu`` only when they name none, and ``-append`` only when neither they nor the options
after ``--`` pass one. Every path qemubox puts into an option is escaped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qemubox.qemu.cmdline import AGENT_PORT, escape
from qemubox.vmpy.config import VmConfig
from qemubox.vmpy.guestfiles import KEYS_NAME
from qemubox.vmpy.kernel import HostKernel

MODULES_TAG = "modules"  # the 9p tag the guest's modules mounter looks for
_STDIO_SERIAL = ("mon:stdio", "stdio")


@dataclass(frozen=True)
class RunPlan:
    config: VmConfig
    kernel: HostKernel | None = None
    initrd: Path | None = None
    append: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # after `--`, appended as they are
    accel: str = "tcg"
    qmp: Path | None = None
    pidfile: Path | None = None
    gdb_port: int | None = None
    console: Path | None = None  # detached: the serial console's socket; None: the terminal
    console_log: Path | None = None
    name: str | None = None
    firmware: Path | None = None  # booting the disk without -kernel, where QEMU has none
    ssh_key: Path | None = None  # a public key handed to the guest (fw_cfg) at every boot
    agent: Path | None = None  # the socket of a virtio-serial port for the guest agent
    accel_note: str = ""  # why TCG on a host with /dev/kvm, if so


def _names(options: tuple[str, ...], *flags: str) -> bool:
    return any(word in flags for word in options)


def _machine_names_accel(options: tuple[str, ...]) -> bool:
    return any(
        "accel=" in options[i + 1]
        for i, word in enumerate(options[:-1])
        if word in ("-machine", "-M")
    )


def detached(options: tuple[str, ...], console: Path, log: Path | None) -> tuple[str, ...]:
    """The options with the serial console moved from the terminal to a socket any
    ``vm console`` can attach to (its output also kept in ``log``), and no display."""
    out: list[str] = []
    moved = False
    skip = False
    for i, word in enumerate(options):
        if skip:
            skip = False
            continue
        nxt = options[i + 1] if i + 1 < len(options) else None
        if word == "-serial" and nxt in _STDIO_SERIAL and not moved:
            out += ["-serial", "chardev:console"]
            moved = skip = True
        elif word == "-monitor" and nxt == "stdio":
            skip = True
        elif word == "-nographic":
            out += ["-display", "none"]
        else:
            out.append(word)
    if moved:
        chardev = f"socket,id=console,path={escape(console)},server=on,wait=off"
        if log is not None:
            chardev += f",logfile={escape(log)},logappend=on"
        out = ["-chardev", chardev, *out]
    return tuple(out)


def cmdline(plan: RunPlan) -> list[str]:
    """The kernel command line: config.py's, every ``-a``, and ``nokaslr`` for gdb."""
    words = [*plan.config.kernel_cmdline, *plan.append]
    if plan.gdb_port is not None and plan.kernel is not None and "nokaslr" not in words:
        words.append("nokaslr")  # so vmlinux's addresses are the running kernel's
    return words


def qemu_command(plan: RunPlan) -> list[str]:
    cfg = plan.config
    options = cfg.qemu_options
    if plan.console is not None:
        options = detached(options, plan.console, plan.console_log)
    given = options + plan.extra
    args = [cfg.arch.qemu_binary, *options]
    if not _names(given, "-machine", "-M"):
        args += ["-machine", cfg.arch.machine_arg(cfg.arch.pci_machine)]
    if not (_names(given, "-accel", "-enable-kvm") or _machine_names_accel(given)):
        args += ["-accel", plan.accel]
    if not _names(given, "-cpu"):
        args += ["-cpu", "host" if plan.accel == "kvm" else cfg.arch.tcg_cpu]
    if plan.name and not _names(given, "-name"):
        args += ["-name", plan.name]
    if plan.kernel is not None:
        args += ["-kernel", str(plan.kernel.image)]
        args += [
            "-virtfs",
            f"local,path={escape(plan.kernel.modules)},security_model=none,readonly=on,"
            f"mount_tag={MODULES_TAG}",
        ]
    elif plan.firmware and not _names(given, "-bios", "-kernel", "-pflash"):
        args += ["-bios", str(plan.firmware)]
    if plan.initrd is not None:
        args += ["-initrd", str(plan.initrd)]
    if (plan.kernel is not None or plan.append) and not _names(given, "-append"):
        args += ["-append", " ".join(cmdline(plan))]
    if plan.ssh_key is not None:
        args += ["-fw_cfg", f"name={KEYS_NAME},file={escape(plan.ssh_key)}"]
    if plan.agent is not None:
        args += [
            "-device",
            "virtio-serial-pci,id=qemubox-serial",
            "-chardev",
            f"socket,id=qemubox-agent,path={escape(plan.agent)},server=on,wait=off",
            "-device",
            f"virtserialport,chardev=qemubox-agent,name={AGENT_PORT.format(slot=0, slots=1)}",
        ]
    if plan.qmp is not None:
        args += ["-qmp", f"unix:{escape(plan.qmp)},server=on,wait=off"]
    if plan.pidfile is not None:
        args += ["-pidfile", str(plan.pidfile)]
    if plan.gdb_port is not None:
        args += ["-gdb", f"tcp:127.0.0.1:{plan.gdb_port}"]
    return [*args, *plan.extra]
