"""Sandbox benchmark: cold one-shot runs against the bare QEMU floor (and virtme-ng), warm
exec round trips, idle memory, and many one-shot runs in parallel.

Run by hand:

    .venv/bin/python benchmarks/sandbox.py [--kernel build/kernel/vmlinuz] [--vng PATH] [-n 5]

The floor is the same QEMU and kernel booting a busybox initramfs whose init only powers
off. With --vng (a virtme-ng `vng` executable; `pip install virtme-ng` gives one) it also
times `vng --disable-kvm -r <kernel> -- true`. Targets: cold/floor <= 1.15, cold/vng <= 0.25,
warm exec median <= 20 ms, idle RSS of a 256M session <= 80 MiB, 16 parallel runs correct.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qemubox import arch
from qemubox.guest.cpio import CpioWriter
from qemubox.kernel.artifacts import choose_kernel
from qemubox.model.plan import kernel_cmdline
from qemubox.qemu import cmdline as qemu
from qemubox.sandbox.sandbox import Sandbox
from qemubox.sandbox.spec import Session

warnings.simplefilter("ignore")


def as_installed() -> None:
    """Byte-compile qemubox as an installed package is, so that whole CLI processes are
    timed as a user's run (whatever PYTHONDONTWRITEBYTECODE says here)."""
    import compileall

    import qemubox

    compileall.compile_dir(Path(qemubox.__file__).parent, quiet=1)


def timed(args: list[str], check=True, **kw) -> float:
    start = time.monotonic()
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, **kw)
    took = time.monotonic() - start
    if check and proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr.decode()[-2000:]}")
    return took


def median_of(n: int, fn) -> float:
    return statistics.median(fn() for _ in range(n))


def floor_initramfs(path: Path) -> None:
    with open(path, "wb") as fh:
        cpio = CpioWriter(fh)
        cpio.add_host_file("bin/busybox", Path("/bin/busybox"), 0o755)
        cpio.add_char_device("dev/console", 5, 1)
        cpio.add_file("init", b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n", 0o755)
        cpio.close()


def floor_args(kernel: str, memory_mib: int, initrd: Path) -> list[str]:
    """The floor: the same QEMU and kernel booting an init that only powers off."""
    return qemu.bare_boot_args(
        "x86_64",
        "tcg",
        kernel,
        kernel_cmdline(arch.get("x86_64"), "tcg", qemu.host_tsc_khz()),
        "null",
        memory_mib=memory_mib,
        initrd=initrd,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", help="kernel image (default: what qemubox run picks)")
    parser.add_argument("--vng", help="a virtme-ng vng executable, to compare with")
    parser.add_argument("-n", type=int, default=5, help="repetitions (medians are printed)")
    args = parser.parse_args()

    as_installed()
    kernel = choose_kernel(args.kernel)
    image = kernel.image
    qemubox = [sys.executable, "-m", "qemubox", "run", "--kernel", image, "--accel", "tcg"]
    qemubox.append("--no-snapshot")  # booted: snapshot-restored starts are benchmarks/snapshot.py's
    timed([*qemubox, "--", "true"])  # warm the caches (initramfs, agent, KVM verdict)
    print(f"kernel: {kernel.description} ({image})")

    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(tmp) / "floor.cpio"
        floor_initramfs(initrd)
        floor = floor_args(image, 512, initrd)
        # Interleaved, so that drift in the host's speed hits both alike.
        floors, colds = [], []
        for _ in range(args.n):
            floors.append(timed(floor))
            colds.append(timed([*qemubox, "--", "true"]))
        floor, cold = statistics.median(floors), statistics.median(colds)
    print(f"bare floor (QEMU + kernel + init that powers off)  {floor:6.2f} s")
    print(
        f"qemubox run -- true (cold, whole CLI)              {cold:6.2f} s   "
        f"ratio {cold / floor:.2f} (target <= 1.15)"
    )

    if args.vng:
        # vng may report 255 when it cannot find its I/O ports (no udev); the time counts.
        vng_args = [args.vng, "--disable-kvm", "-r", image, "--", "true"]
        vng_bin = str(Path(args.vng).resolve().parent)  # vng runs helpers installed beside it
        vng_env = {**os.environ, "PATH": f"{vng_bin}:{os.environ.get('PATH', '')}"}
        vng = median_of(args.n, lambda: timed(vng_args, check=False, env=vng_env))
        print(
            f"vng --disable-kvm -r <same kernel> -- true          {vng:6.2f} s   "
            f"ratio {cold / vng:.2f} (target <= 0.25)"
        )

    with Sandbox(Session(memory="256M", kernel=image, accel="tcg")) as box:
        for _ in range(5):
            box.exec(["true"])
        rounds = []
        for _ in range(50):
            start = time.monotonic()
            box.exec(["true"])
            rounds.append(time.monotonic() - start)
        time.sleep(2)
        status = Path(f"/proc/{box.pid}/status").read_text()
        rss_kib = int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS")).split()[1])
    warm = statistics.median(rounds) * 1000
    print(f"warm exec round trip (true), median of 50         {warm:6.1f} ms (target <= 20)")
    print(
        f"idle RSS of a 256M session (QEMU)                 {rss_kib / 1024:6.1f} MiB "
        "(target <= 80)"
    )

    # Attaching to a running guest from another client: connect, HELLO, READY, first exec.
    box = Sandbox(Session(memory="256M", kernel=image, accel="tcg")).start(detach=True)
    vm_id = box.detach()
    attaches = []
    for _ in range(20):
        start = time.monotonic()
        client = Sandbox.attach(vm_id)
        client.exec(["true"])
        attaches.append(time.monotonic() - start)
        client.detach()
    Sandbox.attach(vm_id).close()
    attach_ms = statistics.median(attaches) * 1000
    print(f"attach to a running guest + first exec, median    {attach_ms:6.1f} ms")

    def one(n: int) -> bool:
        proc = subprocess.run(
            [*qemubox, "--", "sh", "-c", f"echo {n}"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=600,
        )
        return proc.returncode == 0 and proc.stdout == f"{n}\n".encode()

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        ok = list(pool.map(one, range(16)))
    took = time.monotonic() - start
    print(f"16 one-shot runs in parallel                      {took:6.1f} s, {sum(ok)}/16 correct")


if __name__ == "__main__":
    main()
