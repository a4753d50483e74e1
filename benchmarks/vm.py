"""Persistent VMs benchmark: a Debian VM booted with its own kernel (GRUB, initramfs,
systemd) against the same VM booted with a kernel from the host (`vm run -k`), and a
command through the guest agent against ssh — in the same run, as whole `qemubox`
processes.

Run by hand, as root (`vm install` needs it; the install is cached by its inputs):

    .venv/bin/python benchmarks/vm.py [-n 3] [--kernel DIR]

DIR is a kernel build or install directory; by default qemubox's minimal kernel with the
`vm` fragment is built (or found in the cache). Figures are medians of n: `vm run -d` to
the first command's end, `vm exec -- true`, `vm stop`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import qemubox, timed


def boot(env: dict, n: int, kernel: list[str]) -> tuple[float, float, float, float]:
    """Medians of: run -d → first command (agent), exec via agent, exec via ssh, stop."""
    starts, agent, ssh, stops = [], [], [], []
    for _ in range(n):
        start = time.monotonic()
        qemubox(env, "vm", "run", "bench", *kernel, "-d", "--accel", "tcg")
        qemubox(env, "vm", "exec", "bench", "--wait", "600", "--", "true")
        starts.append(time.monotonic() - start)
        qemubox(env, "vm", "exec", "bench", "--via", "ssh", "--wait", "600", "--", "true")
        agent += [timed(env, "vm", "exec", "bench", "--via", "agent", "--", "true")]
        ssh += [timed(env, "vm", "exec", "bench", "--via", "ssh", "--", "true")]
        stops.append(timed(env, "vm", "stop", "bench"))
    return tuple(statistics.median(x) for x in (starts, agent, ssh, stops))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--kernel", type=Path, help="a kernel build or install directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: vm install needs it")
    with tempfile.TemporaryDirectory(prefix="qemubox-vm-bench-") as tmp:
        top = Path(tmp)
        (top / "config").mkdir()
        (top / "config/vmpy.conf").write_text(f"[Paths]\nVMs = {top}/vms\n")
        env = {**os.environ, "XDG_CONFIG_HOME": str(top / "config")}
        kernel = args.kernel
        if kernel is None:
            kernel = top / "kernel"
            config = "CONFIG_ISO9660_FS=m"
            qemubox(env, "kernel", "build", "-f", "vm", "--config-item", config, "-o", str(kernel))
        qemubox(env, "vm", "create", "bench", "-m", "1G", "-s", "4G")
        install = timed(env, "vm", "install", "bench")
        own = boot(env, args.n, [])
        host = boot(env, args.n, ["-k", str(kernel)])
        qemubox(env, "vm", "rm", "bench")
    print(f"vm install (cached when run before): {install:.1f} s")
    print(f"{'':34}{'own kernel':>12}{'-k kernel':>12}")
    rows = ("run -d → first command", "exec -- true (agent)", "exec -- true (ssh)", "stop")
    for name, a, b in zip(rows, own, host, strict=True):
        print(f"{name:34}{a:>11.2f}s{b:>11.2f}s")
    print(f"-k boot ÷ own-kernel boot: {host[0] / own[0]:.2f}")


if __name__ == "__main__":
    main()
