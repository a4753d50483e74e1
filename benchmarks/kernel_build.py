"""Kernel build benchmark: clean minimal build, rebuild after a one-line fragment change,
and a build with nothing changed.

Run by hand (it takes a few minutes per clean build):

    .venv/bin/python benchmarks/kernel_build.py [--kernel-version 6.12] [--reference]

It works in a scratch cache (the extracted source is borrowed from the user cache), so the
clean build is really clean. With --reference it also times plain make on the same final
config in a fresh directory and prints the ratio. Targets: clean build <= 300 s on 2 cores,
no-change build <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemubox.kernel.source import debian_source, source_cache


def qemubox(cache: Path, *args: str) -> float:
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "qemubox", *args],
        env={**os.environ, "QEMUBOX_CACHE_DIR": str(cache)},
        check=True,
        stderr=subprocess.DEVNULL,
    )
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-version", default="6.12")
    parser.add_argument("--reference", action="store_true", help="also time plain make")
    args = parser.parse_args()

    src = debian_source(args.kernel_version)  # extracted once in the user cache
    with tempfile.TemporaryDirectory(prefix="qemubox-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        cache = tmp / "cache"
        (cache / "kernel-source").mkdir(parents=True)
        os.symlink(src, cache / "kernel-source" / src.name)
        shutil.copy(source_cache() / "hashes.json", cache / "kernel-source" / "hashes.json")
        build = ["kernel", "build", "--kernel-version", args.kernel_version]

        clean = qemubox(cache, *build, "-o", str(tmp / "out"))
        manifest = json.loads((tmp / "out" / "manifest.json").read_text())
        changed = qemubox(
            cache, *build, "--config-item", "CONFIG_LOG_BUF_SHIFT=16", "-o", str(tmp / "out2")
        )
        same = qemubox(
            cache, *build, "--config-item", "CONFIG_LOG_BUF_SHIFT=16", "-o", str(tmp / "out2")
        )

        print(
            f"kernel {manifest['version']} ({manifest['profile']}, {manifest['arch']}), "
            f"{os.cpu_count()} CPUs"
        )
        print(
            f"clean minimal build        {clean:8.1f} s   (target <= 300 s: "
            f"{'ok' if clean <= 300 else 'MISSED'})"
        )
        print(f"one-line fragment change   {changed:8.1f} s   ({changed / clean:.2f} of clean)")
        print(
            f"nothing changed            {same:8.2f} s   (target <= 2 s: "
            f"{'ok' if same <= 2 else 'MISSED'})"
        )

        if args.reference:
            ref = tmp / "ref"
            ref.mkdir()
            shutil.copy(tmp / "out" / "config", ref / ".config")
            start = time.monotonic()
            subprocess.run(
                [
                    "make",
                    "-s",
                    "-C",
                    str(src),
                    f"O={ref}",
                    "ARCH=x86_64",
                    f"-j{os.cpu_count()}",
                    "olddefconfig",
                    "vmlinux",
                    "modules",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            plain = time.monotonic() - start
            print(
                f"plain make, same config    {plain:8.1f} s   (clean qemubox build / plain "
                f"make = {clean / plain:.2f})"
            )


if __name__ == "__main__":
    main()
