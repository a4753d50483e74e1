"""Kernels booted through their PVH entry: what an ELF vmlinux says of itself, and the
vmlinux unpacked from a bzImage (pure: files made here; real boots use it everywhere)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import time
from pathlib import Path

import pytest

from qemubox.errors import InputError
from qemubox.kernel import pvh
from qemubox.kernel.artifacts import elf_kernel, kernel_from_path
from qemubox.model.plan import KernelPlan

X86_64, AARCH64 = 62, 183


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name), len(desc), kind) + pad(name) + pad(desc)


def vmlinux(machine: int = X86_64, pvh_entry: bool = True, release: str = "6.99.1-t") -> bytes:
    """A 64-bit ELF with a GNU note, a Xen PVH note (or not) and a Linux banner."""
    notes = _note(b"GNU\0", 3, b"\1" * 20)
    if pvh_entry:
        notes += _note(b"Xen\0", 19, b"\0" * 12) + _note(b"Xen\0", 18, b"\0\0\0\1\0\0\0\0")
    banner = f"Linux version {release} (builder@host) (gcc) #1 SMP\n\0".encode()
    phoff, phnum = 64, 2
    notes_at = phoff + 56 * phnum
    header = b"\x7fELF\2\1\1" + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0, phoff, 0, 0, 64, 56, phnum, 0, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, notes_at + len(notes), notes_at, 4096)
    note = struct.pack("<IIQQQQQQ", 4, 4, notes_at, 0, 0, len(notes), len(notes), 4)
    return header + load + note + notes + b"\0" * 64 + banner


def bzimage(payload: bytes, version: int = 0x20F) -> bytes:
    """An x86 boot image as the boot protocol lays it out: one setup sector after the boot
    sector, the packed vmlinux at the start of the protected-mode code, then its size."""
    head = bytearray(1024)
    head[0x1F1] = 1
    head[0x202:0x206] = b"HdrS"
    head[0x206:0x208] = version.to_bytes(2, "little")
    head[0x248:0x24C] = (0).to_bytes(4, "little")
    head[0x24C:0x250] = len(payload).to_bytes(4, "little")
    return bytes(head) + payload + b"\x10\x20\x30\x40"


def test_an_elf_vmlinux_says_its_arch_release_and_pvh_entry(tmp_path):
    for name, data, expected in (
        ("pvh", vmlinux(), ("x86_64", "6.99.1-t", True)),
        ("plain", vmlinux(pvh_entry=False), ("x86_64", "6.99.1-t", False)),
        ("arm", vmlinux(AARCH64, False), ("arm64", "6.99.1-t", False)),
    ):
        (tmp_path / name).write_bytes(data)
        e = elf_kernel(tmp_path / name)
        assert (e.arch, e.version, e.pvh) == expected, name
    (tmp_path / "text").write_text("not an ELF at all, long enough to have a header " * 3)
    assert elf_kernel(tmp_path / "text") is None


def with_sections(elf: bytes, **sections: bytes) -> bytes:
    """The ELF with these sections appended (``rodata=`` is ``.rodata``), and a section
    table naming them."""
    names = b"\0" + b"".join(f".{n}".encode() + b"\0" for n in [*sections, "shstrtab"])
    body, headers = bytearray(elf), [b"\0" * 64]
    for n, data in [*sections.items(), ("shstrtab", names)]:
        at = len(body)
        body += data
        name = names.index(f".{n}\0".encode())
        headers.append(struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, at, len(data), 0, 0, 1, 0))
    shoff = len(body)
    body += b"".join(headers)
    struct.pack_into("<Q", body, 40, shoff)
    struct.pack_into("<HHH", body, 58, 64, len(headers), len(headers) - 1)
    return bytes(body)


def test_the_banner_is_read_from_rodata_and_a_rewritten_file_again(tmp_path):
    """With a section table, only ``.rodata`` is searched (a 20 MB vmlinux is read at every
    start); a file changed in place is read anew, not taken from what was read before."""
    plain = vmlinux().replace(b"Linux version 6.99.1-t", b"Linux xxxxxxx 6.99.1-t")
    decoy = b"Linux version 0.0-in-text (not the banner)\0"
    banner = b"Linux version 6.100.2-ro (builder@host) #1\n\0"
    image = tmp_path / "vmlinux"
    image.write_bytes(with_sections(plain, text=decoy, rodata=banner))
    assert elf_kernel(image).version == "6.100.2-ro"
    image.write_bytes(with_sections(plain, text=decoy, rodata=banner.replace(b"100.2", b"101.33")))
    assert elf_kernel(image).version == "6.101.33-ro"
    image.write_bytes(with_sections(plain, text=decoy))  # no .rodata: the whole file
    assert elf_kernel(image).version == "0.0-in-text"


def test_a_pvh_vmlinux_is_a_kernel_to_boot(tmp_path):
    (tmp_path / "vmlinux").write_bytes(vmlinux())
    (tmp_path / ".config").write_text("CONFIG_PVH=y\nCONFIG_VIRTIO_MMIO=y\n")
    k = kernel_from_path(tmp_path / "vmlinux")
    assert (k.arch, k.version, k.config, k.mmio) == (
        "x86_64",
        "6.99.1-t",
        str(tmp_path / ".config"),  # a build tree: the vmlinux beside its .config
        True,
    )
    assert k.booted == k.image


@pytest.mark.parametrize(
    "data, words",
    [
        (vmlinux(pvh_entry=False), "without a PVH entry (CONFIG_PVH): give its bzImage"),
        (vmlinux(AARCH64), "give its arch/arm64/boot/Image"),
        (vmlinux(release="").replace(b"Linux version", b"Linux xxxxxxx"), "version banner"),
    ],
)
def test_a_vmlinux_qemu_cannot_boot_is_refused_by_name(tmp_path, data, words):
    (tmp_path / "vmlinux").write_bytes(data)
    with pytest.raises(InputError, match=r"--kernel .*vmlinux: ") as err:
        kernel_from_path(tmp_path / "vmlinux")
    assert words in str(err.value)


def _kernel(image: Path, config: str | None = None) -> KernelPlan:
    cfg = None
    if config is not None:
        (image.parent / "config").write_text(config)
        cfg = str(image.parent / "config")
    return KernelPlan(str(image), "6.99.1-t", "x86_64", None, cfg, "test", False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QEMUBOX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "pack",
    [
        lambda b: lzma.compress(b, check=lzma.CHECK_CRC32),
        gzip.compress,
        bz2.compress,
    ],
    ids=["xz", "gzip", "bzip2"],
)
def test_a_bzimage_boots_its_own_vmlinux_unpacked_once(tmp_path, cache, pack):
    elf = vmlinux()
    (tmp_path / "bzImage").write_bytes(bzimage(pack(elf)))
    k = pvh.with_pvh_boot(_kernel(tmp_path / "bzImage", "CONFIG_PVH=y\n"))
    assert k.boot is not None and Path(k.boot).read_bytes() == elf
    assert k.booted == k.boot and k.image == str(tmp_path / "bzImage")
    assert pvh.with_pvh_boot(_kernel(tmp_path / "bzImage"), make=False).boot == k.boot
    assert pvh.with_pvh_boot(k) is k


def test_a_bzimage_that_cannot_boot_through_pvh_boots_as_it_is(tmp_path, cache):
    (tmp_path / "bzImage").write_bytes(bzimage(gzip.compress(vmlinux(pvh_entry=False))))
    plain = _kernel(tmp_path / "bzImage")
    assert pvh.with_pvh_boot(plain, make=False) == plain  # nothing unpacked without make
    assert not (cache / "pvh").exists()
    assert pvh.with_pvh_boot(plain) == plain  # unpacked: no PVH note, marked so
    [entry] = (d for d in (cache / "pvh").iterdir() if not d.name.startswith("."))
    assert [p.name for p in entry.iterdir()] == [pvh.NO_PVH]
    assert pvh.with_pvh_boot(plain) == plain

    (tmp_path / "said.bzImage").write_bytes(bzimage(gzip.compress(vmlinux())))
    said_no = _kernel(tmp_path / "said.bzImage", "# CONFIG_PVH is not set\n")
    assert pvh.with_pvh_boot(said_no) == said_no
    for name, data in (
        ("old", bzimage(gzip.compress(vmlinux()), version=0x207)),  # no payload fields
        ("zstd", bzimage(b"\x28\xb5\x2f\xfd" + b"\0" * 64)),  # a packing Python lacks
        ("broken", bzimage(b"\xfd7zXZ\x00" + b"\0" * 64)),
    ):
        (tmp_path / name).write_bytes(data)
        assert pvh.with_pvh_boot(_kernel(tmp_path / name)).boot is None, name


def test_a_rebuilt_bzimage_is_unpacked_again_and_old_ones_pruned(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(pvh, "KEEP", 2)
    image = tmp_path / "bzImage"
    seen = []
    for n in range(4):  # rebuilt in place
        image.write_bytes(bzimage(gzip.compress(vmlinux(release=f"6.99.{n}"))))
        seen.append(pvh.with_pvh_boot(_kernel(image)).boot)
        time.sleep(0.01)  # entries are ordered by their times
    assert len(set(seen)) == 4
    assert [Path(p).exists() for p in seen] == [False, False, True, True]
    other = tmp_path / "other.bzImage"
    other.write_bytes(bzimage(gzip.compress(vmlinux(release="6.99.9"))))
    first_other = pvh.with_pvh_boot(_kernel(other)).boot  # prunes seen[2]
    time.sleep(0.01)
    assert pvh.with_pvh_boot(_kernel(image)).boot == seen[3]  # used again: kept longest
    image.write_bytes(bzimage(gzip.compress(vmlinux(release="6.99.5"))))
    newest = pvh.with_pvh_boot(_kernel(image)).boot
    assert [Path(p).exists() for p in (seen[3], first_other, newest)] == [True, False, True]


def test_a_kernel_that_cannot_be_unpacked_now_boots_as_it_is(tmp_path, cache):
    (tmp_path / "bzImage").write_bytes(bzimage(gzip.compress(vmlinux())))
    cache.mkdir()
    (cache / "pvh").write_text("not a directory")  # the cache cannot take it
    plain = _kernel(tmp_path / "bzImage")
    assert pvh.with_pvh_boot(plain) == plain


def test_a_plan_made_earlier_gets_its_pruned_cache_files_again(tmp_path, cache, monkeypatch):
    """A paused sandbox's plan names an unpacked vmlinux and an initramfs that may have
    been pruned since: the same kind of boot is made again (the initramfs: same path)."""
    from dataclasses import replace

    from qemubox.model.plan import make_plan
    from qemubox.sandbox.spec import Session
    from qemubox.vm import prepare

    made = []
    monkeypatch.setattr(
        prepare.initramfs, "initramfs", lambda k, f: made.append((k, f)) or tmp_path / "i.cpio"
    )
    (tmp_path / "bzImage").write_bytes(bzimage(gzip.compress(vmlinux())))
    kernel = pvh.with_pvh_boot(_kernel(tmp_path / "bzImage"))
    (tmp_path / "i.cpio").write_bytes(b"")
    plan = make_plan(Session().validate(), kernel, "tcg", "", "/r", str(tmp_path / "i.cpio"), None)
    assert prepare.remade(plan) == plan and made == []  # nothing pruned: nothing made
    shutil.rmtree(Path(kernel.boot).parent)  # as the cache prunes an entry
    (tmp_path / "i.cpio").unlink()
    again = prepare.remade(plan)
    assert again.kernel.boot == kernel.boot and Path(kernel.boot).read_bytes() == vmlinux()
    assert again.initrd == str(tmp_path / "i.cpio") and made == [(again.kernel, plan.features)]
    assert replace(again, kernel=plan.kernel) == plan
