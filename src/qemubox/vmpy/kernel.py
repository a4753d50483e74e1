"""``vm run -k BUILD``: the kernel image a build directory holds and the directory whose
modules the guest mounts over 9p.

A kernel build directory (in-tree or ``O=``): the image is its ``vmlinux`` when that is an
x86_64 kernel with a PVH entry, else what ``make -s image_name`` prints there, for the
architecture its ``.config`` is for; the whole directory is exported. A qemubox kernel
install directory (``kernel build -o DIR``, with its ``manifest.json``): its
``vmlinuz-<release>``, and its ``lib/modules/<release>``."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qemubox import arch as arches
from qemubox.errors import InputError, last_line


@dataclass(frozen=True)
class HostKernel:
    build: Path  # what the user named, resolved
    image: Path
    modules: Path  # exported read-only with the 9p tag "modules"
    vmlinux: Path | None  # for gdb
    arch: str | None  # the kernel ARCH, when known


def find_build(spec: str, builds: Path | None, cwd: Path) -> Path:
    """``-k`` as given: a name not starting with ``/`` or ``.`` is looked up under
    ``Builds`` first, then as a path (the caller's)."""
    candidates = []
    if builds is not None and not spec.startswith(("/", ".")):
        candidates.append(builds / spec)
    candidates.append(cwd / spec)
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    where = " or ".join(str(p) for p in candidates)
    raise InputError(f"-k {spec}: no kernel build directory at {where}")


def config_arch(config_text: str) -> str | None:
    """The ARCH a kernel ``.config`` is for (among those qemubox boots)."""
    record = arches.by_config(config_text)
    return record.name if record else None


def host_kernel(build: Path) -> HostKernel:
    manifest = build / "manifest.json"
    if manifest.is_file():
        return _installed(build, manifest)
    if not (build / "Makefile").is_file():
        raise InputError(
            f"-k {build}: neither a kernel build directory (no Makefile) nor a qemubox "
            "kernel install directory (no manifest.json)"
        )
    try:
        config = (build / ".config").read_text(errors="replace")
    except FileNotFoundError:
        raise InputError(f"-k {build}: no .config (is the kernel configured?)") from None
    arch = config_arch(config)
    vmlinux = build / "vmlinux"
    if arch and arches.get(arch).pvh and _has_pvh_entry(vmlinux, arch):
        # Booted as it is: no bzImage made, nor decompressed under emulation at each boot.
        return HostKernel(build, vmlinux, build, vmlinux, arch)
    env_arch = [f"ARCH={arches.get(arch).karch}"] if arch else []
    proc = subprocess.run(
        ["make", "-s", *env_arch, "image_name"],
        cwd=build,
        capture_output=True,
        text=True,
        check=False,
    )
    name = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not name:
        raise InputError(f"-k {build}: make -s image_name failed: {last_line(proc.stderr)}")
    image = build / name
    if not image.is_file():
        raise InputError(f"-k {build}: no kernel image at {image} (is the kernel built?)")
    return HostKernel(build, image, build, vmlinux if vmlinux.is_file() else None, arch)


def _has_pvh_entry(vmlinux: Path, arch: str) -> bool:
    from qemubox.kernel.artifacts import elf_kernel

    elf = elf_kernel(vmlinux) if vmlinux.is_file() else None
    return elf is not None and elf.arch == arch and elf.pvh


def _installed(build: Path, manifest_path: Path) -> HostKernel:
    try:
        manifest = json.loads(manifest_path.read_text())
        release = manifest["version"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"-k {build}: {manifest_path} is not a qemubox kernel manifest") from None
    image = build / f"vmlinuz-{release}"
    if not image.is_file():
        raise InputError(f"-k {build}: no kernel image vmlinuz-{release} in it")
    modules = build / "lib" / "modules" / release
    vmlinux = build / "vmlinux"
    return HostKernel(
        build,
        image,
        modules if modules.is_dir() else build,
        vmlinux if vmlinux.is_file() else None,
        manifest.get("arch"),
    )
