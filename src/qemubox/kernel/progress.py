"""Running a long make with a live progress line and the full log in a file."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console

from qemubox.errors import ToolError

# Kbuild's quiet output: "  CC      kernel/fork.o", "  CC [M]  fs/9p/vfs_super.o".
_STEP_RE = re.compile(r"^\s{2}([A-Z][A-Z0-9_]*(?: \[M\])?)\s+(\S+)")
_OBJECT_STEPS = {"CC", "CC [M]", "AS", "AS [M]", "HOSTCC", "HOSTCXX"}
_PLAIN_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal


class BuildFailed(ToolError):
    """make failed; ``log_tail`` holds the last lines of its log, shown to the user."""

    show_tail = True


class BuildInterrupted(ToolError):
    exit_code = 130


def _fmt(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run_make(
    args: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    label: str = "building",
    console: Console | None = None,
) -> float:
    """Run make, showing elapsed time, objects compiled and the current file.

    Returns the seconds it took. On failure raises BuildFailed with the last 40 log lines.
    On Ctrl-C, make (which gets the same SIGINT) is left to stop cleanly, so that the build
    directory stays usable; BuildInterrupted follows.
    """
    console = console or Console(stderr=True)
    start = time.monotonic()
    objects, current, last_plain = 0, "", start
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            env={**os.environ, **(env or {})},
        )
        status = console.status(label) if console.is_terminal else None
        try:
            if status:
                status.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                m = _STEP_RE.match(line)
                if not m:
                    continue
                if m.group(1) in _OBJECT_STEPS:
                    objects += 1
                current = m.group(2)
                now = time.monotonic()
                text = f"{label}: {_fmt(now - start)}, {objects} objects, {current}"
                if status:
                    status.update(text)
                elif now - last_plain >= _PLAIN_EVERY:
                    console.print(text, highlight=False, soft_wrap=True)
                    last_plain = now
            code = proc.wait()
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise BuildInterrupted(
                f"build interrupted; {log_path.parent} is kept and the next build continues from it"
            ) from None
        finally:
            if status:
                status.stop()
    seconds = time.monotonic() - start
    if code != 0:
        lines = log_path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
        raise BuildFailed(
            f"make failed (exit {code}) after {_fmt(seconds)}; full log: {log_path}",
            "\n".join(lines[-40:]),
        )
    console.print(
        f"{label}: done in {_fmt(seconds)}, {objects} objects compiled",
        highlight=False,
        soft_wrap=True,
    )
    return seconds
