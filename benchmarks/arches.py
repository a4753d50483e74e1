"""Architectures benchmark: per architecture under TCG, a boot to a ready agent and a whole
`run -- true` (booted, and restored from a snapshot where QEMU restores the arch), against
this host's own architecture in the same run (the ratio says what emulating another
instruction set costs beyond emulating this one); with --builds, the clean cross build of
each minimal kernel.

Run by hand (boots take seconds each; a clean build takes minutes per architecture):

    .venv/bin/python benchmarks/arches.py [-n 3] [--arch s390x ...] [--debian] [--builds]

Each arch boots the kernel `run --arch` picks (qemubox's newest build for it, else Debian's
kernel package; with --debian, Debian's, and riscv64, which has none, is left out); riscv64
needs one built (`qemubox kernel build --arch riscv64`). Figures are
medians of n. Builds run in a scratch cache (the extracted source is borrowed), so they are
really clean.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import QEMUBOX

from qemubox import arch as arches
from qemubox.kernel.source import debian_source, source_cache

BOOT = "kernel boot to agent ready"


def run_true(arch: str, *options: str) -> tuple[float, float | None]:
    """(seconds of the whole `run -- true`, seconds of its boot to a ready agent)."""
    start = time.monotonic()
    proc = subprocess.run(
        [*QEMUBOX, "run", "--arch", arch, "--accel", "tcg", "--timings", *options, "--", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    whole = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"run --arch {arch} failed: {proc.stderr.strip()[-800:]}")
    m = re.search(rf"^{BOOT}\s+([\d.]+) ms$", proc.stderr, re.M)
    return whole, float(m.group(1)) / 1000 if m else None


def clean_build(arch: str) -> float:
    src = debian_source("6.12")
    with tempfile.TemporaryDirectory(prefix="qemubox-bench-") as tmp_dir:
        cache = Path(tmp_dir) / "cache"
        (cache / "kernel-source").mkdir(parents=True)
        os.symlink(src, cache / "kernel-source" / src.name)
        shutil.copy(source_cache() / "hashes.json", cache / "kernel-source" / "hashes.json")
        start = time.monotonic()
        subprocess.run(
            [*QEMUBOX, "kernel", "build", "--arch", arch, "-o", str(Path(tmp_dir) / "out")],
            env={**os.environ, "QEMUBOX_CACHE_DIR": str(cache)},
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("--arch", action="append", choices=list(arches.ARCHES))
    parser.add_argument("--debian", action="store_true", help="boot Debian's kernel packages")
    parser.add_argument("--builds", action="store_true", help="also time clean cross builds")
    args = parser.parse_args()
    host = arches.host().name
    wanted = [host, *[a for a in args.arch or arches.ARCHES if a != host]]
    kernel = ["--kernel", "debian"] if args.debian else []
    if args.debian:
        wanted = [a for a in wanted if arches.get(a).debian_kernel]

    print(f"{'arch':10} {'boot to agent':>14} {'run (booted)':>13} {'run (restored)':>15}")
    reference = None
    for name in wanted:
        booted = [run_true(name, *kernel, "--no-snapshot") for _ in range(args.n)]
        restored = "        (boots)"  # an arch QEMU does not restore reliably
        if arches.get(name).migrates:
            run_true(name, *kernel)  # records the snapshot
            again = statistics.median(run_true(name, *kernel)[0] for _ in range(args.n))
            restored = f"{again:13.2f} s"
        boot = statistics.median(b for _, b in booted if b is not None)
        whole = statistics.median(w for w, _ in booted)
        if reference is None:
            reference = boot
        print(
            f"{name:10} {boot:12.2f} s {whole:11.2f} s {restored}"
            f"   boot {boot / reference:4.1f}x {host}'s"
        )
    if args.builds:
        print(f"\nclean minimal builds (Linux 6.12, {os.cpu_count()} CPUs)")
        for name in wanted:
            print(f"{name:10} {clean_build(name):8.0f} s")


if __name__ == "__main__":
    main()
