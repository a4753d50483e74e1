"""Egress rules with real guests: clients in the guest (busybox wget and nc, the host's
Python over TLS) against servers on 127.0.0.x only, names pinned with --add-host. Every
refusal is checked twice: the guest's client fails, and the server never saw it."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import qemubox

pytestmark = pytest.mark.qemu


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hits.append(self.headers.get("Host"))
        body = f"hello from {self.server.server_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """HTTP servers on loopback addresses of the test's choice: (address) -> (port, hits)."""
    servers = []

    def start(host: str):
        server = ThreadingHTTPServer((host, 0), _Handler)
        server.hits = []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1], server.hits

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def echo_server():
    """A raw TCP server (no HTTP): answers ``echo:`` and the first line it got."""
    listener = socket.create_server(("127.0.0.3", 0))
    seen = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(100)
                seen.append(data)
                conn.sendall(b"echo:" + data)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], seen
    listener.close()


def _log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_allow_list_reaches_what_it_names_and_nothing_else(
    kernel, tmp_path, http_server, echo_server
):
    api, api_hits = http_server("127.0.0.2")
    host_port, host_hits = http_server("127.0.0.1")  # the host, as the guest's 10.0.2.2
    raw, raw_seen = echo_server
    log = tmp_path / "egress.log"
    script = (
        f"timeout 10 wget -qO- http://api.test:{api}/; echo wget=$?; "
        f"echo hi | nc -w 10 raw.test {raw}; echo; echo nc=$?; "
        f"nslookup other.test >/dev/null 2>&1; echo other-resolves=$?; "
        f"timeout 10 wget -qO- http://other.test:{api}/ 2>/dev/null; echo other=$?; "
        f"timeout 10 wget -qO- http://10.0.2.2:{host_port}/ 2>/dev/null; echo literal=$?; "
        f"timeout 10 wget -qO- http://198.18.1.1:{api}/ 2>/dev/null; echo made-up=$?; "
        "nslookup localhost 10.0.2.3 >/dev/null 2>&1; echo localhost-resolves=$?; "
        "echo x | nc -u -w 1 10.0.2.2 9; echo udp-sent"
    )
    r = qemubox(
        "run",
        "--kernel",
        kernel,
        "--net",
        "allow=api.test,raw.test,localhost",
        "--add-host",
        "api.test:127.0.0.2",
        "--add-host",
        "raw.test:127.0.0.3",
        "--add-host",
        "other.test:127.0.0.2",
        "--egress-log",
        log,
        "--",
        "sh",
        "-c",
        script,
    )
    assert r.code == 0, r.err
    lines = r.out.split()
    assert lines[:3] == ["hello", "from", "127.0.0.2"] and "wget=0" in lines, r.out
    assert "echo:hi" in lines and "nc=0" in lines, r.out
    assert "other-resolves=1" in lines and "other=1" in lines, r.out  # a name not listed
    assert "literal=1" in lines, r.out  # an address not listed
    assert "made-up=1" in lines, r.out  # a resolver's address it was never given
    assert "localhost-resolves=1" in lines, r.out  # allowed, but only to unlisted loopback
    assert api_hits == [f"api.test:{api}"] and host_hits == [] and raw_seen == [b"hi\n"]
    entries = _log(log)
    assert {"time", "what", "name", "address", "port", "verdict", "rule"} <= set(entries[0])
    verdicts = {(e["what"], e["name"], e["address"], e["port"], e["verdict"]) for e in entries}
    assert ("connect", "api.test", "127.0.0.2", api, "allowed") in verdicts
    assert ("connect", "raw.test", "127.0.0.3", raw, "allowed") in verdicts
    assert ("connect", None, "127.0.0.1", host_port, "refused") in verdicts
    assert ("connect", None, "198.18.1.1", api, "refused") in verdicts
    refused = {e["name"]: e["rule"] for e in entries if e["verdict"] == "refused" and e["name"]}
    assert refused == {
        "other.test": "not in the allow list",
        "localhost": "a non-global address, not listed",
    }


def test_a_deny_list_reaches_everything_else(kernel, http_server):
    api, api_hits = http_server("127.0.0.2")
    blocked, blocked_hits = http_server("127.0.0.5")
    script = (
        f"timeout 10 wget -qO- http://api.test:{api}/; echo api=$?; "
        f"timeout 10 wget -qO- http://www.bad.test:{api}/ 2>/dev/null; echo bad=$?; "
        f"timeout 10 wget -qO- http://ranged.test:{blocked}/ 2>/dev/null; echo ranged=$?"
    )
    r = qemubox(
        "run",
        "--kernel",
        kernel,
        "--net",
        "deny=*.bad.test,127.0.0.4/31",
        "--add-host",
        "api.test:127.0.0.2",
        "--add-host",
        "www.bad.test:127.0.0.2",
        "--add-host",
        "ranged.test:127.0.0.5",
        "--",
        "sh",
        "-c",
        script,
    )
    assert r.code == 0, r.err
    assert "api=0" in r.out and "bad=1" in r.out and "ranged=1" in r.out, r.out
    assert api_hits == [f"api.test:{api}"] and blocked_hits == []


@pytest.fixture
def tls_server(tmp_path):
    """A TLS server (self-signed) on 127.0.0.4: (port, server names it was asked for)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=tls.test"),
        ],
        check=True,
        capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    asked = []
    ctx.sni_callback = lambda conn, name, _: asked.append(name)
    listener = socket.create_server(("127.0.0.4", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"tls-ok")
            except (OSError, ssl.SSLError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], asked
    listener.close()


def test_tls_by_its_allowed_name_sni_checked_udp_refused_dns_everywhere_ours(
    kernel, tls_server, tmp_path
):
    port, asked = tls_server
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    log = tmp_path / "egress.log"
    client = f"""
import socket, ssl, struct
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
for where, sni in (("tls.test", "tls.test"), ("tls.test", "evil.test"), ("10.0.2.2", "tls.test")):
    try:
        with socket.create_connection((where, {port}), timeout=10) as s:
            with ctx.wrap_socket(s, server_hostname=sni) as t:
                print(where, sni, t.recv(100).decode())
    except (OSError, ssl.SSLError) as e:
        print(where, sni, "refused")
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
    try:
        u.sendto(b"x", ("10.0.2.2", {udp.getsockname()[1]}))
        print("udp sent")
    except OSError:
        print("udp refused")
    # A DNS server of the guest's choosing (the host's, here) answers as the rules say.
    name = b"\\x03tls\\x04test\\x00"
    query = struct.pack("!HHHHHH", 7, 0x100, 1, 0, 0, 0) + name + b"\\x00\\x01\\x00\\x01"
    u.settimeout(10)
    u.sendto(query, ("10.0.2.2", 53))
    reply = u.recv(512)
    print("dns", reply[:2] == query[:2], ".".join(map(str, reply[-4:])))
"""
    r = qemubox(
        "run",
        "--kernel",
        kernel,
        "--image",
        "host",
        "--net",
        "allow=tls.test",
        "--add-host",
        "tls.test:127.0.0.4",
        "--egress-log",
        log,
        "--",
        "python3",
        "-c",
        client,
    )
    assert r.code == 0, r.err
    out = r.out.splitlines()
    assert out[:4] == [
        "tls.test tls.test tls-ok",
        "tls.test evil.test refused",  # the SNI disagrees with the name it resolved
        "10.0.2.2 tls.test refused",  # an allowed SNI does not open another address
        "udp sent",  # as far as the guest knows: it leaves the guest, not the host
    ], r.out
    assert out[4].startswith("dns True 198.18."), r.out  # the pool address of tls.test
    assert asked == ["tls.test"]  # the refused hellos never reached the server
    with pytest.raises(TimeoutError):
        udp.recv(10)
    udp.close()
    entries = [e for e in _log(log) if e["what"] == "datagram"]
    assert entries and entries[0]["verdict"] == "refused", entries


def test_a_running_sandboxs_rules_change(kernel, state, http_server):
    a, a_hits = http_server("127.0.0.2")
    b, b_hits = http_server("127.0.0.3")
    name = "egress-box"
    r = qemubox(
        "create",
        name,
        "--kernel",
        kernel,
        "--net",
        "allow=a.test",
        "--add-host",
        "a.test:127.0.0.2",
        "--add-host",
        "b.test:127.0.0.3",
    )
    assert r.code == 0, r.err
    fetch_b = ["exec", name, "--", "timeout", "10", "wget", "-qO-", f"http://b.test:{b}/"]
    assert qemubox(*fetch_b).code != 0 and b_hits == []
    assert qemubox("exec", name, "--", "wget", "-qO-", f"http://a.test:{a}/").code == 0
    r = qemubox("network", name, "--allow", "a.test,b.test")
    assert r.code == 0 and r.out.splitlines()[0] == "allow=a.test,b.test", r.err
    assert "--add-host b.test:127.0.0.3" in r.out  # the pins are kept
    r = qemubox(*fetch_b)
    assert r.code == 0 and r.out == "hello from 127.0.0.3\n", r.err
    r = qemubox("network", name, "--deny", "a.test")
    assert r.code == 0, r.err
    shown = json.loads(qemubox("inspect", name).out)
    assert shown["plan"]["egress"]["mode"] == "deny"  # the rules in force, as inspect shows
    assert shown["session"]["network"] == "deny=a.test"
    fetch_a = ["exec", name, "--", "timeout", "10", "wget", "-qO-", f"http://a.test:{a}/"]
    assert qemubox(*fetch_a).code != 0
    assert len(a_hits) == 1 and len(b_hits) == 1
    r = qemubox("logs", "--net", name)
    assert r.code == 0, r.err
    entries = [json.loads(line) for line in r.out.splitlines()]
    b_verdicts = [e["verdict"] for e in entries if e["name"] == "b.test" and e["what"] != "connect"]
    assert b_verdicts[0] == "refused" and b_verdicts[-1] == "allowed"
    assert entries[-1]["name"] == "a.test" and entries[-1]["rule"] == "a.test"
    r = qemubox("network", name, "--allow", "*.")
    assert r.code == 2 and r.err.count("\n") == 1, r.err
    assert qemubox("network", name).out.splitlines()[0] == "deny=a.test"  # unchanged
