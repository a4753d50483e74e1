"""What a sandbox guest kernel must have: the required feature list, and which of its options
must be built in rather than modules."""

from __future__ import annotations

from dataclasses import dataclass

# The sandbox's required features, section by section, in the order of its reference.
REQUIRED: dict[str, tuple[str, ...]] = {
    "Virtualization support": (
        "HYPERVISOR_GUEST",
        "PARAVIRT",
        "PARAVIRT_SPINLOCKS",
        "KVM_GUEST",
    ),
    "VirtIO drivers": (
        "VIRTIO",
        "VIRTIO_PCI",
        "VIRTIO_PCI_LEGACY",
        "VIRTIO_MMIO",
        "VIRTIO_MMIO_CMDLINE_DEVICES",
    ),
    "VirtIO block devices": ("VIRTIO_BLK", "SCSI_VIRTIO"),
    "VirtIO network": ("VIRTIO_NET",),
    "VirtIO console": ("VIRTIO_CONSOLE", "HW_RANDOM_VIRTIO"),
    "VirtIO memory balloon": ("VIRTIO_BALLOON",),
    "Other VirtIO features": ("VIRTIO_INPUT",),
    "9P file system": ("NET_9P", "NET_9P_VIRTIO", "9P_FS", "9P_FS_POSIX_ACL", "9P_FS_SECURITY"),
    "Networking": ("NET", "INET", "PACKET", "UNIX", "IPV6", "NETDEVICES", "NET_CORE"),
    "Ext file systems": (
        "EXT4_FS",
        "EXT4_FS_POSIX_ACL",
        "EXT4_FS_SECURITY",
        "EXT3_FS",
        "EXT2_FS",
    ),
    "Virtual file systems": (
        "TMPFS",
        "TMPFS_POSIX_ACL",
        "PROC_FS",
        "SYSFS",
        "DEVTMPFS",
        "DEVTMPFS_MOUNT",
    ),
    "Console and TTY": ("TTY", "SERIAL_8250", "SERIAL_8250_CONSOLE", "PRINTK"),
    "Initrd": (
        "BLK_DEV_INITRD",
        "RD_GZIP",
        "RD_BZIP2",
        "RD_LZMA",
        "RD_XZ",
        "RD_LZO",
        "RD_LZ4",
        "RD_ZSTD",
    ),
    "PCI": ("PCI", "PCI_MSI"),
    "ACPI": ("ACPI",),
    "Modules": ("MODULES", "MODULE_UNLOAD"),
    "Binary formats": ("BINFMT_ELF", "BINFMT_SCRIPT"),
    "System features": ("POSIX_TIMERS", "FUTEX", "EPOLL", "SIGNALFD", "TIMERFD", "EVENTFD"),
}

# Options that are no use as modules: they are needed before anything can load a module,
# when the kernel boots without an initramfs that loads them.
_ROOT_DISK = "the root disk must be readable before any module can be loaded from it"
_SHARE_ROOT = "a 9p root or module share must mount before any module can be loaded"
_CONSOLE = "the console must work from the first message, before init runs"
MUST_BE_BUILT_IN: dict[str, str] = {
    "VIRTIO": _ROOT_DISK,
    "VIRTIO_PCI": _ROOT_DISK,
    "VIRTIO_MMIO": _ROOT_DISK,
    "VIRTIO_BLK": _ROOT_DISK,
    "EXT4_FS": _ROOT_DISK,
    "NET_9P": _SHARE_ROOT,
    "NET_9P_VIRTIO": _SHARE_ROOT,
    "9P_FS": _SHARE_ROOT,
    "SERIAL_8250": _CONSOLE,
}


@dataclass(frozen=True)
class Requirement:
    name: str
    section: str
    value: str | None  # from the config; None when absent
    ok: bool
    why: str = ""  # when not ok although present

    def line(self) -> str:
        if self.ok:
            return f"✓ CONFIG_{self.name} is enabled"
        line = f"✗ CONFIG_{self.name} is NOT enabled"
        return f"{line} (=m, but must be built in: {self.why})" if self.why else line


def check_requirements(values: dict[str, str]) -> list[Requirement]:
    """Each required option with its verdict; ``=m`` is enabled unless it must be built in."""
    out = []
    for section, names in REQUIRED.items():
        for name in names:
            value = values.get(name)
            why = ""
            if value == "y":
                ok = True
            elif value == "m":
                why = MUST_BE_BUILT_IN.get(name, "")
                ok = not why
            else:
                ok = False
            out.append(Requirement(name, section, value, ok, why))
    return out
