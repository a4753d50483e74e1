"""An x86 bzImage's own vmlinux, unpacked once into the cache, so that QEMU boots it through
its PVH entry and the bzImage's decompressor never runs under emulation (Debian's kernel:
4.8 s to a bare init under TCG as a bzImage, 1.7 s as its vmlinux).

A bzImage carries its vmlinux as a compressed ELF (the boot protocol's ``payload_offset`` and
``payload_length``, from version 2.08). Python unpacks xz, gzip and bzip2; a kernel packed
otherwise, or without a PVH entry (``CONFIG_PVH``), boots as the bzImage it is. Entries are
keyed by the image's path, size and time; the few used last are kept.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import shutil
import zlib
from dataclasses import replace
from pathlib import Path

from qemubox import arch as arches
from qemubox.kernel.artifacts import config_option, elf_kernel
from qemubox.model.plan import KernelPlan
from qemubox.paths import cache_dir, fill, least_recently_used

KEEP = 8  # unpacked kernels kept (those used last)
_FORMATS = {b"\xfd7zXZ\x00": "xz", b"\x1f\x8b": "gzip", b"BZh": "bzip2"}
NO_PVH = "no-pvh"  # the mark of an unpacked kernel without a PVH entry


def payload(image: Path) -> tuple[int, int, str] | None:
    """Where a bzImage's compressed vmlinux lies (offset, length) and how it is packed,
    when Python can unpack it."""
    try:
        with open(image, "rb") as fh:
            head = fh.read(0x250)
            if len(head) < 0x250 or head[0x202:0x206] != b"HdrS":
                return None
            if int.from_bytes(head[0x206:0x208], "little") < 0x208:
                return None
            setup_sectors = head[0x1F1] or 4
            start = (setup_sectors + 1) * 512 + int.from_bytes(head[0x248:0x24C], "little")
            length = int.from_bytes(head[0x24C:0x250], "little")
            fh.seek(start)
            magic = fh.read(6)
    except OSError:
        return None
    for prefix, name in _FORMATS.items():
        if magic.startswith(prefix):
            return start, length, name
    return None


def _unpack(data: bytes, fmt: str) -> bytes:
    """The first stream of ``data`` (a packed kernel ends with its size, not a stream)."""
    if fmt == "xz":
        return lzma.LZMADecompressor().decompress(data)
    if fmt == "gzip":
        return zlib.decompressobj(wbits=31).decompress(data)
    return bz2.BZ2Decompressor().decompress(data)


def _entry(image: Path, version: str) -> Path:
    """Where this image's vmlinux is (or would be) unpacked."""
    st = image.stat()
    ident = f"{image.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return cache_dir() / "pvh" / f"{version}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _without_pvh(config: str | None) -> bool:
    """Whether the kernel's config (when known) says it has no PVH entry."""
    try:
        return config is not None and config_option(Path(config), "PVH") != "y"
    except OSError:
        return False


def _make(image: Path, where: tuple[int, int, str], tmp: Path) -> None:
    """Unpack into ``tmp``: ``vmlinux`` when it has a PVH entry, else the mark that it has
    none. Failing to write (a full disk) raises: nothing is cached then."""
    start, length, fmt = where
    with open(image, "rb") as fh:
        fh.seek(start)
        data = fh.read(length)
    try:
        elf = _unpack(data, fmt)
    except (lzma.LZMAError, zlib.error, EOFError, ValueError):
        elf = b""
    tmp.mkdir()
    vmlinux = tmp / "vmlinux"
    if elf:
        vmlinux.write_bytes(elf)
        found = elf_kernel(vmlinux)
        if found is not None and found.pvh:
            return
        vmlinux.unlink()
    (tmp / NO_PVH).touch()


def with_pvh_boot(kernel: KernelPlan, make: bool = True) -> KernelPlan:
    """The kernel booting its own vmlinux through PVH, when it is a bzImage that has one
    (unpacked now, with ``make``; else only when it already was). Any other kernel, or
    one that cannot be unpacked here now, is returned as it is (and boots as it is)."""
    image = Path(kernel.image)
    if kernel.boot or not arches.get(kernel.arch).pvh:
        return kernel
    where = payload(image)  # a few hundred bytes read: None for a vmlinux or an Image
    if where is None or _without_pvh(kernel.config):
        return kernel
    try:
        entry = _entry(image, kernel.version)
        if entry.is_dir():
            os.utime(entry)  # in use: the last to be pruned
        elif make:
            fill(entry, lambda tmp: _make(image, where, tmp))
            _prune(entry.parent)
    except OSError:
        return kernel
    vmlinux = entry / "vmlinux"
    return replace(kernel, boot=str(vmlinux)) if vmlinux.is_file() else kernel


def _prune(root: Path) -> None:
    """Keep the ``KEEP`` entries used last."""
    entries = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    for old in least_recently_used(entries, KEEP, lambda d: d.stat().st_mtime):
        shutil.rmtree(old, ignore_errors=True)
