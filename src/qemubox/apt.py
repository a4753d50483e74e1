"""Debian packages qemubox installs or fetches on demand."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from qemubox.errors import InputError, ToolError


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no output"])[-1]


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
        raise ToolError(f"apt-get install {package} failed: {_last_line(proc.stderr)}")


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
        raise ToolError(f"apt-get download {package} failed: {_last_line(proc.stderr)}")
    return debs[-1]
