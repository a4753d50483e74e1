"""Running a long command (a kernel's make, debootstrap) with a live progress line on a
terminal, a line now and then elsewhere, and its whole output in a log file."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rich.console import Console

from qemubox.errors import ToolError

PLAIN_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal


class CommandFailed(ToolError):
    """The command failed; ``log_tail`` holds the last lines of its log, shown to the user."""

    show_tail = True


class CommandInterrupted(ToolError):
    exit_code = 130


def elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run_logged(
    args: Sequence[str],
    log_path: Path,
    label: str,
    describe: Callable[[str], str | None],
    *,
    summary: Callable[[], str] = str,
    env: Mapping[str, str] | None = None,
    console: Console | None = None,
    interrupted: str = "interrupted",
    cwd: Path | None = None,
) -> float:
    """Run ``args``, logging its output (stdout and stderr) to ``log_path`` and showing
    ``label: <elapsed>, <describe(line)>`` for the lines ``describe`` has words for.

    Returns the seconds it took; prints ``label: done in <elapsed><summary()>``. On failure
    raises CommandFailed with the last 40 log lines. On Ctrl-C the command (which gets the
    same SIGINT) is given a minute to stop cleanly; CommandInterrupted(``interrupted``)
    follows."""
    console = console or Console(stderr=True)
    start = last_plain = time.monotonic()
    name = Path(args[0]).name
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
            cwd=cwd,
        )
        status = console.status(label) if console.is_terminal else None
        try:
            if status:
                status.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                words = describe(line)
                if words is None:
                    continue
                now = time.monotonic()
                text = f"{label}: {elapsed(now - start)}, {words}"
                if status:
                    status.update(text)
                elif now - last_plain >= PLAIN_EVERY:
                    console.print(text, highlight=False, soft_wrap=True)
                    last_plain = now
            code = proc.wait()
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise CommandInterrupted(interrupted) from None
        finally:
            if status:
                status.stop()
    seconds = time.monotonic() - start
    if code != 0:
        lines = log_path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
        raise CommandFailed(
            f"{name} failed (exit {code}) after {elapsed(seconds)}; full log: {log_path}",
            "\n".join(lines[-40:]),
        )
    console.print(
        f"{label}: done in {elapsed(seconds)}{summary()}", highlight=False, soft_wrap=True
    )
    return seconds
