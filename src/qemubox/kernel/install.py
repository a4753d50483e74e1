"""Installing a finished build into an output directory (``build/kernel`` by default)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from qemubox.errors import InputError


def same_file(a: Path, b: Path) -> bool:
    """Whether ``b`` is a copy of ``a`` as copies are made here (size and time kept)."""
    try:
        sa, sb = a.stat(), b.stat()
    except FileNotFoundError:
        return False
    return sa.st_size == sb.st_size and sa.st_mtime_ns == sb.st_mtime_ns


def _keep_old(path: Path, notes: list[str]) -> None:
    """Move a user's file out of the way as ``<name>.old``, and say so."""
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink():
        path.unlink()
        return
    backup = path.with_name(path.name + ".old")
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup)
    os.replace(path, backup)
    notes.append(f"kept the previous {path} as {backup}")


def _place(src: Path, dest: Path, notes: list[str], link: bool = False) -> None:
    """Put a copy of ``src`` at ``dest``; with ``link``, a hard link when it can (for the
    large files a finished build never writes again, and nobody edits: images)."""
    if same_file(src, dest) and not dest.is_symlink():
        return
    _keep_old(dest, notes)
    tmp = dest.with_name(f".{dest.name}.qemubox-tmp")
    tmp.unlink(missing_ok=True)
    linked = False
    if link:
        with contextlib.suppress(OSError):  # another file system: a copy
            os.link(src, tmp)
            linked = True
    if not linked:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)


def _symlink(target: str, link: Path, notes: list[str]) -> None:
    if link.is_symlink() and os.readlink(link) == target:
        return
    _keep_old(link, notes)
    link.symlink_to(target)


def install_build(manifest: dict, build_dir: Path, output: Path) -> list[str]:
    """Copy the kernel, its config, System.map, vmlinux and modules into ``output``.

    Files that are already identical are left alone; different files that were there are
    kept as ``*.old``. Returns notes for the user.
    """
    notes: list[str] = []
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output} exists and is not a directory")
    output.mkdir(parents=True, exist_ok=True)
    release = manifest["version"]
    files = {
        f"vmlinuz-{release}": build_dir / manifest["image"],
        f"config-{release}": build_dir / ".config",
        f"System.map-{release}": build_dir / "System.map",
        "vmlinux": build_dir / "vmlinux",
    }
    for name, src in files.items():
        _place(src, output / name, notes, link=name.startswith(("vmlinu", "System")))
    _symlink(f"vmlinuz-{release}", output / "vmlinuz", notes)
    _symlink(f"config-{release}", output / "config", notes)

    previous = {}
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((output / "manifest.json").read_text())
    modules_src = build_dir / ".qemubox-modules" / "lib" / "modules" / release
    modules_dest = output / "lib" / "modules" / release
    same_build = previous.get("config_sha256") == manifest["config_sha256"] and previous.get(
        "build_dir"
    ) == manifest.get("build_dir")
    fresh = same_build and modules_dest.is_dir()
    if manifest.get("modules") and modules_src.is_dir() and not fresh:
        _keep_old(modules_dest, notes)
        modules_dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(modules_src, modules_dest, symlinks=True)
    installed = {**manifest, "installed_to": str(output.resolve())}
    text = json.dumps(installed, indent=2, sort_keys=True) + "\n"
    manifest_path = output / "manifest.json"
    if not manifest_path.exists() or manifest_path.read_text() != text:
        tmp = output / ".manifest.json.qemubox-tmp"
        tmp.write_text(text)
        os.replace(tmp, manifest_path)
    return notes
