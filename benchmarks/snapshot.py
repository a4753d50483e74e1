"""Snapshot benchmark: starting from a snapshot against booting, in the same run.

    .venv/bin/python benchmarks/snapshot.py [--kernel PATH] [-n 5]

Prints medians of: a `Sandbox` start to the first command's output, booted and restored
(the issue's target: restored ÷ booted ≤ 0.05); `qemubox run -- true` as a whole process,
booted and restored; and a named sandbox's pause and resume.
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

from qemubox import Sandbox, Session

warnings.simplefilter("ignore")


def first_output(session: Session) -> float:
    start = time.monotonic()
    with Sandbox(session) as box:
        box.exec(["echo", "hi"])
        return time.monotonic() - start


def cli(*args: str) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "qemubox", *args], check=True, capture_output=True)
    return time.monotonic() - start


def median(f, n: int) -> float:
    return statistics.median(f() for _ in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel")
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    kw = {"memory": "256M", "kernel": args.kernel}
    first_output(Session(snapshot=True, **kw))  # recorded, if it was not
    booted = median(lambda: first_output(Session(**kw)), args.n)
    restored = median(lambda: first_output(Session(snapshot=True, **kw)), args.n)
    k = ["--kernel", args.kernel] if args.kernel else []
    run_boot = median(lambda: cli("run", "-m", "256M", *k, "--", "true"), args.n)
    run_snap = median(lambda: cli("run", "-m", "256M", "--snapshot", *k, "--", "true"), args.n)
    with tempfile.TemporaryDirectory() as state:
        os.environ["QEMUBOX_STATE_DIR"] = state
        cli("create", "-m", "256M", *k, "b")
        pauses, resumes = [], []
        for _ in range(args.n):
            pauses.append(cli("pause", "b"))
            resumes.append(cli("resume", "b"))
        cli("rm", "-f", "b")
    print(f"start to first output: booted {booted * 1000:.0f} ms, ", end="")
    print(f"restored {restored * 1000:.0f} ms")
    print(f"  restored / booted = {restored / booted:.3f} (target <= 0.05)")
    print(f"qemubox run -- true: booted {run_boot:.2f} s, --snapshot {run_snap:.2f} s")
    print(f"  --snapshot / booted = {run_snap / run_boot:.3f}")
    pause, resume = statistics.median(pauses), statistics.median(resumes)
    print(f"pause {pause:.2f} s, resume {resume:.2f} s (256M guest, whole processes)")


if __name__ == "__main__":
    main()
