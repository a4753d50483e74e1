"""An ext4 image made from a directory tree without mounting anything (``mkfs.ext4 -d``):
the read-only base every disk root boots from through a copy-on-write overlay."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from qemubox.apt import program
from qemubox.errors import ToolError

MIN_SIZE = 4 << 30  # the guest's / (sparse: only what is written takes space)


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def make_ext4(tree: Path, image: Path) -> int:
    """An ext4 image of ``tree`` (owners, modes, links, xattrs kept), read-only from then
    on: the base of copy-on-write overlays. Returns the bytes it takes."""
    size = max(MIN_SIZE, 2 * tree_bytes(tree) + (1 << 30))
    with open(image, "xb") as fh:
        fh.truncate(size)
    mkfs = program("mkfs.ext4", "e2fsprogs")
    proc = subprocess.run(
        [mkfs, "-q", "-F", "-m", "0", "-L", "qemubox-root", "-d", str(tree), str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ToolError(f"mkfs.ext4 -d for the image failed: {proc.stderr.strip()[-300:]}")
    image.chmod(0o444)
    return image.stat().st_blocks * 512
