"""Crash-dump benchmark: what saving a guest's memory costs, against writing as many bytes
to the same filesystem a page at a time (as QEMU's ELF dump writes), in the same run.

Run by hand:

    .venv/bin/python benchmarks/dump.py [-n 3] [--memory 256M] [--memory 1G] [--kernel PATH]

For each memory size, each the median of n:
- dump: ``Sandbox.dump`` (``qemubox dump``) of a running sandbox: seconds, size, MB/s;
- reference: as many bytes written beside it in 4 KiB writes (``dd bs=4k``: QEMU writes
  an ELF dump a page at a time), and the dump copied whole (``cp``), for scale;
- panic: ``qemubox run --vmcore FILE -- <panic>`` against the same panic without
  ``--vmcore``, start to exit (what the dump adds to a crashing run).
Target: a dump writes at least 0.5x as fast as the page-at-a-time reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import QEMUBOX

from qemubox.sandbox.sandbox import Sandbox
from qemubox.sandbox.spec import Session

warnings.simplefilter("ignore")
PANIC = ["sh", "-c", "echo c > /proc/sysrq-trigger"]


def _seconds(command: list[str], expect: int) -> float:
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    took = time.monotonic() - start
    if proc.returncode != expect:
        raise SystemExit(f"{' '.join(command)}: exit {proc.returncode}: {proc.stderr[-800:]}")
    return took


def measure(memory: str, kernel: str | None, n: int, where: Path) -> dict[str, float]:
    core, copy = where / "core", where / "copy"
    dumps, copies, pages = [], [], []
    with Sandbox(Session(memory=memory, kernel=kernel)) as box:
        for _ in range(n):
            saved = box.dump(core)
            dumps.append(saved["seconds"])
            copy.unlink(missing_ok=True)
            copies.append(_seconds(["cp", str(core), str(copy)], 0))
            copy.unlink()
            count = f"count={core.stat().st_size // 4096}"
            dd = ["dd", "if=/dev/zero", f"of={copy}", "bs=4k", count, "status=none"]
            pages.append(_seconds(dd, 0))
            copy.unlink()
    size = core.stat().st_size
    run = [*QEMUBOX, "run", "-m", memory, *(["--kernel", kernel] if kernel else [])]
    plain = [_seconds([*run, "--", *PANIC], 122) for _ in range(n)]
    dumping = [_seconds([*run, "--vmcore", str(core), "--", *PANIC], 122) for _ in range(n)]
    return {
        "mib": size / (1 << 20),
        "dump": statistics.median(dumps),
        "copy": statistics.median(copies),
        "pages": statistics.median(pages),
        "plain": statistics.median(plain),
        "dumping": statistics.median(dumping),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("--memory", action="append")
    parser.add_argument("--kernel")
    args = parser.parse_args()
    worst = None
    print(f"{'memory':>8} {'MiB':>6} {'dump s':>8} {'MB/s':>7} {'4k s':>6} {'ratio':>6} "
          f"{'cp s':>6} {'panic s':>8} {'+vmcore s':>10}")  # fmt: skip
    for memory in args.memory or ["256M"]:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
            m = measure(memory, args.kernel, args.n, Path(d))
        ratio = m["pages"] / m["dump"]
        worst = ratio if worst is None else min(worst, ratio)
        print(
            f"{memory:>8} {m['mib']:6.0f} {m['dump']:8.2f} {m['mib'] / m['dump']:7.0f} "
            f"{m['pages']:6.2f} {ratio:6.2f} {m['copy']:6.2f} {m['plain']:8.2f} "
            f"{m['dumping']:10.2f}"
        )
    print(f"dump speed: {worst:.2f}x the same bytes written a page at a time (target >= 0.5x)")
    return 0 if worst is not None and worst >= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
