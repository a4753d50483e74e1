"""Idle benchmark: what an idle sandbox costs its host, as the CPU time its QEMU takes while
the guest waits for a command, for each kernel given, in the same run.

    .venv/bin/python benchmarks/idle.py [--seconds 10] [--arch A] KERNEL [KERNEL...]

A KERNEL is what `--kernel` takes (a path, or `debian`). Each guest is booted (no snapshot),
left 2 s to settle, then its QEMU's user and system time is read over the given seconds.
Prints the share of one core each takes, and each one's ratio to the first kernel's.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

from qemubox import Sandbox, Session
from qemubox.errors import QemuboxError

warnings.simplefilter("ignore")


def cpu_seconds(pid: int) -> float:
    """User plus system time of a process, from /proc (fields 14 and 15 of its stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_share(kernel: str, arch: str, seconds: float) -> float:
    session = Session(memory="256M", kernel=kernel, arch=arch, snapshot=False)
    try:
        box = Sandbox(session).start()
    except QemuboxError as err:
        raise SystemExit(f"benchmarks/idle.py: {err}") from None
    with box:
        assert box.machine is not None
        time.sleep(2)
        before = cpu_seconds(box.machine.pid)
        time.sleep(seconds)
        return (cpu_seconds(box.machine.pid) - before) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels", nargs="+", metavar="KERNEL")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--arch", default=None, help="the guests' arch (default: the host's)")
    args = parser.parse_args()
    reference = None
    for kernel in args.kernels:
        share = idle_share(kernel, args.arch, args.seconds)
        reference = share if reference is None else reference
        ratio = f"{share / reference:5.2f}x" if reference else "    -"  # none measured
        print(f"{share * 100:6.2f}% of a core   {ratio}   {kernel}")


if __name__ == "__main__":
    main()
