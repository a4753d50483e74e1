"""A kernel's make, with objects counted and the current file shown as it goes."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console

from qemubox.progress import CommandFailed, CommandInterrupted, run_logged

# Kbuild's quiet output: "  CC      kernel/fork.o", "  CC [M]  fs/9p/vfs_super.o".
_STEP_RE = re.compile(r"^\s{2}([A-Z][A-Z0-9_]*(?: \[M\])?)\s+(\S+)")
_OBJECT_STEPS = {"CC", "CC [M]", "AS", "AS [M]", "HOSTCC", "HOSTCXX"}

BuildFailed = CommandFailed
BuildInterrupted = CommandInterrupted


def run_make(
    args: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    label: str = "building",
    console: Console | None = None,
) -> float:
    """Run make, showing elapsed time, objects compiled and the current file.

    Returns the seconds it took. On failure raises BuildFailed with the last 40 log lines.
    On Ctrl-C, make is left to stop cleanly, so that the build directory stays usable;
    BuildInterrupted follows."""
    objects = 0

    def describe(line: str) -> str | None:
        nonlocal objects
        m = _STEP_RE.match(line)
        if not m:
            return None
        if m.group(1) in _OBJECT_STEPS:
            objects += 1
        return f"{objects} objects, {m.group(2)}"

    return run_logged(
        args,
        log_path,
        label,
        describe,
        summary=lambda: f", {objects} objects compiled",
        env=env,
        console=console,
        interrupted=(
            f"build interrupted; {log_path.parent} is kept and the next build continues from it"
        ),
    )
