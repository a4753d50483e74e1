"""File operations benchmark: each of `sandbox.files`' operations (one agent request) against
the same operation done as a command in the guest (busybox, what a file API built on
`exec` would run), in one sandbox, medians of the same run; and a directory watch's event
latency (a file made by a command until its CREATE event arrives).

Run by hand:

    .venv/bin/python benchmarks/files.py [--kernel PATH] [-n 50]

Targets: each operation through the agent at most half the command's time (under TCG a
command's fork and exec of busybox cost more than the request itself).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import warnings

from qemubox.sandbox.sandbox import Sandbox
from qemubox.sandbox.spec import Session

warnings.simplefilter("ignore")
BUSYBOX = "/run/qemubox/busybox"
ONE = "/tmp/b/many/1"


def median_ms(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def shell(sb: Sandbox, script: str) -> None:
    r = sb.exec([BUSYBOX, "sh", "-c", script])
    assert r.exit_code == 0, r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default=None)
    ap.add_argument("-n", type=int, default=50)
    args = ap.parse_args()
    with Sandbox(Session(memory="256M", kernel=args.kernel)) as sb:
        shell(sb, "mkdir -p /tmp/b/many && cd /tmp/b/many && seq 1000 | xargs touch")
        f = sb.files
        pairs = {
            "stat": (
                lambda: f.stat("/tmp/b/many/1"),
                lambda: shell(sb, f"{BUSYBOX} stat -c '%f %u %g %s %Y' /tmp/b/many/1"),
            ),
            "list 1000 entries": (
                lambda: f.list("/tmp/b/many"),
                lambda: shell(sb, f"{BUSYBOX} ls -la --full-time /tmp/b/many >/dev/null"),
            ),
            "make_dir + remove": (
                lambda: (f.make_dir("/tmp/b/d/e"), f.remove("/tmp/b/d")),
                lambda: shell(sb, "mkdir -p /tmp/b/d/e && rm -r /tmp/b/d"),
            ),
            "rename there and back": (
                lambda: (f.rename(ONE, "/tmp/b/x"), f.rename("/tmp/b/x", ONE)),
                lambda: shell(sb, "mv /tmp/b/many/1 /tmp/b/x && mv /tmp/b/x /tmp/b/many/1"),
            ),
        }  # fmt: skip
        print(f"{'operation':24} {'agent ms':>9} {'command ms':>11} {'ratio':>6}")
        for name, (agent, command) in pairs.items():
            agent(), command()  # warm: translated code, caches
            a, c = median_ms(args.n, agent), median_ms(args.n, command)
            print(f"{name:24} {a:9.2f} {c:11.2f} {a / c:6.2f}")

        arrived = threading.Event()
        with f.watch("/tmp/b", on_event=lambda ev: arrived.set()):
            latencies = []
            for i in range(args.n):
                arrived.clear()
                start = time.perf_counter()
                sb.exec([BUSYBOX, "touch", f"/tmp/b/w{i}"])
                made = time.perf_counter()
                arrived.wait(10)
                latencies.append((time.perf_counter() - start, time.perf_counter() - made))
        whole = statistics.median(t for t, _ in latencies) * 1000
        after = statistics.median(t for _, t in latencies) * 1000
        print(f"watch: touch to CREATE event {whole:.2f} ms median ({after:.2f} ms after exec)")


if __name__ == "__main__":
    main()
