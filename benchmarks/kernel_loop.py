"""The kernel developer's loop: edit one .c file, rebuild, see its output in a sandbox.

    .venv/bin/python benchmarks/kernel_loop.py [-n 3]

Works on a private copy of Debian's 6.12 source tree (hard links into the user cache's
extracted tree; an edited file is replaced, never written through a link), kept under the
user cache so that its first, full build (about 7 minutes on 2 cores) is paid once. Prints
medians of:

- `kernel build --source TREE` with nothing changed (target <= 4 s);
- a `pr_info` line changed in init/main.c -> `kernel build` -> `qemubox run --kernel ... --
  dmesg` showing the new line (target <= 10 s), and the two parts of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

from common import QEMUBOX, linked_source, seconds

ANCHOR = 'pr_notice("%s", linux_banner);'


def qemubox(*args: str) -> tuple[float, str]:
    return seconds([*QEMUBOX, *args])


def edit(tree: Path, marker: str) -> None:
    """Put a pr_info line with ``marker`` after the banner (replacing the file: the tree's
    files are hard links to the shared extracted source)."""
    main = tree / "init" / "main.c"
    lines = [ln for ln in main.read_text().splitlines(True) if "qemubox-loop:" not in ln]
    at = next(i for i, ln in enumerate(lines) if ANCHOR in ln)
    lines.insert(at + 1, f'\tpr_info("qemubox-loop: {marker}\\n");\n')
    tmp = main.with_name(".main.c.tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3, help="rounds (medians are printed)")
    args = parser.parse_args()

    tree = linked_source("bench-kernel-loop", "Makefile")
    out = tree.parent / "out"
    build = ("kernel", "build", "--source", str(tree), "-o", str(out))
    print("first build of the tree (once per cache) ...", flush=True)
    qemubox(*build)
    kernel = str(out / "vmlinuz")
    qemubox("run", "--kernel", kernel, "--", "true")  # its snapshot, as a user's would be

    same = statistics.median(qemubox(*build)[0] for _ in range(args.n))
    builds, runs, loops = [], [], []
    for _ in range(args.n):
        marker = uuid.uuid4().hex[:12]
        edit(tree, marker)
        start = time.monotonic()
        built, _ = qemubox(*build)
        ran, dmesg = qemubox("run", "--kernel", kernel, "--", "dmesg")
        loops.append(time.monotonic() - start)
        if f"qemubox-loop: {marker}" not in dmesg:
            sys.exit(f"the edited line ({marker}) is not in the sandbox's dmesg")
        builds.append(built)
        runs.append(ran)

    def verdict(value: float, target: float) -> str:
        return f"(target <= {target:g} s: {'ok' if value <= target else 'MISSED'})"

    print(f"{os.cpu_count()} CPUs, {tree}")
    print(f"kernel build, nothing changed   {same:6.2f} s  {verdict(same, 4)}")
    loop = statistics.median(loops)
    print(f"edit -> output seen in sandbox  {loop:6.2f} s  {verdict(loop, 10)}")
    print(f"  of which kernel build         {statistics.median(builds):6.2f} s")
    print(f"  of which run -- dmesg         {statistics.median(runs):6.2f} s")


if __name__ == "__main__":
    main()
