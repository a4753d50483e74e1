"""Debian packages qemubox installs or fetches on demand, and where their programs are."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from qemubox.errors import InputError, ToolError, last_line

# Where Debian puts administrators' tools (mkfs.ext4, depmod, debugfs, debootstrap): not on an
# ordinary user's PATH, yet many of them serve that user too.
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def program(name: str, package: str) -> str:
    """The path of program ``name``: on the caller's PATH, else in the system directories;
    a one-line error names the Debian package when it is nowhere."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SYSTEM_DIRS))
    if found is None:
        raise InputError(f"{name} not found: install it with 'apt-get install {package}'")
    return found


def apt_install(package: str, why: str) -> None:
    """Install a package when root; otherwise say the exact command (``why`` says what for)."""
    if os.geteuid() != 0:
        raise InputError(f"{why}: install it with 'apt-get install {package}' (as root)")
    proc = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
        capture_output=True,
        text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        check=False,
    )
    if proc.returncode != 0:
        raise ToolError(f"apt-get install {package} failed: {last_line(proc.stderr)}")


def apt_download(package: str, directory: Path) -> Path:
    """Download a package's .deb into ``directory`` (no root needed); returns its path."""
    proc = subprocess.run(
        ["apt-get", "download", package],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )
    debs = sorted(directory.glob("*.deb"))
    if proc.returncode != 0 or not debs:
        raise ToolError(f"apt-get download {package} failed: {last_line(proc.stderr)}")
    return debs[-1]


def download_for_arch(package: str, debian_arch: str, directory: Path, state: Path) -> Path:
    """Download ``package`` built for another architecture, from the mirror this host's apt
    sources name, with package lists of that architecture kept under ``state`` (the host's
    own apt configuration is not touched). Returns the .deb's path."""
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    options = [
        "-qq",
        "-o", f"APT::Architecture={debian_arch}",
        "-o", f"APT::Architectures::={debian_arch}",
        "-o", f"Dir::State::Lists={state / 'lists'}",
        "-o", f"Dir::Cache={state / 'cache'}",
        "-o", "Dir::State::status=/dev/null",
        "-o", "Debug::NoLocking=1",
        "-o", "APT::Sandbox::User=root" if os.geteuid() == 0 else "Debug::NoDropPrivs=1",
    ]  # fmt: skip
    if not any((state / "lists").glob("*_Packages*")):
        proc = subprocess.run(
            ["apt-get", *options, "update"], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise ToolError(f"apt-get update for {debian_arch} failed: {last_line(proc.stderr)}")
    proc = subprocess.run(
        ["apt-get", *options, "download", package],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )
    debs = sorted(directory.glob(f"*_{debian_arch}.deb"))
    if proc.returncode != 0 or not debs:
        raise ToolError(
            f"apt-get download {package} ({debian_arch}) failed: {last_line(proc.stderr)}"
        )
    return debs[-1]
