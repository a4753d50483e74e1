"""Bisection benchmark: one step of `qemubox bisect` (build the checkout, boot it, run the
command) against doing the same by hand, and a revisited step, in the same run.

    .venv/bin/python benchmarks/bisect.py [-n 3]

Works on a private git repository of Debian's 6.12 source (hard links into the user cache's
extracted tree; git replaces a file it checks out, never writes through a link), kept under
the user cache so that its first, full build is paid once. Each round commits a new
`pr_info` line in init/main.c, twice (revisions A and B), then measures, medians of n:

- by hand, at A: `kernel build --source TREE` then `run --kernel IMAGE -- CMD` (the floor);
- a step at B, as `git bisect run` runs it: an incremental build, a boot, the command;
- a step at A again: a revisit, whose build is taken from the cache.
Targets: a step costs at most 1.1x the same by hand; a revisit at most 1.5x the run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import linked_source, seconds

ANCHOR = 'pr_notice("%s", linux_banner);'
GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]


def private_repository() -> Path:
    """Our own git repository of the 6.12 tree: hard links, made once."""
    tree = linked_source("bench-bisect", ".git")
    if not (tree / ".git").is_dir():
        ignore = tree / ".gitignore"  # Debian's ignores every file at the top
        kept = ignore.read_text().split("# Debian packaging")[0]
        ignore.unlink()
        ignore.write_text(kept)
        subprocess.run([*GIT, "-C", str(tree), "init", "-q", "-b", "main"], check=True)
        subprocess.run([*GIT, "-C", str(tree), "add", "-A"], check=True)
        subprocess.run([*GIT, "-C", str(tree), "commit", "-qm", "base"], check=True)
    return tree


def commit(tree: Path, marker: str) -> str:
    """A new revision whose boot prints ``marker`` (init/main.c replaced, not written)."""
    main = tree / "init" / "main.c"
    lines = [ln for ln in main.read_text().splitlines(True) if "qemubox-bisect:" not in ln]
    at = next(i for i, ln in enumerate(lines) if ANCHOR in ln)
    lines.insert(at + 1, f'\tpr_info("qemubox-bisect: {marker}\\n");\n')
    tmp = main.with_name(".main.c.tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, main)
    subprocess.run([*GIT, "-C", str(tree), "commit", "-qam", marker], check=True)
    return subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def step(tree: Path, marker: str, record: Path) -> float:
    """One step as `git bisect run` runs it; its verdict must be good."""
    spec = record.with_suffix(".json")
    check = ["--", "sh", "-c", f"dmesg | grep -q 'qemubox-bisect: {marker}'"]
    spec.write_text(
        json.dumps(
            {"tree": str(tree), "arch": None, "profile": "minimal", "run_args": check,
             "record": str(record)}
        )
    )  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "qemubox.bisect.step", str(spec)], capture_output=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"the step at {marker} was not good:\n{proc.stderr.decode()[-2000:]}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3, help="rounds (medians are printed)")
    args = parser.parse_args()

    tree = private_repository()
    qemubox = [sys.executable, "-m", "qemubox"]
    build = [*qemubox, "kernel", "build", "--source", str(tree), "-o"]
    print("first build of the tree (once per cache) ...", flush=True)
    with tempfile.TemporaryDirectory() as d:
        seconds([*build, f"{d}/k"])
        hand_builds, hand_runs, steps, revisits = [], [], [], []
        for i in range(args.n):
            a, b = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
            first = commit(tree, a)
            out = f"{d}/a{i}"
            built, _ = seconds([*build, out])
            ran, dmesg = seconds([*qemubox, "run", "--kernel", f"{out}/vmlinuz", "--", "dmesg"])
            if f"qemubox-bisect: {a}" not in dmesg:
                sys.exit(f"revision {a} does not print its line")
            hand_builds.append(built)
            hand_runs.append(ran)
            commit(tree, b)
            steps.append(step(tree, b, Path(d) / f"b{i}.jsonl"))
            subprocess.run(["git", "-C", str(tree), "checkout", "-q", first], check=True)
            revisits.append(step(tree, a, Path(d) / f"r{i}.jsonl"))
            subprocess.run(["git", "-C", str(tree), "checkout", "-q", "main"], check=True)

    by_hand = statistics.median(b + r for b, r in zip(hand_builds, hand_runs, strict=True))
    run = statistics.median(hand_runs)
    one, again = statistics.median(steps), statistics.median(revisits)
    print(f"{os.cpu_count()} CPUs, {tree}")
    print(f"by hand: kernel build + run      {by_hand:6.2f} s "
          f"(build {statistics.median(hand_builds):.2f} s, run {run:.2f} s)")  # fmt: skip
    print(f"bisect step: build, boot, CMD    {one:6.2f} s  {one / by_hand:5.2f}x by hand "
          f"(target <= 1.1x)")  # fmt: skip
    print(f"revisited step: cached build     {again:6.2f} s  {again / run:5.2f}x the run "
          f"(target <= 1.5x)")  # fmt: skip


if __name__ == "__main__":
    main()
