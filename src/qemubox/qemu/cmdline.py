"""The QEMU command line, built by pure functions from a machine plan.

Every user string is escaped for QEMU's option syntax. QEMU owns the sockets (a QMP
monitor and an agent virtio-serial port per client slot) as listening chardevs, so any
process can attach to a running machine, as many at once as it has slots.
"""

from __future__ import annotations

from pathlib import Path

from qemubox import arch as arches
from qemubox.errors import InputError
from qemubox.model.net import GUEST_IP
from qemubox.model.plan import ROOT_ID, MachinePlan

AGENT_PORT = "qemubox.agent.{slot}-of-{slots}"  # the agent finds its ports by this name


def escape(value: str | Path) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled, so a value can
    never end early and smuggle in another option."""
    return str(value).replace(",", ",,")


def _device(plan: MachinePlan, kind: str) -> str:
    """virtio device model names, as the machine's transport wants them."""
    return plan.arch_record.device(kind, plan.machine)


def _cpu(record: arches.Arch, accel: str) -> str:
    """KVM passes the host's CPU through; TCG emulates the arch's richest CPU its kernels
    run on."""
    return "host" if accel == "kvm" else record.tcg_cpu


def machine_args(plan: MachinePlan) -> list[str]:
    machine = plan.arch_record.machine_arg(plan.machine)
    memory = []
    if plan.snapshot and plan.snapshot.ram:  # RAM in a file: shared while recorded, then private
        share = "on" if plan.snapshot.role == "record" else "off"
        machine += ",memory-backend=ram0"
        memory = [
            "-object",
            f"memory-backend-file,id=ram0,size={plan.memory_mib}M,"
            f"mem-path={escape(plan.snapshot.ram)},share={share}",
        ]
    elif plan.shared_memory:  # virtiofsd maps guest RAM: a shared memory file
        machine += ",memory-backend=ram0"
        memory = [
            "-object",
            f"memory-backend-memfd,id=ram0,size={plan.memory_mib}M,share=on",
        ]
        if plan.machine == "microvm":  # vhost-user devices speak virtio 1.0, not legacy mmio
            memory += ["-global", "virtio-mmio.force-legacy=false"]
    return [
        *memory,
        "-machine",
        machine,
        "-accel",
        plan.accel,
        "-cpu",
        _cpu(plan.arch_record, plan.accel),
        "-smp",
        str(plan.cpus),
        "-m",
        f"{plan.memory_mib}M",
    ]


def share_args(plan: MachinePlan) -> list[str]:
    args = []
    for i, share in enumerate(plan.exported):
        if share.fs == "virtiofs":
            fs = _device(plan, "fs").replace("virtio-", "vhost-user-", 1)
            args += [
                "-chardev",
                f"socket,id=fs{i},path={escape(plan.virtiofs_socket(i))}",
                "-device",
                f"{fs},chardev=fs{i},tag={escape(share.tag)}",
            ]
            continue
        fsdev = (
            f"local,id=fs{i},path={escape(share.host_path)},security_model={share.security_model}"
        )
        if share.read_only:
            fsdev += ",readonly=on"
        if share.tag == ROOT_ID:  # a whole tree of host file systems: no inode clashes
            fsdev += ",multidevs=remap"
        args += [
            "-fsdev",
            fsdev,
            "-device",
            f"{_device(plan, '9p')},fsdev=fs{i},mount_tag={escape(share.tag)}",
        ]
    return args


def _drive(plan: MachinePlan, ident: str, path: str, fmt: str, serial: str) -> list[str]:
    return [
        "-drive",
        # A host I/O error (a full host filesystem) is the guest's I/O error, reported as
        # an event: QEMU's default pauses the VM silently. auto-read-only=off: the image
        # stays open read-write while a save stops the machine, instead of being reopened
        # read-only and then read-write by path, which QEMU may no longer do once it has
        # dropped root (-runas); a snapshot or pause of a machine with disks needs that.
        f"file={escape(path)},if=none,id={ident},format={fmt},cache=writeback,"
        "auto-read-only=off,discard=unmap,werror=report,rerror=report",
        "-device",
        f"{_device(plan, 'blk')},drive={ident},serial={escape(serial)}",
    ]


def disk_args(plan: MachinePlan) -> list[str]:
    """A disk root (its qcow2 overlay, which names the image it reads from), then the
    session's disks."""
    args = []
    if plan.root.kind == "disk":
        args += _drive(plan, "root", plan.root.overlay, "qcow2", ROOT_ID)
    for i, disk in enumerate(plan.disks):
        args += _drive(plan, f"disk{i}", disk.path, "raw", disk.serial)
    return args


def network_args(plan: MachinePlan) -> list[str]:
    if plan.netdev == "none":
        return []
    netdev = "user,id=net0"
    if plan.netdev == "restricted":
        netdev += ",restrict=on"
    for port in plan.ports:
        netdev += f",hostfwd=tcp:127.0.0.1:{port.host}-{GUEST_IP}:{port.guest}"
    return ["-netdev", netdev, "-device", f"{_device(plan, 'net')},netdev=net0"]


def qemu_args(plan: MachinePlan) -> list[str]:
    """The whole command line, as an argument list (never a shell string)."""
    args = [
        plan.arch_record.qemu_binary,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        *machine_args(plan),
        "-kernel",
        plan.kernel.booted,
        "-initrd",
        plan.initrd,
        "-append",
        plan.append,
        "-chardev",
        f"file,id=console,path={escape(plan.console_log)}{_console_append(plan)}",
        "-serial",
        "chardev:console",
        *client_args(plan),
        "-device",
        _device(plan, "rng"),
        *share_args(plan),
        *disk_args(plan),
        *network_args(plan),
    ]
    if plan.balloon:
        args += ["-device", f"{_device(plan, 'balloon')},id=balloon0"]
    args += crash_args(plan)
    if plan.snapshot and plan.snapshot.role in ("restore", "resume"):
        args += ["-incoming", "defer"]  # the state comes over QMP (see vm/snapshot.py)
    return _placed(args + confinement_args(plan), plan.arch_record.pci_slots)


def crash_args(plan: MachinePlan) -> list[str]:
    """The vmcoreinfo device, where the machine has fw_cfg: the guest says there where its
    VMCOREINFO is, and every dump of its memory carries it. With crash dumps, a monitor for
    the crash helper (QEMU connects to it) and a guest that resets (a kernel panic, whose
    -no-reboot makes a shutdown) held paused for it, instead of QEMU ending."""
    args = ["-device", "vmcoreinfo"] if plan.arch_record.vmcoreinfo else []
    if plan.crash_dumps:
        args += [
            "-chardev",
            f"socket,id=crash,path={escape(plan.crash_monitor)}",
            "-mon",
            "chardev=crash,mode=control",
            "-action",
            "shutdown=pause",
        ]
    return args


def _placed(args: list[str], slots: tuple[int, ...] | None) -> list[str]:
    """The PCI devices of ``args`` given addresses in ``slots``, when the machine routes
    interrupts of those slots only: device k goes to slot k mod n, function k div n (each
    slot multifunction; its functions share the slot's interrupt)."""
    if not slots:
        return args
    out, k = [], 0
    for i, arg in enumerate(args):
        if i and args[i - 1] == "-device" and arg.split(",", 1)[0].endswith("-pci"):
            slot, function = slots[k % len(slots)], k // len(slots)
            if function > 7:
                raise InputError(f"more PCI devices than this machine has slots for ({k + 1})")
            arg += f",addr={slot:#x}.{function}" + (",multifunction=on" if not function else "")
            k += 1
        out.append(arg)
    return out


def _console_append(plan: MachinePlan) -> str:
    """A restored guest's console log goes on from the one its boot wrote (put in place
    before QEMU starts), as the guest's own console would."""
    return ",append=on" if plan.snapshot and plan.snapshot.role != "record" else ""


def client_args(plan: MachinePlan) -> list[str]:
    """One QMP monitor and one agent port per client slot, each a listening socket."""
    args = ["-device", _device(plan, "serial")]
    for k in range(plan.slots):
        args += [
            "-chardev",
            f"socket,id=qmp{k},path={escape(plan.qmp_socket(k))},server=on,wait=off",
            "-mon",
            f"chardev=qmp{k},mode=control",
            "-chardev",
            f"socket,id=agent{k},path={escape(plan.agent_socket(k))},server=on,wait=off",
            "-device",
            f"virtserialport,chardev=agent{k},name={AGENT_PORT.format(slot=k, slots=plan.slots)}",
        ]
    return args


def confinement_args(plan: MachinePlan) -> list[str]:
    """QEMU's own seccomp filter, always; and, when qemubox is root, a drop to an
    unprivileged user once QEMU has opened its files (kernel, disks, sockets, console).
    QEMU changes user after it installs its filter, so set*id calls stay allowed when it
    must change user; afterwards it holds no privilege to regain."""
    elevate = "allow" if plan.run_as else "deny"
    args = [
        "-sandbox",
        f"on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny",
    ]
    if plan.run_as:
        args += ["-runas", plan.run_as]
    return args


def bare_boot_args(
    arch: str,
    accel: str,
    kernel: Path | str,
    append: str,
    serial: str,
    memory_mib: int = 256,
    initrd: Path | str | None = None,
) -> list[str]:
    """QEMU booting a kernel with nothing but a serial console: the KVM probe, the bare
    floor of the benchmarks, the builder's boot tests."""
    record = arches.get(arch)
    machine = record.machine_arg(record.mmio_machine or record.pci_machine)
    args = [
        record.qemu_binary,
        "-machine",
        machine,
        "-accel",
        accel,
        "-cpu",
        _cpu(record, accel),
        "-m",
        f"{memory_mib}M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        serial,
        "-kernel",
        str(kernel),
    ]
    if initrd is not None:
        args += ["-initrd", str(initrd)]
    return [*args, "-append", append]


def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz, if it can be read."""
    try:
        return int(open("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read().strip())
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None
