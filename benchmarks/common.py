"""What the benchmarks that drive whole `qemubox` processes share."""

from __future__ import annotations

import subprocess
import sys
import time

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
