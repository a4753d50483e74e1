"""Kernel sources: Debian's ``linux-source-X.Y`` tarballs and local tarballs, extracted once
into the cache (keyed by the tarball's content hash) and reused."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from qemubox.errors import InputError, ToolError
from qemubox.kernel.tree import makefile_version
from qemubox.paths import cache_dir

DEBIAN_SOURCE_DIR = Path("/usr/src")
_SERIES_RE = re.compile(r"\d+\.\d+")


def source_cache() -> Path:
    path = cache_dir() / "kernel-source"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so a big tarball is hashed once."""
    st = path.stat()
    index_path = source_cache() / "hashes.json"
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    index[key] = digest.hexdigest()
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    return index[key]


def extract_tarball(tarball: Path, sha256: str | None = None) -> Path:
    """Extract a kernel tarball into the cache (once) and return the source directory."""
    if not tarball.is_file():
        raise InputError(f"no such kernel tarball: {tarball}")
    digest = file_sha256(tarball)
    if sha256 and digest != sha256.lower():
        raise InputError(f"{tarball}: sha256 is {digest}, expected {sha256}")
    cache = source_cache()
    with _locked(cache / f".{digest[:16]}.lock"):
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


def debian_tarball(series: str, install: bool = True) -> Path:
    """``/usr/src/linux-source-<series>.tar.xz``, installing the package when root."""
    if not _SERIES_RE.fullmatch(series):
        raise InputError(f"kernel version must look like 6.12, got {series!r}")
    tarball = DEBIAN_SOURCE_DIR / f"linux-source-{series}.tar.xz"
    if tarball.is_file():
        return tarball
    package = f"linux-source-{series}"
    if not install or os.geteuid() != 0:
        raise InputError(
            f"{tarball} is missing: install it with 'apt-get install {package}' (as root)"
        )
    proc = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
        capture_output=True,
        text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        check=False,
    )
    if proc.returncode != 0 or not tarball.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ToolError(f"apt-get install {package} failed: {last}")
    return tarball


def debian_source(series: str) -> Path:
    """Extracted sources of Debian's ``linux-source-<series>``."""
    return extract_tarball(debian_tarball(series))
