"""What the benchmarks that drive whole `qemubox` processes share."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

QEMUBOX = [sys.executable, "-m", "qemubox"]


def qemubox(env: dict, *args: str) -> str:
    """qemubox's stdout; a failure ends the benchmark with its error."""
    proc = subprocess.run([*QEMUBOX, *args], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"qemubox {' '.join(args)} failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout


def timed(env: dict, *args: str) -> float:
    """Seconds a qemubox command takes, start to exit."""
    start = time.monotonic()
    qemubox(env, *args)
    return time.monotonic() - start


def seconds(command: list[str], cwd: Path | None = None) -> tuple[float, str]:
    """Seconds any command takes, and its stdout; a failure ends the benchmark."""
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, check=False, cwd=cwd)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{proc.stderr[-2000:]}")
    return time.monotonic() - start, proc.stdout


def linked_source(name: str, done: str) -> Path:
    """A benchmark's own copy of Debian's 6.12 tree in the cache (hard links), made again
    unless its ``done`` entry is there."""
    from qemubox.kernel.source import debian_source
    from qemubox.paths import cache_dir

    tree = cache_dir() / name / "linux"
    if not (tree / done).exists():
        tree.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["rm", "-rf", str(tree)], check=True)
        subprocess.run(["cp", "-al", str(debian_source("6.12")), str(tree)], check=True)
    return tree
