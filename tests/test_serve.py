"""`qemubox serve` driven by E2B's own Python SDK (the `e2b` package, unchanged), against
real guests of the `base` template: lifecycle, commands, terminals, files, watches, list
filters and pagination, timeouts, pause and resume, metrics, keys and tokens, a server
killed and restarted, creates at once, bad requests."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.qemu

e2b = pytest.importorskip("e2b")
from e2b import AsyncSandbox, Sandbox  # noqa: E402
from e2b.exceptions import (  # noqa: E402
    AuthenticationException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `qemubox serve` of its own state directory, started and restarted as a user would."""

    def __init__(self, state, port: int) -> None:
        self.state, self.port = state, port
        self.url = f"http://127.0.0.1:{port}"
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
                [sys.executable, "-m", "qemubox", "serve", "--listen", f"127.0.0.1:{self.port}"],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 600  # the first start builds the base image
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
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
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("serve") / "state"
    state.mkdir(mode=0o700)
    srv = Server(state, _free_port())
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
