"""Compiling one of qemubox's own C files (the guest agent, the network shim) into the cache,
once per source and compiler."""

from __future__ import annotations

import subprocess
from pathlib import Path

from qemubox.errors import ToolError
from qemubox.paths import fill


def compiled(source: bytes, target: Path, command: list[str], what: str) -> Path:
    """``target``, made when missing by ``command`` (a compiler and its flags) from
    ``source``: the command is given ``-o TMP TMP.c`` and the libraries after them are its
    own. ``what``: for the error."""

    def make(tmp: Path) -> None:
        src = tmp.with_suffix(".c")
        try:
            src.write_bytes(source)
            proc = subprocess.run(
                [*command, "-o", str(tmp), str(src)],
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            src.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise ToolError(f"building {what} failed: {proc.stderr.strip()[-500:]}")

    return fill(target, make)
