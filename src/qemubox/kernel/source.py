"""Kernel sources: Debian's ``linux-source-X.Y`` tarballs and local tarballs, extracted once
into the cache (keyed by the tarball's content hash) and reused."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from qemubox.apt import apt_install
from qemubox.errors import InputError, ToolError
from qemubox.linux.tree import makefile_version
from qemubox.paths import cache_dir, locked, read_json, updating_json

DEBIAN_SOURCE_DIR = Path("/usr/src")
_SERIES_RE = re.compile(r"\d+\.\d+")


def source_cache() -> Path:
    path = cache_dir() / "kernel-source"
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so a big tarball is hashed once."""
    st = path.stat()
    index_path = source_cache() / "hashes.json"
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    known = read_json(index_path).get(key)
    if known:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    with updating_json(index_path) as index:
        index[key] = digest.hexdigest()
    return digest.hexdigest()


def extract_tarball(tarball: Path, sha256: str | None = None) -> Path:
    """Extract a kernel tarball into the cache (once) and return the source directory."""
    if not tarball.is_file():
        raise InputError(f"no such kernel tarball: {tarball}")
    digest = file_sha256(tarball)
    if sha256 and digest != sha256.lower():
        raise InputError(f"{tarball}: sha256 is {digest}, expected {sha256}")
    cache = source_cache()
    with locked(cache / f".{digest[:16]}.lock"):
        for existing in cache.glob(f"linux-*-{digest[:12]}"):
            if (existing / "Makefile").is_file():
                return existing
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
        try:
            proc = subprocess.run(
                ["tar", "-xf", str(tarball), "-C", str(tmp), "--strip-components=1"],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0 or not (tmp / "Makefile").is_file():
                raise ToolError(
                    f"cannot extract {tarball}: {proc.stderr.strip() or 'no Makefile inside'}"
                )
            final = cache / f"linux-{makefile_version(tmp)}-{digest[:12]}"
            os.replace(tmp, final)
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def debian_tarball(series: str) -> Path:
    """``/usr/src/linux-source-<series>.tar.xz``, installing the package when root."""
    if not _SERIES_RE.fullmatch(series):
        raise InputError(f"kernel version must look like 6.12, got {series!r}")
    tarball = DEBIAN_SOURCE_DIR / f"linux-source-{series}.tar.xz"
    if tarball.is_file():
        return tarball
    apt_install(f"linux-source-{series}", f"{tarball} is missing")
    if not tarball.is_file():
        raise ToolError(f"linux-source-{series} did not install {tarball}")
    return tarball


def debian_source(series: str) -> Path:
    """Extracted sources of Debian's ``linux-source-<series>``."""
    return extract_tarball(debian_tarball(series))
