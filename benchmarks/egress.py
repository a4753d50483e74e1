"""Egress benchmark: what egress rules cost against plain user networking, in the same run.

Run by hand:

    .venv/bin/python benchmarks/egress.py [-n 3] [--mb 200] [--connections 50] [--kernel PATH]

A server on 127.0.0.1 (the guest's 10.0.2.2 under --net user; the name data.test, pinned
there, under allow=data.test) serves MB megabytes. Measured, each the median of n:
- throughput: busybox wget of the whole download to /dev/null, inside one sandbox per mode;
- connection setup: CONNECTIONS small requests in a row (each a new connection), per
  connection: under --net user by address, under allow= by address (allow=127.0.0.1) and by
  name (each request resolves data.test through the rules' resolver first);
- start: `qemubox run -- true`, whose proxy starts with QEMU under rules.
Target: throughput under rules at least 0.8x --net user's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from common import timed

from qemubox.sandbox.sandbox import Sandbox
from qemubox.sandbox.spec import Session

warnings.simplefilter("ignore")
BLOCK = os.urandom(1 << 20)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        mb = int(self.path.strip("/") or 0)
        self.send_response(200)
        self.send_header("Content-Length", str(mb << 20))
        self.end_headers()
        for _ in range(mb):
            self.wfile.write(BLOCK)

    def log_message(self, *args):
        pass


def serve() -> int:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def _median_exec(box: Sandbox, script: str, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.monotonic()
        r = box.exec(["sh", "-c", script], timeout=600)
        times.append(time.monotonic() - start)
        if r.exit_code != 0:
            raise SystemExit(f"{script}: {r.stderr.decode().strip()}")
    return statistics.median(times)


def measure(session: Session, url: str, small: list[str], args) -> tuple[float, list[float]]:
    """(MB/s of the download, seconds per connection for each URL of ``small``)."""
    with Sandbox(session) as box:
        seconds = _median_exec(box, f"wget -qO /dev/null {url}{args.mb}", args.n)
        loop = f"for i in $(seq {args.connections}); do wget -qO /dev/null {{}}0 || exit 1; done"
        setup = [_median_exec(box, loop.format(u), args.n) / args.connections for u in small]
    return args.mb / seconds, setup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--kernel")
    args = parser.parse_args()
    port = serve()
    by_address = f"http://10.0.2.2:{port}/"
    by_name = f"http://data.test:{port}/"
    common = {"kernel": args.kernel, "timeout": None, "memory": "512M"}
    user_rate, (user_setup,) = measure(
        Session(network="user", **common), by_address, [by_address], args
    )
    rules = Session(
        network="allow=data.test,127.0.0.1", add_hosts=["data.test:127.0.0.1"], **common
    )
    rules_rate, (address_setup, name_setup) = measure(rules, by_name, [by_address, by_name], args)
    env = dict(os.environ)
    kernel = ["--kernel", args.kernel] if args.kernel else []
    starts = {}
    for net in ("user", "allow=data.test"):
        runs = [timed(env, "run", *kernel, "--net", net, "--", "true") for _ in range(args.n)]
        starts[net] = statistics.median(runs)

    print(f"{'':32} {'--net user':>12} {'allow=':>12} {'ratio':>7}")
    print(
        f"{'download (MB/s)':32} {user_rate:12.1f} {rules_rate:12.1f} {rules_rate / user_rate:7.2f}"
    )
    print(
        f"{'connection, by address (ms)':32} {user_setup * 1000:12.1f} "
        f"{address_setup * 1000:12.1f} {address_setup / user_setup:7.2f}"
    )
    print(
        f"{'connection, by name (ms)':32} {'':12} {name_setup * 1000:12.1f} "
        f"{name_setup / user_setup:7.2f}"
    )
    print(
        f"{'qemubox run -- true (s)':32} {starts['user']:12.2f} {starts['allow=data.test']:12.2f} "
        f"{starts['allow=data.test'] / starts['user']:7.2f}"
    )
    ratio = rules_rate / user_rate
    print(f"throughput under rules: {ratio:.2f}x --net user's (target >= 0.8x)")
    return 0 if ratio >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
