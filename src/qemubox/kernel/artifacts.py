"""Which kernel a machine boots — one given by path, one qemubox built, or Debian's — and
what goes with it: its version, arch, modules and config."""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qemubox import arch as arches
from qemubox.apt import apt_download, depends, download_for_arch, program
from qemubox.errors import InputError, ToolError
from qemubox.linux.tree import is_source_tree
from qemubox.model.plan import KernelPlan
from qemubox.paths import cache_dir, fill, locked


def _kernel(
    image: Path,
    version: str,
    arch: str,
    modules: Path | None,
    config: Path | None,
    description: str,
) -> KernelPlan:
    """The record of a kernel found on disk (what a machine plan says of its kernel)."""
    return KernelPlan(
        image=str(image),
        version=version,
        arch=arch,
        modules=str(modules) if modules else None,
        config=str(config) if config else None,
        description=description,
        mmio=_finds_mmio_devices(config, modules),
    )


def config_option(config: Path, name: str) -> str:
    """``y``/``m``/``n`` for an option of a .config."""
    with open(config, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(f"CONFIG_{name}="):
                return line.split("=", 1)[1].strip()
    return "n"


def _finds_mmio_devices(config: Path | None, modules: Path | None) -> bool:
    """Whether the kernel finds virtio-mmio devices (built in, or as a module we can load),
    so that the lean microvm machine fits."""
    if config is not None:
        value = config_option(config, "VIRTIO_MMIO")
        return value == "y" or (value == "m" and modules is not None)
    if modules is not None and (modules / "modules.builtin").is_file():
        return "virtio_mmio" in (modules / "modules.builtin").read_text(errors="replace")
    return False


def bzimage_version(image: Path) -> str | None:
    """The version string an x86 bzImage carries, found as the boot protocol says: the
    setup header (magic ``HdrS`` at 0x202) holds at 0x20E the string's offset from 0x200,
    which may lie anywhere in the setup code."""
    try:
        with open(image, "rb") as fh:
            head = fh.read(0x210)
            if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
                return None
            fh.seek(int.from_bytes(head[0x20E:0x210], "little") + 0x200)
            text = fh.read(256).split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return None
    return text.split()[0] if text else None


IMAGE_HEAD = 0x10010  # enough of a boot image to tell its arch (s390x's mark is at 64 KiB)
_XLF_KERNEL_64 = 1  # the bzImage setup header's xloadflags (0x236): a 64-bit kernel


def bzimage_arch(image: Path) -> str:
    """x86_64 or i386, as a bzImage's setup header says (an older i386 one has no flag)."""
    try:
        with open(image, "rb") as fh:
            fh.seek(0x236)
            flags = int.from_bytes(fh.read(2), "little")
    except OSError:
        return "x86_64"
    return "x86_64" if flags & _XLF_KERNEL_64 else "i386"


_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU boots an x86 vmlinux through


@dataclass(frozen=True)
class ElfKernel:
    arch: str | None  # None: a machine qemubox does not boot
    version: str | None
    pvh: bool


def elf_kernel(image: Path) -> ElfKernel | None:
    """What a ``vmlinux`` (a 64-bit little-endian ELF) says of itself: its machine, the
    release in its banner, and whether it has a PVH entry; None when it is no such ELF.
    Read once per file as it is (a process starting many sandboxes asks every time)."""
    try:
        st = os.stat(image)
    except OSError:
        return None
    return _read_elf_kernel(str(image), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_elf_kernel(image: str, *identity: int) -> ElfKernel | None:
    try:
        with open(image, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if len(m) < 64 or m[:6] != b"\x7fELF\x02\x01":
                return None
            (machine,) = struct.unpack_from("<H", m, 18)
            record = arches.by_elf_machine(machine)
            arch = record.name if record else None
            return ElfKernel(arch, _banner_release(m), _has_pvh_note(m))
    except (OSError, ValueError, struct.error):
        return None


def _section(m: mmap.mmap, wanted: bytes) -> tuple[int, int]:
    """Where the section named ``wanted`` lies in the file (start, end); the whole file
    when there is no such section (or no section table)."""
    (shoff,) = struct.unpack_from("<Q", m, 40)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", m, 58)
    if not shoff or shstrndx >= shnum:
        return 0, len(m)
    (names,) = struct.unpack_from("<Q", m, shoff + shstrndx * shentsize + 24)  # sh_offset
    for n in range(shnum):
        head = shoff + n * shentsize
        (name,) = struct.unpack_from("<I", m, head)
        if m[names + name : names + name + len(wanted) + 1] == wanted + b"\0":
            at, size = struct.unpack_from("<QQ", m, head + 24)  # sh_offset, sh_size
            return at, min(at + size, len(m))
    return 0, len(m)


def _banner_release(m: mmap.mmap) -> str | None:
    at = m.find(b"Linux version ", *_section(m, b".rodata"))
    if at < 0:
        return None
    words = m[at + 14 : at + 100].split(b"\0", 1)[0].split()
    return words[0].decode(errors="replace") if words else None


def _has_pvh_note(m: mmap.mmap) -> bool:
    (phoff,) = struct.unpack_from("<Q", m, 32)
    phentsize, phnum = struct.unpack_from("<HH", m, 54)
    for n in range(phnum):
        head = phoff + n * phentsize
        (kind,) = struct.unpack_from("<I", m, head)
        if kind != _PT_NOTE:
            continue
        (at,) = struct.unpack_from("<Q", m, head + 8)  # p_offset
        end = at + struct.unpack_from("<Q", m, head + 32)[0]  # + p_filesz
        while at + 12 <= end:
            namesz, descsz, note = struct.unpack_from("<III", m, at)
            if m[at + 12 : at + 12 + namesz] == b"Xen\0" and note == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _build_tree(image: Path) -> list[Path]:
    """The kernel build tree an image lies in (``<tree>/arch/<arch>/boot/<image>``, or
    ``<tree>/vmlinux``), if any."""
    resolved = image.resolve()
    parents = resolved.parents
    if len(parents) > 3 and parents[2].name == "arch" and (parents[3] / ".config").is_file():
        return [parents[3]]
    if resolved.name == "vmlinux" and (resolved.parent / ".config").is_file():
        return [resolved.parent]
    return []


def _find_modules(image: Path, version: str, explicit: Path | None) -> Path | None:
    if explicit is not None:
        return explicit
    for candidate in (
        image.parent / "lib" / "modules" / version,  # qemubox's install layout
        *(tree / ".qemubox-modules" / "lib" / "modules" / version for tree in _build_tree(image)),
        image.parent.parent / "lib" / "modules" / version,  # a package unpacked: boot/ + lib/
        Path("/lib/modules") / version,
    ):
        if (candidate / "modules.dep").is_file():
            return candidate
        if (candidate / "kernel").is_dir():  # modules without their index (no depmod yet)
            return indexed_modules(candidate, version)
    return None


def indexed_modules(modules: Path, version: str) -> Path:
    """Modules whose directory lacks modules.dep (a package unpacked, say: its install
    script runs depmod) get an index made in the cache — a tree of links to them — never in
    the user's directory."""
    st = modules.stat()
    key = hashlib.sha256(f"{modules.resolve()}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "modules-index" / f"{version}-{key}"

    def make(tmp: Path) -> None:
        tree = tmp / "lib" / "modules" / version
        tree.mkdir(parents=True)
        for entry in modules.iterdir():
            (tree / entry.name).symlink_to(entry.resolve())
        _depmod(tmp, version, modules)

    return fill(target, make) / "lib" / "modules" / version


def _depmod(base: Path, version: str, what: Path) -> None:
    """Index ``base/lib/modules/<version>`` (modules.dep, aliases, ...)."""
    proc = subprocess.run(
        [program("depmod", "kmod"), "-b", str(base), version],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ToolError(f"depmod for the modules in {what} failed: {proc.stderr.strip()}")


def _find_config(image: Path, version: str) -> Path | None:
    for candidate in (
        image.parent / f"config-{version}",
        image.parent.parent / "boot" / f"config-{version}",
        image.parent / "config",
        *(tree / ".config" for tree in _build_tree(image)),
        Path("/boot") / f"config-{version}",
    ):
        if candidate.is_file():
            return candidate
    return None


def kernel_from_path(path: str | Path, modules: Path | None = None) -> KernelPlan:
    image = Path(path)
    if not image.is_file():
        raise InputError(f"--kernel {path}: no such file")
    version = bzimage_version(image)
    elf = None if version else elf_kernel(image)
    if version:
        arch = bzimage_arch(image)
    elif elf is not None:
        arch, version = _bootable_elf(path, elf)
    else:
        with open(image, "rb") as fh:
            found = arches.by_image(fh.read(IMAGE_HEAD))
        if found is not None and not found.boots_vmlinux:  # an Image: its name says more
            arch = found.name
            version = _named_version(image)
        if version is None:
            raise InputError(
                f"--kernel {path}: not a kernel image qemubox knows, or one whose file name "
                "does not say its version (NAME-VERSION)"
            )
    return _kernel(
        image.resolve(),
        version,
        arch,
        _find_modules(image, version, modules),
        _find_config(image, version),
        str(image),
    )


def _bootable_elf(path: str | Path, elf: ElfKernel) -> tuple[str, str]:
    """The arch and release of a ``vmlinux`` QEMU can boot; InputError for one it cannot."""
    record = arches.ARCHES.get(elf.arch or "")
    if record is None or not record.boots_vmlinux:
        booted = ", ".join(arches.ARCHES)
        hint = f"its {record.image}" if record else f"a kernel of {booted}"
        raise InputError(f"--kernel {path}: an ELF vmlinux QEMU cannot boot: give {hint}")
    if record.pvh and not elf.pvh:
        raise InputError(
            f"--kernel {path}: a vmlinux without a PVH entry (CONFIG_PVH): give its bzImage"
        )
    # A self-decompressing vmlinuz (mips) has its banner packed: its name says more.
    version = elf.version or _named_version(Path(path))
    if version is None:
        raise InputError(f"--kernel {path}: a vmlinux without a Linux version banner")
    return record.name, version


def _named_version(image: Path) -> str | None:
    """The release in a kernel file's name, as Debian names them (vmlinuz-RELEASE)."""
    name = image.resolve().name
    return name.split("-", 1)[1] if "-" in name else None


def built_kernel(arch: str) -> KernelPlan | None:
    """The newest kernel qemubox built for this arch with the sandbox fragment."""
    from qemubox.kernel.builds import list_builds

    for manifest in list_builds():
        if manifest.get("arch") != arch or "sandbox" not in manifest.get("fragments", []):
            continue
        if (found := _of_build(manifest)) is not None:
            return found
    return None


def _of_build(manifest: dict) -> KernelPlan | None:
    """The kernel of a finished build (None: its image is gone)."""
    build_dir = Path(manifest["build_dir"])
    image = build_dir / manifest["image"]
    if not image.is_file():
        return None
    modules = build_dir / ".qemubox-modules" / "lib" / "modules" / manifest["version"]
    return _kernel(
        image,
        manifest["version"],
        manifest["arch"],
        modules if (modules / "modules.dep").is_file() else None,
        build_dir / ".config",
        f"Linux {manifest['version']} built by qemubox ({manifest['profile']})",
    )


def tree_kernel(tree: Path, arch: str | None) -> KernelPlan:
    """The kernel of source tree ``tree``, built first (out of tree, cached: nothing to do
    when nothing changed, incrementally otherwise) with the default profile."""
    from qemubox.kernel.build import BuildRequest, build_kernel

    result = build_kernel(BuildRequest(source=str(tree), arch=arch, output=None))
    found = _of_build(result.manifest)
    if found is None:
        raise ToolError(f"the build of {tree} has no kernel image")
    return found


def debian_kernel(arch: str) -> KernelPlan:
    """Debian's kernel package for ``arch``, downloaded with apt-get (from the mirror of this
    host's apt sources, whatever the arch) and unpacked into the cache."""
    record = arches.get(arch)
    if record.debian_kernel is None:
        raise InputError(f"Debian 12 has no kernel package for {arch}: {record.kernel_hint()}")
    root = _debian_kernels(record)
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / ".lock"):
        kernel = cached_debian_kernel(arch)
        if kernel:
            return kernel
        foreign = record.name != arches.host().name
        state = cache_dir() / "apt" / record.debian_arch
        deps = depends(record.debian_kernel, *((record.debian_arch, state) if foreign else ()))
        m = re.search(r"Depends: (linux-image-\S+)", deps)
        if not m:
            raise ToolError(
                f"cannot find the package behind {record.debian_kernel} (apt-get update first?)"
            )
        package = m.group(1)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            if foreign:
                deb = download_for_arch(package, record.debian_arch, Path(tmp), state)
            else:
                deb = apt_download(package, Path(tmp))
            target = root / package
            unpack = Path(tmp) / "x"
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpack)], check=True)
            os.replace(unpack, target)
        kernel = _unpacked_kernel(target, arch)
        if kernel is None:
            raise ToolError(f"{package} has no kernel image")
        return kernel


def _debian_kernels(record: arches.Arch) -> Path:
    """Where Debian's kernel packages of an arch are unpacked."""
    return cache_dir() / "debian-kernel" / record.debian_arch


def _unpacked_kernel(root: Path, arch: str) -> KernelPlan | None:
    images = sorted((root / "boot").glob("vmlinu[xz]-*"))  # ppc64el ships an ELF vmlinux
    if not images:
        return None
    image = images[-1]
    version = image.name.split("-", 1)[1]
    modules = root / "lib" / "modules" / version
    if modules.is_dir() and not (modules / "modules.dep").is_file():
        # A package carries no modules.dep: its install script makes it.
        _depmod(root, version, modules)  # in the cache already: indexed in place
    config = root / "boot" / f"config-{version}"
    return _kernel(
        image,
        version,
        arch,
        modules if modules.is_dir() else None,
        config if config.is_file() else None,
        f"Debian's Linux {version}",
    )


def choose_kernel(
    kernel: str | None,
    modules: Path | None = None,
    fetch: bool = True,
    arch: str | None = None,
) -> KernelPlan:
    """``kernel``: a path, ``debian``, or None (qemubox's newest build for ``arch``, else
    Debian's). ``arch``: the guest's (None: the host's; a given kernel's own otherwise).
    Without ``fetch``, Debian's kernel must be in the cache already (a dry run fetches
    nothing)."""
    if kernel and kernel != "debian" and is_source_tree(Path(kernel)):
        if not fetch:
            raise InputError(f"--kernel {kernel}: a dry run builds nothing; build it first")
        if modules is not None:
            raise InputError(f"--kernel {kernel} is a source tree: its build has its modules")
        return tree_kernel(Path(kernel), arch)
    if kernel and kernel != "debian":
        found = kernel_from_path(kernel, modules)
        if arch and found.arch != arches.normalize(arch):
            raise InputError(f"--kernel {kernel} is a {found.arch} kernel, not {arch}")
        return found
    record = arches.get(arch or arches.host().name)
    arch = record.name
    found = None if kernel == "debian" else built_kernel(arch)
    if found is None and record.debian_kernel is None:
        raise InputError(f"Debian 12 has no kernel package for {arch}: {record.kernel_hint()}")
    if found is None and not fetch:
        found = cached_debian_kernel(arch)
        if found is None:
            raise InputError(
                "Debian's kernel is not downloaded yet and a dry run fetches nothing: "
                "run once without --dry-run, or give --kernel"
            )
    return found or debian_kernel(arch)


def cached_debian_kernel(arch: str) -> KernelPlan | None:
    root = _debian_kernels(arches.get(arch))
    for unpacked in sorted(root.glob("linux-image-*"), reverse=True):
        kernel = _unpacked_kernel(unpacked, arch)
        if kernel:
            return kernel
    return None
