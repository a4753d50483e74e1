"""Snapshot benchmark: starts that restore a booted guest, or take a warm pool's machine,
against booting and against the bare QEMU floor, all measured in the same run.

    .venv/bin/python benchmarks/snapshot.py [--kernel PATH] [-n 5]

Prints medians of:
- a `Sandbox` start to its first command's output: booted, restored, from a warm pool
  (targets: restored / booted <= 0.05; pool <= 30 ms);
- `qemubox run -- true` as a whole process: with a snapshot (the default), with
  `--no-snapshot`, and the floor (the same QEMU and kernel booting an init that powers off)
  (targets: snapshot / floor <= 0.15, snapshot / --no-snapshot <= 0.15, --no-snapshot /
  floor <= 1.10);
- the memory (PSS, from /proc/PID/smaps_rollup) of 16 idle sandboxes restored from one
  snapshot against 16 booted ones (target <= 0.5);
- a named sandbox's pause and resume;
- with working KVM, the same starts under KVM (here: said when there is none).
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

from sandbox import as_installed, floor_args, floor_initramfs  # benchmarks/sandbox.py

from qemubox import Pool, Sandbox, Session, arch
from qemubox.kernel.artifacts import choose_kernel

warnings.simplefilter("ignore")
MEMORY = "256M"


def first_output(session: Session) -> float:
    start = time.monotonic()
    with Sandbox(session) as box:
        box.exec(["echo", "hi"])
        return time.monotonic() - start


def timed(args: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(args, check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return time.monotonic() - start


def cli(*args: str) -> float:
    return timed([sys.executable, "-m", "qemubox", *args])


def median(f, n: int) -> float:
    return statistics.median(f() for _ in range(n))


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def idle_pss(session: Session, count: int) -> int:
    """Total PSS of ``count`` idle sandboxes of ``session`` (their QEMUs), in KiB."""
    boxes = []
    try:
        for _ in range(count):
            box = Sandbox(session).start()
            box.exec(["true"])
            boxes.append(box)
        time.sleep(1)
        return sum(pss_kib(box.pid) for box in boxes)
    finally:
        for box in boxes:
            box.close()


def kvm_line(kernel: str) -> str:
    """The same starts under KVM where it works; otherwise why they were not measured."""
    import platform

    from qemubox.qemu.accel import choose_accel

    host = arch.normalize(platform.machine())
    choice = choose_accel("auto", arch.get(host).qemu_binary, kernel, host, host)
    if choice.accel != "kvm":
        return f"KVM: not measured here ({choice.reason or 'no /dev/kvm'})"
    kw = {"memory": MEMORY, "kernel": kernel, "accel": "kvm"}
    first_output(Session(**kw))
    booted = median(lambda: first_output(Session(snapshot=False, **kw)), 5)
    restored = median(lambda: first_output(Session(**kw)), 5)
    return (
        f"KVM: start to first output booted {booted * 1000:.0f} ms (target <= 150 to init), "
        f"restored {restored * 1000:.0f} ms (target <= 10 for the restore)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel")
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    as_installed()
    kernel = choose_kernel(args.kernel).image
    kw = {"memory": MEMORY, "kernel": kernel, "accel": "tcg"}
    first_output(Session(**kw))  # its snapshot recorded, if it was not

    booted = median(lambda: first_output(Session(snapshot=False, **kw)), args.n)
    restored = median(lambda: first_output(Session(**kw)), args.n)
    pool_session = Session(memory="240M", kernel=kernel, accel="tcg")  # a pool of its own
    with Pool(pool_session, size=2):
        first_output(pool_session)
        time.sleep(0.5)
        pooled = []
        for _ in range(args.n):
            pooled.append(first_output(pool_session))
            time.sleep(0.5)  # its replacement started
        pooled_ms = statistics.median(pooled) * 1000

    k = ["--kernel", kernel, "--accel", "tcg", "-m", MEMORY]
    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(tmp) / "floor.cpio"
        floor_initramfs(initrd)
        floor_run = floor_args(kernel, 256, initrd)
        floors, snaps, colds = [], [], []
        for _ in range(args.n):  # interleaved: drift in the host's speed hits all alike
            floors.append(timed(floor_run))
            snaps.append(cli("run", *k, "--", "true"))
            colds.append(cli("run", *k, "--no-snapshot", "--", "true"))
    floor, snap, cold = map(statistics.median, (floors, snaps, colds))

    pss_restored = idle_pss(Session(**kw), 16)
    pss_booted = idle_pss(Session(snapshot=False, **kw), 16)

    with tempfile.TemporaryDirectory() as state:
        os.environ["QEMUBOX_STATE_DIR"] = state
        cli("create", *k, "b")
        pauses, resumes = [], []
        for _ in range(args.n):
            pauses.append(cli("pause", "b"))
            resumes.append(cli("resume", "b"))
        cli("rm", "-f", "b")

    def target(value: float, limit: float) -> str:
        return f"(target <= {limit:g}: {'ok' if value <= limit else 'MISSED'})"

    print(f"TCG, {os.cpu_count()} CPUs, {kernel}, {MEMORY}, medians of {args.n}")
    print(f"Sandbox start to first output: booted {booted * 1000:.0f} ms, ", end="")
    print(f"restored {restored * 1000:.0f} ms, from a warm pool {pooled_ms:.0f} ms")
    print(f"  restored / booted = {restored / booted:.3f} {target(restored / booted, 0.05)}")
    print(f"  from a pool: {pooled_ms:.0f} ms {target(pooled_ms, 30)}")
    print(f"qemubox run -- true: snapshot {snap:.2f} s, --no-snapshot {cold:.2f} s, ", end="")
    print(f"floor {floor:.2f} s")
    print(f"  snapshot / floor = {snap / floor:.3f} {target(snap / floor, 0.15)}")
    print(f"  snapshot / --no-snapshot = {snap / cold:.3f} {target(snap / cold, 0.15)}")
    print(f"  --no-snapshot / floor = {cold / floor:.3f} {target(cold / floor, 1.10)}")
    ratio = pss_restored / pss_booted
    print(f"16 idle sandboxes, PSS: restored {pss_restored >> 10} MiB, ", end="")
    print(f"booted {pss_booted >> 10} MiB = {ratio:.2f} {target(ratio, 0.5)}")
    pause, resume = statistics.median(pauses), statistics.median(resumes)
    print(f"pause {pause:.2f} s, resume {resume:.2f} s ({MEMORY} guest, whole processes)")
    print(kvm_line(kernel))


if __name__ == "__main__":
    main()
