"""``qemubox kernel doctor``: the common configuration problems of a guest kernel, diagnosed
from its config, its console log, or both — each with its cause and the fragment lines that
fix it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from qemubox.kernel.requirements import MUST_BE_BUILT_IN

# Module file names (as modprobe reports them) to the option that builds them.
MODULE_OPTIONS = {
    "9p": "9P_FS",
    "9pnet": "NET_9P",
    "9pnet_virtio": "NET_9P_VIRTIO",
    "virtio": "VIRTIO",
    "virtio_ring": "VIRTIO",
    "virtio_pci": "VIRTIO_PCI",
    "virtio_mmio": "VIRTIO_MMIO",
    "virtio_blk": "VIRTIO_BLK",
    "virtio_scsi": "SCSI_VIRTIO",
    "virtio_net": "VIRTIO_NET",
    "virtio_console": "VIRTIO_CONSOLE",
    "virtio_balloon": "VIRTIO_BALLOON",
    "virtio_input": "VIRTIO_INPUT",
    "virtio_rng": "HW_RANDOM_VIRTIO",
    "virtiofs": "VIRTIO_FS",
    "fuse": "FUSE_FS",
    "overlay": "OVERLAY_FS",
    "ext4": "EXT4_FS",
    "vsock": "VSOCKETS",
    "vmw_vsock_virtio_transport": "VIRTIO_VSOCKETS",
    "af_packet": "PACKET",
    "ipv6": "IPV6",
}

_NINEP = ("NET_9P", "NET_9P_VIRTIO", "9P_FS")
_BLOCK = ("BLK_DEV", "VIRTIO_BLK", "SCSI_VIRTIO")
# What any boot needs; and what a boot from an ext4 disk root without an initramfs needs
# built in (with an initramfs, as qemubox's guests have, they may be modules).
_BOOT = ("TTY", "SERIAL_8250_CONSOLE", "BLK_DEV_INITRD", "DEVTMPFS", "PROC_FS", "SYSFS")
_DISK_ROOT = ("EXT4_FS", "VIRTIO_BLK")


@dataclass
class Finding:
    title: str
    cause: str
    fix: list[str]  # fragment lines
    evidence: list[str]

    def render(self) -> str:
        lines = [f"✗ {self.title}", f"  cause: {self.cause}"]
        lines += [f"  seen: {e}" for e in self.evidence]
        if self.fix:
            lines.append("  fix (add to a fragment):")
            lines += [f"    {line}" for line in self.fix]
        return "\n".join(lines)


def _enabled(values: dict[str, str] | None, name: str, built_in: bool = False) -> bool:
    if values is None:
        return True
    value = values.get(name)
    return value == "y" or (value == "m" and not built_in)


def _lines(log: str, pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return [line.strip() for line in log.splitlines() if regex.search(line)][:3]


def _fix_lines(values: dict[str, str] | None, names: tuple[str, ...], built_in: bool) -> list[str]:
    return [
        f"CONFIG_{n}=y"
        for n in names
        if values is None or not _enabled(values, n, built_in and n in MUST_BE_BUILT_IN)
    ]


def _module_not_found(values, log) -> Finding | None:
    hits = re.findall(r"modprobe: FATAL: Module (\S+) not found", log or "")
    missing_in_config = []
    for module in dict.fromkeys(hits):
        option = MODULE_OPTIONS.get(module.replace("-", "_"))
        missing_in_config.append((module, option))
    if not hits:
        return None
    fix = [f"CONFIG_{opt}=m" for _, opt in missing_in_config if opt]
    unknown = [m for m, opt in missing_in_config if not opt]
    cause = "a feature the guest asked for is neither built in nor built as a module"
    if unknown:
        cause += (
            f"; for {', '.join(unknown)}, find the option in the kernel tree with "
            f"grep -rn 'obj-.*{unknown[0]}.o' --include=Makefile"
        )
    return Finding(
        '"modprobe: FATAL: Module not found"',
        cause,
        fix,
        _lines(log, r"modprobe: FATAL: Module"),
    )


def _ninep(values, log) -> Finding | None:
    config_bad = values is not None and not all(_enabled(values, n) for n in _NINEP)
    evidence = _lines(
        log or "",
        r"unknown filesystem type '9p'|Could not find request transport: virtio"
        r"|mount.*9p.*(No such device|failed)|9pnet.*(error|fail)",
    )
    if not (config_bad or evidence):
        return None
    missing = [n for n in _NINEP if values is not None and not _enabled(values, n)]
    cause = "9P support is not enabled" + (
        f": {', '.join('CONFIG_' + n for n in missing)} missing" if missing else ""
    )
    return Finding(
        '"Cannot mount 9p filesystem"',
        cause,
        ["CONFIG_NET=y", "CONFIG_NETWORK_FILESYSTEMS=y", *_fix_lines(values, _NINEP, False)],
        evidence,
    )


def _block(values, log) -> Finding | None:
    missing = [n for n in _BLOCK if values is not None and not _enabled(values, n)]
    transports = values is not None and not (
        _enabled(values, "VIRTIO_PCI") or _enabled(values, "VIRTIO_MMIO")
    )
    evidence = _lines(
        log or "",
        r'VFS: Cannot open root device|Unable to mount root fs|Please append a correct "root="'
        r"|/dev/vd[a-z]: No such|no virtio block device",
    )
    if log and evidence and "virtio_blk" in log:
        evidence = []  # the driver did bind: the problem lies elsewhere
    config_bad = bool(missing and "VIRTIO_BLK" in missing) or transports
    if not (config_bad or evidence):
        return None
    fix = _fix_lines(
        values,
        (
            "BLOCK",
            "BLK_DEV",
            "VIRTIO_MENU",
            "VIRTIO_PCI",
            "VIRTIO_MMIO",
            "VIRTIO_BLK",
            "SCSI",
            "SCSI_VIRTIO",
        ),
        True,
    )
    cause = "VirtIO block support is missing"
    if values is not None and transports:
        cause += " (no virtio transport: neither VIRTIO_PCI nor VIRTIO_MMIO)"
    elif missing:
        cause += f": {', '.join('CONFIG_' + n for n in missing)} missing"
    elif evidence:
        cause += " (the guest found no virtio disk: no virtio_blk driver bound)"
    return Finding('"No virtio block device detected"', cause, fix, evidence)


def _boot(values, log) -> Finding | None:
    missing = [n for n in _BOOT if values is not None and not _enabled(values, n, True)]
    evidence: list[str] = []
    if log is not None:
        if "Linux version" not in log:
            evidence.append("the console shows no 'Linux version' line: no console output")
        evidence += _lines(
            log,
            r"Kernel panic - not syncing|No working init found|Failed to execute .* \(error"
            r"|Requested init .* failed",
        )
        if (
            not evidence
            and "Run /init" not in log
            and "Run /sbin/init" not in log
            and ("Freeing unused kernel" not in log)
        ):
            evidence.append("the kernel never started init")
    if not (missing or evidence):
        return None
    cause = "essential features are missing"
    if missing:
        cause += ": " + ", ".join("CONFIG_" + n for n in missing)
    fix = [f"CONFIG_{n}=y" for n in (missing or _BOOT)]
    if any("error -8" in e for e in evidence):
        fix = ["CONFIG_BINFMT_ELF=y", "CONFIG_BINFMT_SCRIPT=y", *fix]
        cause = "init could not be executed (exec format error): ELF/script support or arch"
    return Finding('"Kernel doesn\'t boot"', cause, fix, evidence)


def _disk_root(values, log) -> Finding | None:
    """Modules where a disk root needs built-in drivers: fine with an initramfs (which
    loads them), fatal without one."""
    if values is None:
        return None
    modular = [n for n in _DISK_ROOT if values.get(n) == "m"]
    if not modular:
        return None
    names = ", ".join("CONFIG_" + n for n in modular)
    return Finding(
        '"Kernel doesn\'t boot" from a disk root without an initramfs',
        f"{names} =m: the kernel boots with an initramfs that loads them (qemubox's sandbox "
        "does), but cannot mount an ext4 root disk without one",
        [f"CONFIG_{n}=y" for n in modular],
        [],
    )


def diagnose(values: dict[str, str] | None, log: str | None) -> list[Finding]:
    """All findings for a config (values) and/or a console log."""
    checks = (_module_not_found, _ninep, _block, _boot, _disk_root)
    return [f for f in (check(values, log) for check in checks) if f is not None]
