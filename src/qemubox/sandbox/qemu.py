"""The QEMU command line, built by pure functions from a VM description."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GUEST_IP = "10.0.2.15"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"


def escape(value: str | Path) -> str:
    """A value inside a QEMU ``key=value,...`` option: commas are doubled, so a value can
    never end early and smuggle in another option."""
    return str(value).replace(",", ",,")


@dataclass(frozen=True)
class ShareDevice:
    tag: str
    host_path: Path
    read_only: bool
    security_model: str


@dataclass(frozen=True)
class DiskDevice:
    path: Path
    serial: str


@dataclass(frozen=True)
class VMConfig:
    arch: str  # x86_64 or arm64
    machine: str  # microvm, q35 or virt
    accel: str  # kvm or tcg
    cpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    append: str
    qmp_socket: Path
    agent_socket: Path
    console_log: Path
    shares: tuple[ShareDevice, ...] = ()
    disks: tuple[DiskDevice, ...] = ()
    network: str = "none"  # none, restricted, user
    forwards: tuple[tuple[int, int], ...] = ()  # (host port, guest port)
    balloon: bool = False


QEMU_BINARY = {"x86_64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}


def _device(cfg: VMConfig, kind: str) -> str:
    """virtio device model names: -device on virtio-mmio machines, -pci on PCI ones."""
    suffix = "device" if cfg.machine == "microvm" else "pci"
    return f"virtio-{kind}-{suffix}"


def _cpu(accel: str) -> str:
    """KVM passes the host's CPU through; TCG emulates every feature it can."""
    return "host" if accel == "kvm" else "max"


def machine_args(cfg: VMConfig) -> list[str]:
    if cfg.machine == "microvm":
        machine = "microvm,rtc=on"
    elif cfg.machine == "virt":
        machine = "virt"
    else:
        machine = cfg.machine
    cpu = _cpu(cfg.accel)
    return [
        "-machine",
        machine,
        "-accel",
        cfg.accel,
        "-cpu",
        cpu,
        "-smp",
        str(cfg.cpus),
        "-m",
        f"{cfg.memory_mib}M",
    ]


def share_args(cfg: VMConfig) -> list[str]:
    args = []
    for i, share in enumerate(cfg.shares):
        fsdev = (
            f"local,id=fs{i},path={escape(share.host_path)},security_model={share.security_model}"
        )
        if share.read_only:
            fsdev += ",readonly=on"
        args += [
            "-fsdev",
            fsdev,
            "-device",
            f"{_device(cfg, '9p')},fsdev=fs{i},mount_tag={escape(share.tag)}",
        ]
    return args


def disk_args(cfg: VMConfig) -> list[str]:
    args = []
    for i, disk in enumerate(cfg.disks):
        args += [
            "-drive",
            f"file={escape(disk.path)},if=none,id=disk{i},format=raw,cache=writeback,discard=unmap",
            "-device",
            f"{_device(cfg, 'blk')},drive=disk{i},serial={escape(disk.serial)}",
        ]
    return args


def network_args(cfg: VMConfig) -> list[str]:
    if cfg.network == "none":
        return []
    netdev = "user,id=net0"
    if cfg.network == "restricted":
        netdev += ",restrict=on"
    for host, guest in cfg.forwards:
        netdev += f",hostfwd=tcp:127.0.0.1:{host}-{GUEST_IP}:{guest}"
    return ["-netdev", netdev, "-device", f"{_device(cfg, 'net')},netdev=net0"]


def qemu_args(cfg: VMConfig) -> list[str]:
    """The whole command line, as an argument list (never a shell string)."""
    args = [
        QEMU_BINARY[cfg.arch],
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        *machine_args(cfg),
        "-kernel",
        str(cfg.kernel),
        "-initrd",
        str(cfg.initrd),
        "-append",
        cfg.append,
        "-chardev",
        f"file,id=console,path={escape(cfg.console_log)}",
        "-serial",
        "chardev:console",
        "-chardev",
        f"socket,id=qmp,path={escape(cfg.qmp_socket)},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"socket,id=agent,path={escape(cfg.agent_socket)}",
        "-device",
        _device(cfg, "serial"),
        "-device",
        "virtserialport,chardev=agent,name=qemubox.agent",
        "-device",
        _device(cfg, "rng"),
        *share_args(cfg),
        *disk_args(cfg),
        *network_args(cfg),
    ]
    if cfg.balloon:
        args += ["-device", f"{_device(cfg, 'balloon')},id=balloon0"]
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
    machine = "virt" if arch == "arm64" else "microvm,rtc=on"
    args = [
        QEMU_BINARY[arch],
        "-machine",
        machine,
        "-accel",
        accel,
        "-cpu",
        _cpu(accel),
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


def kernel_cmdline(arch: str, accel: str, tsc_khz: int | None, extra: str = "") -> str:
    """The guest's command line. Under TCG an x86 guest's TSC runs at the host's rate; saying
    so spares a calibration that fails when the host is busy (microvm has no HPET or PM
    timer to calibrate against, and the boot then hangs)."""
    console = "ttyAMA0" if arch == "arm64" else "ttyS0"
    line = f"console={console} panic=-1 quiet loglevel=3 rdinit=/init"
    if accel == "tcg" and arch == "x86_64" and tsc_khz:
        line += f" tsc_early_khz={tsc_khz}"
    return f"{line} {extra}".strip()


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
