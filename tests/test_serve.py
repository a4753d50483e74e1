"""`qemubox serve` driven by E2B's own Python SDK (the `e2b` package, unchanged), against
real guests of the `base` template: lifecycle, commands, terminals, files, watches, list
filters and pagination, timeouts, pause and resume, metrics, keys and tokens, a server
killed and restarted, creates at once, bad requests."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import e2b
import httpx
import pytest
from e2b import AsyncSandbox, Sandbox
from e2b.exceptions import AuthenticationException, NotFoundException, SandboxException

pytestmark = pytest.mark.qemu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `qemubox serve` of its own state directory, started and restarted as a user would."""

    def __init__(
        self, state, port: int, kernel: str, tls: tuple[str, str] | None = None, *extra: str
    ):
        self.state, self.port, self.tls, self.kernel = state, port, tls, kernel
        self.extra = extra
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.env = {**os.environ, "QEMUBOX_STATE_DIR": str(state)}
        self.proc: subprocess.Popen | None = None
        self.log = state.parent / "serve.log"

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "qemubox", *args],
            env=self.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qemubox", "serve", "--listen", f"127.0.0.1:{self.port}",
                 "--kernel", self.kernel, *self.extra,
                 *(["--tls-cert", self.tls[0], "--tls-key", self.tls[1]] if self.tls else [])],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 600  # the first start builds the base image
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                verify = ssl.create_default_context(cafile=self.tls[0]) if self.tls else True
                if httpx.get(f"{self.url}/health", timeout=1, verify=verify).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("the server did not listen: " + self.log.read_text()[-3000:])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def opts(self, key: str) -> dict:
        return {"api_key": key, "api_url": self.url, "sandbox_url": self.url}


@pytest.fixture(scope="module")
def server(tmp_path_factory, kernel):
    """A server of qemubox's own kernel (tickless: an idle guest costs little of a core, under
    TCG a tenth of what Debian's does, which counts with 24 at once)."""
    state = tmp_path_factory.mktemp("serve") / "state"
    state.mkdir(mode=0o700)
    srv = Server(state, _free_port(), kernel)
    keys = {}
    for name in ("alice", "bob"):
        r = srv.cli("serve", "key", "add", name)
        assert r.returncode == 0, r.stderr
        keys[name] = r.stdout.strip()
    srv.keys = keys
    srv.start()
    yield srv
    srv.stop()
    for name in os.listdir(state / "sandboxes") if (state / "sandboxes").is_dir() else []:
        srv.cli("rm", "-f", name)


def test_a_sandbox_through_the_sdk(server):
    opts = server.opts(server.keys["alice"])
    sbx = Sandbox.create(metadata={"app": "t1"}, envs={"FROM_CREATE": "yes"}, timeout=300, **opts)
    try:
        # commands: output, user, home, environment, working directory, exit codes
        r = sbx.commands.run("uname -r; whoami; pwd; echo $FROM_CREATE $EXTRA", envs={"EXTRA": "x"})
        lines = r.stdout.split("\n")
        assert lines[1:4] == ["user", "/home/user", "yes x"], r.stdout
        assert r.exit_code == 0
        assert sbx.commands.run("whoami", user="root").stdout == "root\n"
        assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
        assert sbx.commands.run("sudo -n id -u").stdout == "0\n"
        with pytest.raises(e2b.CommandExitException) as exc:
            sbx.commands.run("echo out; echo err >&2; exit 3")
        assert (exc.value.exit_code, exc.value.stdout, exc.value.stderr) == (3, "out\n", "err\n")

        # a background command: listed, fed, followed by a second handle, killed
        handle = sbx.commands.run(
            "read line; echo got:$line; sleep 600", background=True, stdin=True
        )
        assert handle.pid > 1
        listed = {p.pid: p for p in sbx.commands.list()}
        assert handle.pid in listed and listed[handle.pid].cmd == "/bin/bash"
        sbx.commands.send_stdin(handle.pid, "hello\n")
        time.sleep(1)
        other = sbx.commands.connect(handle.pid)
        assert sbx.commands.kill(handle.pid)
        with pytest.raises(e2b.CommandExitException) as exc:
            handle.wait()
        assert exc.value.stdout == "got:hello\n"
        with pytest.raises(e2b.CommandExitException):
            other.wait()
        assert handle.pid not in {p.pid for p in sbx.commands.list()}
        assert not sbx.commands.kill(handle.pid)  # gone: False, as E2B's

        # stdin closed: a command reading to its end finishes
        cat = sbx.commands.run("wc -c", background=True, stdin=True)
        sbx.commands.send_stdin(cat.pid, "12345")
        sbx.commands.close_stdin(cat.pid)
        assert cat.wait().stdout.strip() == "5"

        # files: write, read, list, stat, mkdir, rename, remove, several at once
        info = sbx.files.write("notes/a.txt", "alpha")
        assert info.path == "/home/user/notes/a.txt"
        assert sbx.files.read("notes/a.txt") == "alpha"
        assert sbx.files.read("/home/user/notes/a.txt", format="bytes") == b"alpha"
        assert sbx.commands.run("stat -c %U /home/user/notes/a.txt").stdout == "user\n"
        sbx.files.write_files(
            [{"path": "/tmp/m/1", "data": b"one"}, {"path": "/tmp/m/2", "data": "two"}]
        )
        assert sorted(e.name for e in sbx.files.list("/tmp/m")) == ["1", "2"]
        st = sbx.files.get_info("/tmp/m/2")
        assert (st.type.value, st.size, st.owner) == ("file", 3, "user")
        assert sbx.files.make_dir("/tmp/d/e")
        assert not sbx.files.make_dir("/tmp/d/e")
        assert [e.name for e in sbx.files.list("/tmp/d", depth=2)] == ["e"] or len(
            sbx.files.list("/tmp/d", depth=2)
        ) == 1
        sbx.files.rename("/tmp/m/1", "/tmp/m/one")
        assert sbx.files.exists("/tmp/m/one") and not sbx.files.exists("/tmp/m/1")
        sbx.files.remove("/tmp/m")
        assert not sbx.files.exists("/tmp/m")
        with pytest.raises(NotFoundException):
            sbx.files.read("/nonexistent")
        with pytest.raises(SandboxException):
            sbx.files.write("/root/nope", "x")  # user may not write root's home
        big = os.urandom(1 << 20)
        sbx.files.write("/tmp/big", big, gzip=True)
        assert sbx.files.read("/tmp/big", format="bytes", gzip=True) == big

        # a watch (the synchronous SDK polls its watcher): the events since the last poll
        watch = sbx.files.watch_dir("/tmp", recursive=True)
        sbx.commands.run("mkdir -p /tmp/w && echo x > /tmp/w/f")
        events = []
        deadline = time.monotonic() + 20
        while not any(e.name == "w/f" for e in events) and time.monotonic() < deadline:
            events += watch.get_new_events()
            time.sleep(0.1)
        watch.stop()
        assert any(e.name == "w/f" and e.type.name == "CREATE" for e in events), events
        assert any(e.name == "w" and e.type.name == "CREATE" for e in events), events

        # a terminal: output, input, a resize; another killed
        out = bytearray()
        term = sbx.pty.create(e2b.PtySize(rows=24, cols=80))
        sbx.pty.send_stdin(term.pid, b"stty size; touch /tmp/ready; read x; stty size; exit\n")
        deadline = time.monotonic() + 30
        while not sbx.files.exists("/tmp/ready") and time.monotonic() < deadline:
            time.sleep(0.1)
        sbx.pty.resize(term.pid, e2b.PtySize(rows=40, cols=132))
        sbx.pty.send_stdin(term.pid, b"\n")
        assert term.wait(on_pty=out.extend).exit_code == 0
        assert b"24 80" in out and b"40 132" in out, bytes(out)
        second = sbx.pty.create(e2b.PtySize(rows=24, cols=80))
        assert sbx.pty.kill(second.pid)
        with pytest.raises(e2b.CommandExitException):
            second.wait()

        # info, timeout, metrics
        got = Sandbox.get_info(sbx.sandbox_id, **opts)
        assert got.metadata == {"app": "t1"} and got.template_id == "base"
        assert got.state.value == "running"
        sbx.set_timeout(600)
        later = Sandbox.get_info(sbx.sandbox_id, **opts)
        assert later.end_at.timestamp() > time.time() + 550
        metrics = sbx.get_metrics()
        assert metrics and metrics[-1].mem_used > 0 and metrics[-1].cpu_count == 1

        # the sandbox is a named sandbox
        ls = server.cli("ls")
        assert sbx.sandbox_id in ls.stdout
    finally:
        sbx.kill()
    assert not Sandbox.kill(sbx.sandbox_id, **opts)  # gone
    with pytest.raises(SandboxException):
        sbx.commands.run("true")


def qemu_pid(server, sandbox_id: str) -> int:
    """The pid of a served sandbox's QEMU, from its record and its machine's files."""
    from qemubox import paths

    record = json.loads((server.state / "sandboxes" / sandbox_id / "record.json").read_text())
    return int((paths.machine_runtime_dir(record["machine"]) / "qemu.pid").read_text())


def _api(server, method: str, path: str, key: str | None, **kw) -> httpx.Response:
    headers = kw.pop("headers", {})
    if key is not None:
        headers["X-API-Key"] = key
    return httpx.request(method, server.url + path, headers=headers, timeout=120, **kw)


def test_keys_owners_lists_and_bad_requests(server):
    alice, bob = server.opts(server.keys["alice"]), server.opts(server.keys["bob"])
    made = [
        Sandbox.create(metadata={"team": "x", "n": str(i)}, timeout=120, **alice) for i in range(3)
    ]
    try:
        # list: filtered by metadata and state, paged with the SDK's paginator
        found = Sandbox.list(query=e2b.SandboxQuery(metadata={"team": "x"}), **alice)
        ids = []
        pages = 0
        paginator = Sandbox.list(query=e2b.SandboxQuery(metadata={"team": "x"}), limit=2, **alice)
        while paginator.has_next:
            ids += [s.sandbox_id for s in paginator.next_items()]
            pages += 1
        assert sorted(ids) == sorted(s.sandbox_id for s in made) and pages == 2
        assert [s.metadata["n"] for s in found.next_items()] == ["2", "1", "0"]  # newest first
        one = Sandbox.list(query=e2b.SandboxQuery(metadata={"n": "1"}), **alice).next_items()
        assert [s.sandbox_id for s in one] == [made[1].sandbox_id]
        query = e2b.SandboxQuery(state=[e2b.SandboxState.PAUSED])
        assert Sandbox.list(query=query, **alice).next_items() == []

        # another key sees nothing of them
        assert Sandbox.list(**bob).next_items() == []
        with pytest.raises(NotFoundException):
            Sandbox.get_info(made[0].sandbox_id, **bob)
        assert not Sandbox.kill(made[0].sandbox_id, **bob)
        assert _api(server, "POST", f"/sandboxes/{made[0].sandbox_id}/pause",
                    server.keys["bob"]).status_code == 404  # fmt: skip
        assert made[0].is_running()

        # no key, a wrong key; a key removed
        assert _api(server, "GET", "/v2/sandboxes", None).status_code == 401
        assert _api(server, "GET", "/v2/sandboxes", "e2b_" + "0" * 40).status_code == 401
        with pytest.raises(AuthenticationException):
            Sandbox.list(**server.opts("e2b_nope")).next_items()
        r = server.cli("serve", "key", "add", "carol")
        carol = r.stdout.strip()
        assert _api(server, "GET", "/v2/sandboxes", carol).status_code == 200
        assert "carol" in server.cli("serve", "key", "ls").stdout
        assert carol not in server.cli("serve", "key", "ls").stdout  # kept hashed
        assert carol not in (server.state / "serve" / "keys.json").read_text()
        server.cli("serve", "key", "rm", "carol")
        assert _api(server, "GET", "/v2/sandboxes", carol).status_code == 401
        r = server.cli("serve", "key", "rm", "carol")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "carol" in r.stderr

        # bad requests: 400 naming the field; a huge body refused, the server lives on
        key = server.keys["alice"]
        cases = [
            (b"{nope", "not JSON"),
            (b'{"templateID": "no-such-image"}', "templateID"),
            (b'{"templateID": "host"}', "templateID"),
            (b'{"templateID": "/etc/passwd"}', "templateID"),
            (b'{"templateID": "base", "timeout": -1}', "timeout"),
            (b'{"templateID": "base", "timeout": "60"}', "timeout"),
            (b'{"templateID": "base", "metadata": {"a": 1}}', "metadata"),
            (b'{"templateID": "base", "envVars": []}', "envVars"),
            (b"[]", "object"),
        ]
        for body, field in cases:
            r = _api(server, "POST", "/v2/sandboxes", key, content=body,
                     headers={"Content-Type": "application/json"})  # fmt: skip
            assert r.status_code == 400, (body, r.text)
            assert r.json()["code"] == 400 and field in r.json()["message"], (body, r.text)
        r = _api(server, "POST", "/sandboxes", key, content=b"x" * (64 << 20))
        assert r.status_code == 413, r.text
        r = _api(server, "GET", "/v2/sandboxes?state=gone", key)
        assert r.status_code == 400 and "state" in r.json()["message"]
        r = _api(server, "POST", f"/sandboxes/{made[0].sandbox_id}/timeout", key, json={})
        assert r.status_code == 400 and "timeout" in r.json()["message"]
        assert _api(server, "GET", "/v2/sandboxes", key).status_code == 200

        # the older create (POST /sandboxes), as E2B's 2.4 SDKs send it
        r = _api(server, "POST", "/sandboxes", key, json={"templateID": "base", "timeout": 60})
        assert r.status_code == 201 and r.json()["envdVersion"]
        old = r.json()["sandboxID"]
        assert Sandbox.connect(old, **alice).commands.run("echo old").stdout == "old\n"
        assert Sandbox.kill(old, **alice)
    finally:
        for sbx in made:
            sbx.kill()


def test_a_secure_sandbox_and_signed_urls(server):
    opts = server.opts(server.keys["alice"])
    sbx = Sandbox.create(secure=True, timeout=120, **opts)
    try:
        assert sbx.commands.run("echo ok").stdout == "ok\n"  # the SDK sends its token
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
        r = httpx.get(f"{server.url}/files", params={"path": "/etc/hostname"}, headers=headers)
        assert r.status_code == 401
        wrong = {**headers, "X-Access-Token": "x" * 32}
        r = httpx.get(f"{server.url}/files", params={"path": "/etc/hostname"}, headers=wrong)
        assert r.status_code == 401
        r = httpx.post(
            f"{server.url}/process.Process/List", headers={**headers, "Content-Type":
            "application/json"}, content=b"{}",
        )  # fmt: skip
        assert r.status_code == 401

        # signed URLs name no sandbox: the signature finds it
        up = sbx.upload_url("/home/user/up.txt", use_signature_expiration=60)
        assert httpx.post(up, files={"file": ("up.txt", b"signed")}).status_code == 200
        down = sbx.download_url("/home/user/up.txt", use_signature_expiration=60)
        assert httpx.get(down).content == b"signed"
        tampered = down.replace("up.txt", "upx.txt")
        assert httpx.get(tampered).status_code in (401, 404)
        expired = sbx.download_url("/home/user/up.txt", use_signature_expiration=-10)
        assert httpx.get(expired).status_code in (401, 404)
    finally:
        sbx.kill()


# A service in the guest, on its loopback only: echoes what it is sent (length-framed or
# chunked), streams a body that ends with its connection, serves 5 MiB.
GUEST_SERVICE = r"""
import http.server, sys, time
BIG = bytes(range(256)) * (5 * 4096)
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while (size := int(self.rfile.readline().split(b";")[0], 16)):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        reply = b" ".join([self.path.encode(), self.headers.get("X-Test", "").encode(), body])
        self.send_response(201)
        self.send_header("Content-Length", str(len(reply)))
        self.send_header("X-Reply", "yes")
        self.end_headers()
        self.wfile.write(reply)
    def do_GET(self):
        if self.path in ("/stream", "/hold"):  # no length: the body ends with the connection
            self.protocol_version = "HTTP/1.0"
            self.close_connection = True
            self.send_response(200)
            self.end_headers()
            for word in (b"one", b"two", b"three"):
                self.wfile.write(word + b"\n")
                self.wfile.flush()
                time.sleep(0.5 if self.path == "/stream" else 60)
            return
        if self.path == "/broken":  # promises more than it sends
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.close_connection = True
            return
        times = int(self.path.partition("?times=")[2] or 1)  # /big?times=N: N times 5 MiB
        self.send_response(200)
        self.send_header("Content-Length", str(len(BIG) * times))
        self.end_headers()
        for _ in range(times):
            self.wfile.write(BIG)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


# How many relays (qemubox's busybox nc) run in the guest.
RELAYS_LEFT = """
import os
own = b"/run/qemubox/busybox\\0nc\\0"
print(sum(open(f"/proc/{p}/cmdline", "rb").read().startswith(own) for p in os.listdir("/proc")
          if p.isdigit()))
"""


def _until_open(url: str, headers: dict) -> None:
    deadline = time.monotonic() + 120
    while httpx.get(url, headers=headers, timeout=60).status_code == 502:
        assert time.monotonic() < deadline, "the guest's service did not listen"
        time.sleep(0.5)


def test_a_sandbox_s_other_ports_reach_its_services(server):
    """E2B's ports other than envd's: relayed into the guest (its loopback too, no network
    needed), by header or by host; a port nothing listens on is E2B's 502; a sandbox made
    with allowPublicTraffic false wants its traffic token."""
    import hashlib

    opts = server.opts(server.keys["alice"])
    sbx = Sandbox.create(timeout=300, **opts)
    try:
        sbx.files.write("/home/user/service.py", GUEST_SERVICE)
        sbx.commands.run("python3 service.py 8000", background=True)
        port = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"}
        _until_open(f"{server.url}/big", port)

        r = httpx.post(f"{server.url}/echo?q=1", headers={**port, "X-Test": "t"}, content=b"hi")
        assert (r.status_code, r.content, r.headers["x-reply"]) == (201, b"/echo?q=1 t hi", "yes")
        chunks = (part for part in [b"a" * 70000, b"b" * 3, b"c"])  # sent chunked
        r = httpx.post(f"{server.url}/c", headers=port, content=chunks, timeout=60)
        assert r.status_code == 201 and r.content == b"/c  " + b"a" * 70000 + b"bbbc"
        r = httpx.get(f"{server.url}/big", headers=port, timeout=120)
        expected = hashlib.sha256(bytes(range(256)) * (5 * 4096)).hexdigest()
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == expected
        with httpx.stream("GET", f"{server.url}/stream", headers=port, timeout=60) as r:
            arrived = [(time.monotonic(), piece) for piece in r.iter_raw() if piece]
        assert b"".join(p for _, p in arrived) == b"one\ntwo\nthree\n"
        assert arrived[-1][0] - arrived[0][0] > 0.5  # streamed as written, not held to the end

        # E2B's host form (PORT-ID.DOMAIN), as the SDK's get_host names it
        host = {"Host": sbx.get_host(8000)}
        assert host["Host"].startswith(f"8000-{sbx.sandbox_id}.")
        r = httpx.post(f"{server.url}/h", headers={**host, "X-Test": "by-host"}, content=b"x")
        assert r.content == b"/h by-host x"

        # a service that breaks off, and a client that takes a response too slowly: the
        # response is cut (the client's connection dropped, never ended as if whole), the
        # server says so in one line, no traceback
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"{server.url}/broken", headers=port, timeout=60)
        with httpx.stream("GET", f"{server.url}/big?times=12", headers=port, timeout=120) as r:
            assert r.status_code == 200
            deadline = time.monotonic() + 120
            while "its client took it too slowly" not in server.log.read_text():
                assert time.monotonic() < deadline, server.log.read_text()[-2000:]
                time.sleep(0.5)
            with pytest.raises(httpx.RemoteProtocolError):
                r.read()
        log = server.log.read_text()
        assert f"sandbox {sbx.sandbox_id} port 8000: a response cut short: " in log
        assert "Traceback" not in log

        # a client that leaves mid-response ends its relay: no nc is left in the guest
        sbx.files.write("/home/user/relays.py", RELAYS_LEFT)
        count = "python3 relays.py"
        with httpx.stream("GET", f"{server.url}/hold", headers=port, timeout=60) as r:
            body = r.iter_raw()  # (a generator dropped would close the response)
            assert next(body) == b"one\n"
            assert sbx.commands.run(count).stdout == "1\n"  # this one's
        deadline = time.monotonic() + 30
        while (left := sbx.commands.run(count).stdout.strip()) != "0":
            assert time.monotonic() < deadline, f"{left} relays left running"
            time.sleep(0.5)

        # more connections at once than the guest runs commands (64, the service one of
        # them): those past it are 503 with a word, the others served; none is left behind
        release, lock, outcomes = threading.Event(), threading.Lock(), []

        def hold() -> None:
            with httpx.stream("GET", f"{server.url}/hold", headers=port, timeout=300) as r:
                if r.status_code == 200:
                    body = r.iter_raw()
                    next(body)
                with lock:
                    outcomes.append((r.status_code, r.read() if r.status_code != 200 else b""))
                if r.status_code == 200:
                    release.wait(300)

        holders = [threading.Thread(target=hold) for _ in range(70)]
        for t in holders:
            t.start()
        deadline = time.monotonic() + 300
        while len(outcomes) < 70 and time.monotonic() < deadline:
            time.sleep(0.2)
        release.set()
        for t in holders:
            t.join(60)
        statuses = sorted(code for code, _ in outcomes)
        assert len(statuses) == 70 and set(statuses) == {200, 503}, statuses
        assert statuses.count(200) >= 60, statuses
        refused = next(text for code, text in outcomes if code == 503)
        assert b"too many commands running at once" in refused, refused
        deadline = time.monotonic() + 60
        while (left := sbx.commands.run(count).stdout.strip()) != "0":
            assert time.monotonic() < deadline, f"{left} relays left running"
            time.sleep(0.5)

        r = httpx.get(f"{server.url}/", headers={**port, "E2b-Sandbox-Port": "8001"})
        assert r.status_code == 502
        assert (
            r.json()["message"]
            == f"The sandbox {sbx.sandbox_id} is running but port 8001 is not open"
        )
    finally:
        sbx.kill()
    r = httpx.get(f"{server.url}/big", headers=port)
    assert r.status_code == 502 and "was not found" in r.json()["message"]

    # no network device, and the ports kept to the traffic token's holders
    closed = Sandbox.create(
        timeout=300, allow_internet_access=False, network={"allow_public_traffic": False}, **opts
    )
    try:
        token = closed.traffic_access_token
        assert token
        closed.commands.run("python3 -m http.server 8000 --bind 127.0.0.1 -d /etc", background=True)
        port = {"E2b-Sandbox-Id": closed.sandbox_id, "E2b-Sandbox-Port": "8000"}
        assert httpx.get(f"{server.url}/hostname", headers=port).status_code == 403
        wrong = {**port, "e2b-traffic-access-token": "x" * len(token)}
        assert httpx.get(f"{server.url}/hostname", headers=wrong).status_code == 403
        allowed = {**port, "e2b-traffic-access-token": token}
        _until_open(f"{server.url}/hostname", allowed)
        r = httpx.get(f"{server.url}/hostname", headers=allowed)
        assert r.status_code == 200 and r.text == closed.files.read("/etc/hostname")
        devices = closed.commands.run("ls /sys/class/net").stdout.split()
        assert not set(devices) - {"lo", "sit0"}, devices  # no network device but tunnels
    finally:
        closed.kill()


def test_the_code_interpreter_sdk_on_its_default_template(server):
    """`e2b-code-interpreter` (unchanged) on `code-interpreter-v1`: its service of qemubox's
    own in the guest, reached through the port relay."""
    from e2b import SandboxException, TimeoutException
    from e2b_code_interpreter import Sandbox as CodeSandbox

    sbx = CodeSandbox.create(timeout=300, **server.opts(server.keys["alice"]))
    try:
        assert sbx.get_info().template_id == "code-interpreter-v1"
        streamed = []
        run = sbx.run_code(
            "import os, time\nx = 20 + 1\nprint('hi')\nos.system('echo from a child')\nx * 2",
            on_stdout=lambda m: streamed.append(m.line),
        )
        assert run.text == "42" and run.error is None
        assert run.logs.stdout == ["hi\n", "from a child\n"] == streamed
        assert sbx.run_code("x").text == "21"  # the context keeps its variables
        failed = sbx.run_code("1 / 0")
        assert failed.error is not None and failed.error.name == "ZeroDivisionError"
        assert "1 / 0" not in failed.error.value and "division by zero" in failed.error.value
        code = "import os, pwd; os.environ['ASKED'] + pwd.getpwuid(os.getuid()).pw_name"
        assert sbx.run_code(code, envs={"ASKED": "a:"}).text == "'a:user'"
        context = sbx.create_code_context(cwd="/tmp")
        assert sbx.run_code("import os; os.getcwd()", context=context).text == "'/tmp'"
        assert sbx.run_code("x", context=context).error.name == "NameError"  # its own
        assert context.id in {c.id for c in sbx.list_code_contexts()}
        sbx.restart_code_context(context)
        sbx.remove_code_context(context)
        assert context.id not in {c.id for c in sbx.list_code_contexts()}
        with pytest.raises(SandboxException, match="only python"):
            sbx.run_code("1", language="r")
        # a run past its timeout: the SDK leaves, the code is interrupted, the context lives on
        with pytest.raises(TimeoutException):
            sbx.run_code("import time; y = 1; time.sleep(600)", timeout=3)
        after = sbx.run_code("y", request_timeout=60, timeout=60)
        assert after.text == "1", after
        assert sbx.commands.run("echo $USER").stdout == "user\n"  # a base sandbox as well
    finally:
        sbx.kill()


def test_a_template_service_that_cannot_listen_fails_at_once_with_its_words(
    server, kernel, tmp_path, monkeypatch
):
    """The interpreter started twice in one sandbox: the second cannot listen (its port is
    the first's) and ends; that is an error with its own words as soon as it ended, not
    after the wait for a silent one."""
    from qemubox.errors import SandboxError
    from qemubox.sandbox import named
    from qemubox.sandbox.spec import Session
    from qemubox.serve import templates
    from qemubox.serve.guests import Guest
    from qemubox.serve.model import Served

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("QEMUBOX_STATE_DIR", str(state))
    monkeypatch.setattr(templates, "READY_TIMEOUT", 600)
    box = named.create(
        "svc", Session(image="base", memory="512M", kernel=kernel), crash_dumps=False
    )
    guest = Guest(Served("svc", "", "code-interpreter-v1", time.time(), 300))
    guest._box = box
    try:
        templates.start_service(guest, "code-interpreter-v1")
        start = time.monotonic()
        with pytest.raises(SandboxError) as failed:
            templates.start_service(guest, "code-interpreter-v1")
        said = "the code-interpreter-v1 service did not start: OSError: [Errno 98] Address "
        said += "already in use"
        assert str(failed.value) == said  # one line: its traceback's last
        assert time.monotonic() - start < 120  # when it ended, not at READY_TIMEOUT
    finally:
        guest.close()
        named.remove("svc", force=True)


def _spares(state: Path) -> dict[str, str]:
    """The sandboxes waiting in a server's pool: id -> template."""
    found = {}
    for d in (state / "sandboxes").iterdir() if (state / "sandboxes").is_dir() else []:
        try:
            served = json.loads((d / "record.json").read_text()).get("served")
        except (OSError, ValueError):
            continue
        if served and not served.get("owner"):
            found[d.name] = served["template"]
    return found


def test_a_pool_hands_out_sandboxes_booted_ahead_and_refills(tmp_path_factory, kernel):
    """`--pool 1`: a template's first create boots and asks for a spare of it; the next
    create is handed that spare (a code interpreter's service started in it as it was
    booted), and another boots behind it. The spares end with the server's state."""
    from e2b_code_interpreter import Sandbox as CodeSandbox

    state = tmp_path_factory.mktemp("pool") / "state"
    state.mkdir(mode=0o700)
    srv = Server(state, _free_port(), kernel, None, "--pool", "1")
    key = srv.cli("serve", "key", "add", "pool").stdout.strip()
    srv.start()
    made = []
    try:
        opts = srv.opts(key)
        made.append(CodeSandbox.create(timeout=300, **opts))

        def spare() -> str:
            deadline = time.monotonic() + 300
            while not (ids := [i for i, t in _spares(state).items() if t == "code-interpreter-v1"]):
                assert time.monotonic() < deadline, srv.log.read_text()[-3000:]
                time.sleep(0.2)
            return ids[0]

        waiting = spare()
        made.append(CodeSandbox.create(timeout=300, **opts))
        assert made[-1].sandbox_id == waiting
        assert made[-1].run_code("6 * 7").text == "42"
        assert spare() not in (waiting, made[0].sandbox_id)  # refilled
    finally:
        for sbx in made:
            sbx.kill()
        srv.stop()
        for name in os.listdir(state / "sandboxes"):
            srv.cli("rm", "-f", name)


def test_timeouts_pause_resume_and_a_restarted_server(server):
    opts = server.opts(server.keys["alice"])
    short = Sandbox.create(timeout=2, **opts)
    kept = Sandbox.create(timeout=300, **opts)
    paused = Sandbox.create(timeout=300, **opts)
    try:
        # a deadline ends a sandbox (its keeper removes it)
        deadline = time.monotonic() + 30
        while short.is_running() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not short.is_running()
        with pytest.raises(NotFoundException):
            Sandbox.get_info(short.sandbox_id, **opts)
        with pytest.raises(SandboxException):
            short.commands.run("true")

        # pause keeps memory and processes; connect resumes
        paused.files.write("/tmp/in-memory", "kept")
        bg = paused.commands.run("sleep 1000", background=True)
        paused.pause()
        assert Sandbox.get_info(paused.sandbox_id, **opts).state.value == "paused"
        query = e2b.SandboxQuery(state=[e2b.SandboxState.PAUSED])
        listed = Sandbox.list(query=query, **opts).next_items()
        assert [s.sandbox_id for s in listed] == [paused.sandbox_id]
        resumed = Sandbox.connect(paused.sandbox_id, timeout=300, **opts)
        assert resumed.files.read("/tmp/in-memory") == "kept"
        assert bg.pid in {p.pid for p in resumed.commands.list()}

        # a server killed with SIGKILL: its sandboxes run on, a new one adopts them
        kept.files.write("/home/user/f", "still here")
        kept.set_timeout(20)
        worker = kept.commands.run("sleep 1000", background=True)
        server.kill()
        assert kept.sandbox_id in server.cli("ls").stdout
        server.start()
        again = Sandbox.connect(kept.sandbox_id, **opts)
        assert again.files.read("/home/user/f") == "still here"
        assert worker.pid in {p.pid for p in again.commands.list()}
        info = Sandbox.get_info(kept.sandbox_id, **opts)
        assert info.metadata == {} and info.end_at.timestamp() < time.time() + 60
        # its deadline came with it: it ends, though nobody asked again
        deadline = time.monotonic() + 60
        while kept.sandbox_id in server.cli("ls").stdout and time.monotonic() < deadline:
            time.sleep(1)
        assert kept.sandbox_id not in server.cli("ls").stdout
    finally:
        for sbx in (short, kept, paused):
            Sandbox.kill(sbx.sandbox_id, **opts)


def test_creates_at_once_with_the_async_sdk(server):
    opts = server.opts(server.keys["bob"])

    async def one(i: int):
        sbx = await AsyncSandbox.create(timeout=300, request_timeout=600, **opts)
        r = await sbx.commands.run(f"echo {i}")
        return sbx, r.stdout

    async def main():
        results = await asyncio.gather(*(one(i) for i in range(24)), return_exceptions=True)
        made = [r for r in results if not isinstance(r, BaseException)]
        if len(made) < len(results):  # the others are killed before the failure is told
            await asyncio.gather(*(s.kill() for s, _ in made))
            raise next(r for r in results if isinstance(r, BaseException))
        pids = [qemu_pid(server, s.sandbox_id) for s, _ in made]
        try:
            assert [out for _, out in made] == [f"{i}\n" for i in range(24)]
            assert len({s.sandbox_id for s, _ in made}) == 24
            # a watch, streamed (the asynchronous SDK's WatchDir)
            sbx = made[0][0]
            events = []
            watch = await sbx.files.watch_dir("/tmp", on_event=events.append)
            await sbx.files.write("/tmp/streamed", "x")
            for _ in range(200):
                if any(e.name == "streamed" for e in events):
                    break
                await asyncio.sleep(0.1)
            await watch.stop()
            assert any(e.name == "streamed" and e.type.name == "CREATE" for e in events)
        finally:
            await asyncio.gather(*(s.kill() for s, _ in made))
        return pids

    pids = asyncio.run(main())
    assert all(pids)

    def qemus_left() -> list[int]:
        left = []
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if (
                b"qemu-system" in cmdline
                and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
            ):
                left.append(pid)
        return left

    deadline = time.monotonic() + 20
    while qemus_left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemus_left() == []  # no QEMU of theirs is left
    # why guests run under TCG (where they do) is said once by a server, not at each boot
    log = server.log.read_text()
    assert log.count("warning: using TCG") <= log.count("qemubox serve: listening on"), log


JS_SDK = "e2b@2.51.0"  # npm's e2b, run by the machine's Node.js
JS_SCRIPT = """
import { Sandbox } from 'e2b'
const s = await Sandbox.create({ metadata: { from: 'js' } })
const r = await s.commands.run('whoami; echo $0')
await s.files.write('/home/user/js.txt', 'from js')
const listed = (await Sandbox.list({ query: { metadata: { from: 'js' } } }).nextItems())
console.log(JSON.stringify({
  out: r.stdout, exit: r.exitCode, file: await s.files.read('/home/user/js.txt'),
  listed: listed.map((x) => x.sandboxId), id: s.sandboxId,
}))
await s.kill()
console.log(JSON.stringify({ running: await s.isRunning() }))
"""


@pytest.fixture(scope="module")
def js_sdk(tmp_path_factory):
    """A directory where `npm install e2b` was run, for node scripts."""
    work = tmp_path_factory.mktemp("js")
    r = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", JS_SDK],
        cwd=work, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return work


def sdk_env(server, key: str = "alice") -> dict:
    return {
        **os.environ,
        "E2B_API_URL": server.url,
        "E2B_SANDBOX_URL": server.url,
        "E2B_API_KEY": server.keys[key],
    }


def test_the_javascript_sdk(server, js_sdk):
    (js_sdk / "t.mjs").write_text(JS_SCRIPT)
    r = subprocess.run(
        ["node", "t.mjs"], cwd=js_sdk, env=sdk_env(server), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    first, second = (json.loads(line) for line in r.stdout.splitlines())
    assert first["out"] == "user\n/bin/bash\n" and first["exit"] == 0
    assert first["file"] == "from js" and first["listed"] == [first["id"]]
    assert second == {"running": False}


OLD_SDK = "e2b==2.4.3"  # the 2.4 line: POST /sandboxes, envd at https://PORT-ID.DOMAIN
OLD_SCRIPT = """
import socket, sys
real = socket.getaddrinfo
def resolve(host, port, *rest, **kw):  # the DNS of a domain pointed at the server
    if isinstance(host, str) and host.endswith(".qemubox.test"):
        return real("127.0.0.1", int(sys.argv[1]), *rest, **kw)
    return real(host, port, *rest, **kw)
socket.getaddrinfo = resolve
from e2b import Sandbox
s = Sandbox.create(metadata={"sdk": "2.4"})
print(s.commands.run("echo old sdk; whoami").stdout, end="")
s.files.write("/home/user/old.txt", "2.4")
print(s.files.read("/home/user/old.txt"))
print(len(Sandbox.list().next_items()))
s.kill()
"""


def test_the_older_python_sdk_by_domain(tmp_path_factory, kernel):
    """E2B's 2.4 SDKs know no E2B_SANDBOX_URL: they create with POST /sandboxes and reach a
    sandbox at https://PORT-ID.DOMAIN; the server answers both on one TLS listener."""
    work = tmp_path_factory.mktemp("old-sdk")
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=qemubox.test", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=DNS:*.qemubox.test,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", OLD_SDK]
    r = subprocess.run([*pip, "--disable-pip-version-check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    state = work / "state"
    state.mkdir(mode=0o700)
    srv = Server(state, _free_port(), kernel, (str(cert), str(key)))
    api_key = srv.cli("serve", "key", "add", "old").stdout.strip()
    srv.start()
    try:
        (work / "old.py").write_text(OLD_SCRIPT)
        env = {
            **os.environ,
            "E2B_DOMAIN": "qemubox.test",
            "E2B_API_KEY": api_key,
            "SSL_CERT_FILE": str(cert),  # the client trusts the server's certificate
        }
        r = subprocess.run(
            [str(venv / "bin" / "python"), str(work / "old.py"), str(srv.port)],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout == "old sdk\nuser\n2.4\n1\n", r.stdout
    finally:
        srv.stop()
        for name in os.listdir(state / "sandboxes") if (state / "sandboxes").is_dir() else []:
            srv.cli("rm", "-f", name)


def readme_section() -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    start = text.index("### Serving the E2B API")
    return text[start : text.index("\n### ", start + 1)]


def test_the_readme_s_examples_as_written(server, js_sdk):
    section = readme_section()
    python = next(line for line in section.splitlines() if line.startswith(".venv/bin/python -c '"))
    repo = Path(__file__).parent.parent
    r = subprocess.run(
        ["bash", "-c", python], cwd=repo, env=sdk_env(server), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*\n\n", r.stdout), r.stdout  # the guest's release
    interpreter = next(line.strip() for line in section.splitlines() if "run_code(" in line)
    r = subprocess.run(
        ["bash", "-c", interpreter], cwd=repo, env=sdk_env(server), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "42\n"), r.stderr
    js = section.split("```js\n", 1)[1].split("```", 1)[0]
    (js_sdk / "readme.mjs").write_text(js)
    r = subprocess.run(
        ["node", "readme.mjs"], cwd=js_sdk, env=sdk_env(server), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "user\n\n"), r.stderr
