"""Every per-architecture fact, in one record per architecture."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from qemubox.errors import InputError


@dataclass(frozen=True)
class Arch:
    name: str  # qemubox's name (x86_64, armhf, ...): --arch, matrices, manifests
    karch: str  # the kernel's ARCH (make ARCH=...)
    srcarch: str  # the arch/ directory of the kernel tree
    uname: str  # what `uname -m` prints in the guest
    image: str  # the boot image make builds, relative to the build directory
    qemu_binary: str
    qemu_package: str  # the Debian package with qemu_binary
    pci_machine: str
    console: str  # the serial console's device name in the guest
    debian_arch: str
    debian_kernel: str | None  # Debian's metapackage for its kernel (None: Debian 12 has none)
    oci_arch: str  # what an OCI image config's "architecture" says (Go's GOARCH)
    cross_prefix: str  # CROSS_COMPILE on a host of another arch (Debian's cross compilers)
    elf_machine: int  # e_machine of its vmlinux
    config_symbol: str  # the .config symbol that says a kernel is of this arch
    mmio_machine: str | None = None  # a machine with virtio-mmio (no PCI), when QEMU has one
    # where its boot image (not ELF) says what it is (None: nowhere that tells it apart; an
    # i386 bzImage is told from x86_64's by its setup header)
    image_magic: tuple[int, bytes] | None = None
    boots_vmlinux: bool = False  # whether QEMU boots its ELF vmlinux
    pvh: bool = False  # its vmlinux boots through its PVH entry point (x86_64), so needs one
    fragments: tuple[str, ...] = ()  # shipped fragments every guest kernel of this arch needs
    firmware: str | None = None  # what boots a disk when no -kernel is given (None: QEMU's)
    mmio_machine_options: str = ""  # what the lean machine is given (-machine NAME,OPTIONS)
    pci_machine_options: str = ""  # and the other one
    tcg_cpu: str = "max"  # the CPU QEMU emulates (KVM passes the host's through)
    bus: str = "pci"  # the virtio transport of its devices: -device virtio-KIND-BUS
    # PCI slots whose interrupts the guest kernel routes, when not every slot's are: its
    # PCI devices are put there, eight functions a slot (None: QEMU places them)
    pci_slots: tuple[int, ...] | None = None
    # Debian's package with a static busybox for it (None: none, built from Debian's source)
    busybox_package: str | None = "busybox-static"
    bits: int = 64
    kvm_hosts: tuple[str, ...] = ()  # other hosts whose KVM runs it (x86_64's runs i386)
    # Whether QEMU carries a running guest across a migration whole, as snapshots, pools and
    # pauses need (QEMU 7.2 loses RISC-V's timer state, at times the pseries decrementer's and
    # a Malta's PCI interrupts: a restored guest may hang)
    migrates: bool = True
    # Whether its machines have fw_cfg with DMA, and so QEMU's vmcoreinfo device: a dump of
    # the guest's memory then carries the kernel's VMCOREINFO (its kernels get vmcore.config)
    vmcoreinfo: bool = False

    @property
    def cross_package(self) -> str:
        """The Debian package with its cross compiler (gcc-x86-64-linux-gnu, ...)."""
        return "gcc-" + self.cross_prefix.rstrip("-").replace("_", "-")

    @property
    def cross_libc(self) -> str:
        """The Debian package with its libc (for the static guest agent)."""
        return f"libc6-dev-{self.debian_arch}-cross"

    def machine(self, mmio: bool) -> str:
        """The QEMU machine: the lean virtio-mmio one when the kernel can use it."""
        return self.mmio_machine if mmio and self.mmio_machine else self.pci_machine

    def machine_arg(self, machine: str) -> str:
        """``-machine``'s value for ``machine``, with the options this arch gives it."""
        options = (
            self.mmio_machine_options if machine == self.mmio_machine else self.pci_machine_options
        )
        return f"{machine},{options}" if options else machine

    def device(self, kind: str, machine: str) -> str:
        """A virtio device's model on ``machine``: virtio-KIND-device on virtio-mmio
        machines, virtio-KIND-pci on PCI ones, virtio-KIND-ccw on s390x's channel I/O."""
        bus = "device" if machine == self.mmio_machine else self.bus
        return f"virtio-{kind}-{bus}"

    def compiler(self) -> str:
        """The C compiler that builds user programs for this arch on this host."""
        return "gcc" if self.name == host().name else self.cross_prefix + "gcc"

    def kernel_hint(self) -> str:
        """How to get a kernel for this arch when none is given."""
        return f"build one with 'qemubox kernel build --arch {self.name}', or give --kernel"


ARCHES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(
            name="x86_64",
            karch="x86_64",
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
            elf_machine=62,
            config_symbol="CONFIG_X86_64",
            image_magic=(0x202, b"HdrS"),
            boots_vmlinux=True,
            pvh=True,
            fragments=("x86_64",),
            vmcoreinfo=True,
            mmio_machine_options="rtc=on",
        ),
        Arch(
            name="arm64",
            karch="arm64",
            srcarch="arm64",
            uname="aarch64",
            image="arch/arm64/boot/Image",
            qemu_binary="qemu-system-aarch64",
            qemu_package="qemu-system-arm",
            pci_machine="virt",
            console="ttyAMA0",
            debian_arch="arm64",
            debian_kernel="linux-image-arm64",
            oci_arch="arm64",
            cross_prefix="aarch64-linux-gnu-",
            elf_machine=183,
            config_symbol="CONFIG_ARM64",
            image_magic=(56, b"ARM\x64"),
            fragments=("arm64",),
            vmcoreinfo=True,
            firmware="/usr/share/qemu-efi-aarch64/QEMU_EFI.fd",
        ),
        Arch(
            name="armhf",
            karch="arm",
            srcarch="arm",
            uname="armv7l",
            image="arch/arm/boot/zImage",
            qemu_binary="qemu-system-arm",
            qemu_package="qemu-system-arm",
            pci_machine="virt",
            # A kernel without LPAE reaches no PCI window above 4 GiB.
            pci_machine_options="highmem=off",
            tcg_cpu="cortex-a15",
            console="ttyAMA0",
            debian_arch="armhf",
            debian_kernel="linux-image-armmp",
            oci_arch="arm",
            cross_prefix="arm-linux-gnueabihf-",
            elf_machine=40,
            config_symbol="CONFIG_ARM",
            image_magic=(0x24, b"\x18\x28\x6f\x01"),
            fragments=("armhf",),
            vmcoreinfo=True,
            bits=32,
        ),
        Arch(
            name="i386",
            karch="i386",
            srcarch="x86",
            uname="i686",
            image="arch/x86/boot/bzImage",
            qemu_binary="qemu-system-i386",
            qemu_package="qemu-system-x86",
            pci_machine="q35",
            console="ttyS0",
            debian_arch="i386",
            debian_kernel="linux-image-686",
            oci_arch="386",
            cross_prefix="i686-linux-gnu-",
            elf_machine=3,
            config_symbol="CONFIG_X86_32",
            fragments=("i386",),
            vmcoreinfo=True,
            bits=32,
            kvm_hosts=("x86_64",),
        ),
        Arch(
            name="ppc64le",
            karch="powerpc",
            srcarch="powerpc",
            uname="ppc64le",
            image="vmlinux",
            qemu_binary="qemu-system-ppc64",
            qemu_package="qemu-system-ppc",
            pci_machine="pseries",
            # Virtual Open Firmware (no SLOF to run under emulation), and the speculation
            # mitigations TCG does not emulate declared absent rather than warned about.
            pci_machine_options="x-vof=on,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,"
            "cap-ccf-assist=off",
            tcg_cpu="power9",
            console="hvc0",
            debian_arch="ppc64el",
            debian_kernel="linux-image-powerpc64le",
            oci_arch="ppc64le",
            cross_prefix="powerpc64le-linux-gnu-",
            elf_machine=21,
            config_symbol="CONFIG_PPC64",
            boots_vmlinux=True,
            fragments=("ppc64le",),
            migrates=False,
        ),
        Arch(
            name="s390x",
            karch="s390",
            srcarch="s390",
            uname="s390x",
            image="arch/s390/boot/bzImage",
            qemu_binary="qemu-system-s390x",
            qemu_package="qemu-system-misc",
            pci_machine="s390-ccw-virtio",
            tcg_cpu="max",
            bus="ccw",
            console="ttysclp0",
            debian_arch="s390x",
            debian_kernel="linux-image-s390x",
            oci_arch="s390x",
            cross_prefix="s390x-linux-gnu-",
            elf_machine=22,
            config_symbol="CONFIG_S390",
            image_magic=(0x10008, b"S390EP"),
            fragments=("s390x",),
        ),
        Arch(
            name="riscv64",
            karch="riscv",
            srcarch="riscv",
            uname="riscv64",
            image="arch/riscv/boot/Image",
            qemu_binary="qemu-system-riscv64",
            qemu_package="qemu-system-misc",
            pci_machine="virt",  # OpenSBI, QEMU's default firmware, boots the kernel
            tcg_cpu="rv64",  # QEMU 7.2 has no "max" here
            console="ttyS0",
            debian_arch="riscv64",
            debian_kernel=None,
            oci_arch="riscv64",
            cross_prefix="riscv64-linux-gnu-",
            elf_machine=243,
            config_symbol="CONFIG_RISCV",
            image_magic=(0x38, b"RSC\x05"),
            fragments=("riscv64",),
            busybox_package=None,  # its virt machine's fw_cfg has no DMA: no vmcoreinfo
            migrates=False,
        ),
        Arch(
            name="mips64el",
            karch="mips",
            srcarch="mips",
            uname="mips64",
            image="vmlinux",
            qemu_binary="qemu-system-mips64el",
            qemu_package="qemu-system-mips",
            pci_machine="malta",
            pci_slots=(18, 19, 20, 21),  # Malta's four PCI slots: others have no IRQ
            tcg_cpu="5KEc",
            console="ttyS0",
            debian_arch="mips64el",
            debian_kernel="linux-image-5kc-malta",
            oci_arch="mips64le",
            cross_prefix="mips64el-linux-gnuabi64-",
            elf_machine=8,
            config_symbol="CONFIG_MIPS",
            boots_vmlinux=True,
            fragments=("mips64el",),
            migrates=False,  # a restored Malta loses its PCI interrupts at times
        ),
    )
}

# Other spellings of an ARCH (uname -m, Debian), and ARCH values whose kernel tree folds
# into another arch/ directory (for kconfig work on any architecture).
_ALIASES = {
    "amd64": "x86_64",
    "aarch64": "arm64",
    "x86-64": "x86_64",
    "arm": "armhf",
    "armv7l": "armhf",
    "i686": "i386",
    "ppc64el": "ppc64le",
    "mips64": "mips64el",
}
_SRCARCH = {"sparc64": "sparc", "parisc64": "parisc"}


def normalize(name: str | None) -> str:
    """A kernel ARCH value; ``None`` is the host's."""
    if not name:
        return _ALIASES.get(platform.machine(), platform.machine())
    return _ALIASES.get(name, name)


def find(name: str) -> Arch | None:
    """The record of an arch named by qemubox, Debian, uname or the kernel (make's ARCH)."""
    return ARCHES.get(normalize(name)) or next(
        (a for a in ARCHES.values() if a.karch == name), None
    )


def srcarch(name: str) -> str:
    """The arch/ directory of any ARCH value (not only the ones qemubox boots)."""
    record = find(name)
    return record.srcarch if record else _SRCARCH.get(name, name)


def karch(name: str) -> str:
    """make's ARCH for any arch name (qemubox's, or the kernel's own as it is)."""
    record = ARCHES.get(normalize(name))
    return record.karch if record else name


def host() -> Arch:
    name = normalize(None)
    if name not in ARCHES:
        raise InputError(f"qemubox runs on {', '.join(ARCHES)} hosts, not {name}")
    return ARCHES[name]


def by_elf_machine(machine: int, bits: int = 64) -> Arch | None:
    return next((a for a in ARCHES.values() if a.elf_machine == machine and a.bits == bits), None)


def by_image(head: bytes) -> Arch | None:
    """The arch whose boot image starts with ``head`` (its first 1 KiB or so)."""
    return next(
        (
            a
            for a in ARCHES.values()
            if a.image_magic and head[a.image_magic[0] :].startswith(a.image_magic[1])
        ),
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
