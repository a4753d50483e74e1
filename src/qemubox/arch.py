"""Every per-architecture fact, in one record per architecture."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from qemubox.errors import InputError


@dataclass(frozen=True)
class Arch:
    name: str  # the kernel's ARCH
    srcarch: str  # the arch/ directory of the kernel tree
    uname: str  # what `uname -m` prints in the guest
    image: str  # the boot image make builds, relative to the build directory
    qemu_binary: str
    qemu_package: str  # the Debian package with qemu_binary
    mmio_machine: str | None  # a machine with virtio-mmio (no PCI), when QEMU has one
    pci_machine: str
    console: str  # the serial console's device name in the guest
    debian_arch: str
    debian_kernel: str  # Debian's metapackage for its generic kernel
    oci_arch: str  # what an OCI image config's "architecture" says (Go's GOARCH)
    cross_prefix: str  # CROSS_COMPILE on a host of another arch (Debian's cross compilers)
    cross_package: str  # the Debian package with that compiler
    cross_libc: str  # the Debian package with its libc (for the static guest agent)
    elf_machine: int  # e_machine of its vmlinux
    config_symbol: str  # the .config symbol that says a kernel is of this arch
    image_magic: tuple[int, bytes]  # where its boot image (not ELF) says what it is
    boots_vmlinux: bool  # whether QEMU boots its ELF vmlinux (x86's PVH entry)
    fragments: tuple[str, ...] = ()  # shipped fragments every guest kernel of this arch needs
    firmware: str | None = None  # what boots a disk when no -kernel is given (None: QEMU's)
    mmio_machine_options: str = ""  # what the lean machine is given (-machine NAME,OPTIONS)

    def machine(self, mmio: bool) -> str:
        """The QEMU machine: the lean virtio-mmio one when the kernel can use it."""
        return self.mmio_machine if mmio and self.mmio_machine else self.pci_machine

    def machine_arg(self, machine: str) -> str:
        """``-machine``'s value for ``machine``, with the options this arch gives it."""
        if machine == self.mmio_machine and self.mmio_machine_options:
            return f"{machine},{self.mmio_machine_options}"
        return machine

    def compiler(self) -> str:
        """The C compiler that builds for this arch on this host."""
        return "gcc" if self.srcarch == host().srcarch else self.cross_prefix + "gcc"


ARCHES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(
            name="x86_64",
            srcarch="x86",
            uname="x86_64",
            image="vmlinux",  # booted through its PVH entry (the x86_64 fragment)
            qemu_binary="qemu-system-x86_64",
            qemu_package="qemu-system-x86",
            mmio_machine="microvm",
            pci_machine="q35",
            console="ttyS0",
            debian_arch="amd64",
            debian_kernel="linux-image-amd64",
            oci_arch="amd64",
            cross_prefix="x86_64-linux-gnu-",
            cross_package="gcc-x86-64-linux-gnu",
            cross_libc="libc6-dev-amd64-cross",
            elf_machine=62,
            config_symbol="CONFIG_X86_64",
            image_magic=(0x202, b"HdrS"),
            boots_vmlinux=True,
            fragments=("x86_64",),
            mmio_machine_options="rtc=on",
        ),
        Arch(
            name="arm64",
            srcarch="arm64",
            uname="aarch64",
            image="arch/arm64/boot/Image",
            qemu_binary="qemu-system-aarch64",
            qemu_package="qemu-system-arm",
            mmio_machine=None,
            pci_machine="virt",
            console="ttyAMA0",
            debian_arch="arm64",
            debian_kernel="linux-image-arm64",
            oci_arch="arm64",
            cross_prefix="aarch64-linux-gnu-",
            cross_package="gcc-aarch64-linux-gnu",
            cross_libc="libc6-dev-arm64-cross",
            elf_machine=183,
            config_symbol="CONFIG_ARM64",
            image_magic=(56, b"ARM\x64"),
            boots_vmlinux=False,
            fragments=("arm64",),
            firmware="/usr/share/qemu-efi-aarch64/QEMU_EFI.fd",
        ),
    )
}

# Other spellings of an ARCH (uname -m, Debian), and ARCH values whose kernel tree folds
# into another arch/ directory (for kconfig work on any architecture).
_ALIASES = {"amd64": "x86_64", "aarch64": "arm64", "x86-64": "x86_64"}
_SRCARCH = {"x86_64": "x86", "i386": "x86", "sparc64": "sparc", "parisc64": "parisc"}


def normalize(name: str | None) -> str:
    """A kernel ARCH value; ``None`` is the host's."""
    if not name:
        return _ALIASES.get(platform.machine(), platform.machine())
    return _ALIASES.get(name, name)


def srcarch(name: str) -> str:
    """The arch/ directory of any ARCH value (not only the ones qemubox boots)."""
    return _SRCARCH.get(name, name)


def host() -> Arch:
    name = normalize(None)
    if name not in ARCHES:
        raise InputError(f"qemubox runs on {', '.join(ARCHES)} hosts, not {name}")
    return ARCHES[name]


def by_elf_machine(machine: int) -> Arch | None:
    return next((a for a in ARCHES.values() if a.elf_machine == machine), None)


def by_image(head: bytes) -> Arch | None:
    """The arch whose boot image starts with ``head`` (its first 1 KiB or so)."""
    return next(
        (a for a in ARCHES.values() if head[a.image_magic[0] :].startswith(a.image_magic[1])),
        None,
    )


def by_config(config_text: str) -> Arch | None:
    """The arch a kernel ``.config`` is for (among those qemubox boots)."""
    lines = set(config_text.splitlines())
    return next((a for a in ARCHES.values() if f"{a.config_symbol}=y" in lines), None)


def by_debian_arch(name: str) -> Arch:
    """The record of Debian's architecture ``name`` (amd64, arm64, ...)."""
    for a in ARCHES.values():
        if a.debian_arch == name:
            return a
    raise InputError(f"unknown Debian architecture {name!r}")


def get(name: str | None) -> Arch:
    """The record of an architecture qemubox builds and boots; InputError otherwise."""
    arch = normalize(name)
    if arch not in ARCHES:
        raise InputError(f"unknown architecture {name!r} (qemubox knows {', '.join(ARCHES)})")
    return ARCHES[arch]
