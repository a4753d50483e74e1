"""`qemubox serve`'s pure parts: the create request checked field by field, E2B's shapes,
query parsing, keys, envd's paths, users and ends, signed URLs as E2B's SDK signs them,
bounded gzip, the base image's recipe and user. No VM."""

from __future__ import annotations

import base64
import gzip
import json
import os

import pytest
from e2b.sandbox.signature import get_signature

from qemubox.errors import InputError
from qemubox.image import debian, recipe
from qemubox.serve import envd, files, keys, model
from qemubox.serve.control import _make_token, _read_token
from qemubox.serve.guests import Who, note_of, parse_note
from qemubox.serve.model import BadRequest, CreateRequest, Served


def test_a_create_request_is_checked_field_by_field():
    r = CreateRequest.parse({"templateID": "base"})
    assert (r.template, r.timeout, r.metadata, r.env, r.secure) == ("base", 15, {}, {}, False)
    assert r.network == "user"
    assert CreateRequest.parse({"templateID": "base"}, always_secure=True).secure
    full = CreateRequest.parse(
        {"templateID": "t", "timeout": 60, "metadata": {"a": "b"}, "envVars": {"X": "1"},
         "secure": True, "allow_internet_access": False}
    )  # fmt: skip
    assert (full.timeout, full.metadata, full.env, full.secure, full.network) == (
        60, {"a": "b"}, {"X": "1"}, True, "none",
    )  # fmt: skip
    bad = [
        ([], "object"),
        ({}, "templateID"),
        ({"templateID": ""}, "templateID"),
        ({"templateID": "b", "timeout": -1}, "timeout"),
        ({"templateID": "b", "timeout": 86401}, "timeout"),
        ({"templateID": "b", "timeout": True}, "timeout"),
        ({"templateID": "b", "timeout": 1.5}, "timeout"),
        ({"templateID": "b", "metadata": []}, "metadata"),
        ({"templateID": "b", "metadata": {"k": 1}}, "metadata.k"),
        ({"templateID": "b", "metadata": {str(i): "v" for i in range(65)}}, "metadata"),
        ({"templateID": "b", "envVars": {"K": "x" * 1025}}, "envVars.K"),
        ({"templateID": "b", "secure": "yes"}, "secure"),
        ({"templateID": "b", "allow_internet_access": 1}, "allow_internet_access"),
        ({"templateID": "b", "network": {"allowOut": "x"}}, "network.allowOut"),
        ({"templateID": "b", "network": {"denyOut": ["a,b"]}}, "network.denyOut"),
    ]
    for body, field in bad:
        with pytest.raises(BadRequest, match=field.replace(".", r"\.")):
            CreateRequest.parse(body)


def test_networks_as_egress_rules():
    assert model.network_of(None, None) == "user"
    assert model.network_of(True, None) == "user"
    assert model.network_of(False, None) == "none"
    assert model.network_of(None, {"denyOut": ["1.2.3.4"]}) == "deny=1.2.3.4"
    deny_all = {"denyOut": ["0.0.0.0/0"], "allowOut": ["example.com", "10.0.0.1"]}
    assert model.network_of(None, deny_all) == "allow=example.com,10.0.0.1"
    assert model.network_of(False, {"allowOut": ["pypi.org"]}) == "allow=pypi.org"
    assert model.network_of(None, {"denyOut": ["0.0.0.0/0"]}) == "none"
    assert model.network_of(None, {}) == "user"


def test_the_shapes_e2b_s_sdk_reads():
    served = model.Served("abc", "alice", "base", 1_700_000_000.5, 60, {"k": "v"}, token="t")
    created = served.created()
    assert created["sandboxID"] == "abc" and created["envdAccessToken"] == "t"
    assert created["envdVersion"] == model.ENVD_VERSION
    listed = served.listed("running", 1_700_000_060.0)
    assert listed["startedAt"] == "2023-11-14T22:13:20.500000Z"
    assert listed["endAt"] == "2023-11-14T22:14:20Z" and listed["metadata"] == {"k": "v"}
    assert served.detail("paused", None)["state"] == "paused"
    assert model.Served.from_dict({**served.to_dict(), "unknown": 1}) == served


def test_queries():
    assert model.metadata_query("a=1&b=x%20y") == {"a": "1", "b": "x y"}
    assert model.metadata_query(None) == {}
    with pytest.raises(BadRequest, match="metadata"):
        model.metadata_query("novalue&&")
    assert model.states_query([]) == {"running", "paused"}
    assert model.states_query(["running,paused"]) == {"running", "paused"}
    with pytest.raises(BadRequest, match="state"):
        model.states_query(["gone"])
    assert model.limit_query(None) == 100 and model.limit_query("2") == 2
    for bad in ("0", "101", "x", "-1"):
        with pytest.raises(BadRequest, match="limit"):
            model.limit_query(bad)
    token = _make_token(1700000000.25, "abc")
    assert _read_token(token) == (1700000000.25, "abc")
    with pytest.raises(BadRequest, match="nextToken"):
        _read_token("!!!")
    assert len(model.new_id()) == 20 and model.new_id() != model.new_id()


def test_keys_are_kept_hashed_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("QEMUBOX_STATE_DIR", str(tmp_path / "state"))
    key = keys.add("laptop")
    assert keys.KEY_RE.fullmatch(key)
    stored = keys.keys_file().read_text()
    assert key not in stored and "laptop" in stored
    assert oct(keys.keys_file().stat().st_mode & 0o777) == "0o600"
    ring = keys.KeyRing()
    assert ring.owner(key) == "laptop"
    assert ring.owner(key[:-1] + ("0" if key[-1] != "0" else "1")) is None
    assert ring.owner(None) is None and ring.owner("x" * 10_000) is None
    with pytest.raises(InputError, match="laptop"):
        keys.add("laptop")
    with pytest.raises(InputError, match="invalid key name"):
        keys.add("../x")
    other = keys.add("ci")
    assert ring.owner(other) == "ci"  # added while it serves: seen at once
    assert [k.name for k in keys.list_all()] == ["ci", "laptop"]
    keys.remove("laptop")
    assert ring.owner(key) is None
    with pytest.raises(InputError, match="no key named 'laptop'"):
        keys.remove("laptop")


def test_envd_paths_users_and_ends():
    who = Who((1000, 1000, ()), "/home/user", "user")
    assert envd.resolve("a/b", who) == "/home/user/a/b"
    assert envd.resolve("~/x", who) == "/home/user/x"
    assert envd.resolve("/etc", who) == "/etc"
    with pytest.raises(envd.ConnectError):
        envd.resolve("/x\0y", who)
    basic = "Basic " + base64.b64encode(b"root:").decode()
    assert envd.user_of(basic) == "root"
    assert envd.user_of(None) is None and envd.user_of("Bearer x") is None
    with pytest.raises(envd.ConnectError):
        envd.user_of("Basic !!!")
    end = envd.end_event(3, None, None)
    assert (end.exit_code, end.exited, end.status) == (3, True, "exit status 3")
    killed = envd.end_event(137, 9, None)
    assert (killed.exit_code, killed.exited, killed.status) == (-1, False, "signal: killed")
    assert envd._snake("GetWatcherEvents") == "get_watcher_events"


def test_a_kept_command_s_note_carries_its_config():
    config = {"cmd": "/bin/bash", "args": ["-l", "-c", "x"], "envs": {"A": "1"}, "cwd": "/"}
    assert parse_note(note_of(config, "tag")) == (config, "tag")
    huge = {**config, "envs": {f"V{i}": "x" * 1000 for i in range(100)}}
    note = note_of(huge, None)
    assert len(note) <= 60000 and parse_note(note)[0]["envs"] == {}
    assert parse_note(b"not json")[0]["cmd"] == "not json"


def test_signed_urls_as_the_sdk_signs_them():
    for user in ("user", None):
        sdk = get_signature("/home/user/f", "read", user, "token", None)
        assert (
            files.signature("/home/user/f", "read", user or "", "token", None) == sdk["signature"]
        )
    signed = get_signature("/p", "write", None, "tok", 60)
    assert files.signature("/p", "write", "", "tok", signed["expiration"]) == signed["signature"]
    assert files.signature("/p", "read", "", "tok", signed["expiration"]) != signed["signature"]


def test_gzip_is_bounded_when_decoded():
    data = os.urandom(1000)
    assert files.gunzip(gzip.compress(data)) == data
    bomb = gzip.compress(b"\0" * (files.MAX_FILE + 10))
    with pytest.raises(files._Refused) as err:
        files.gunzip(bomb)
    assert err.value.status == 413
    with pytest.raises(files._Refused) as err:
        files.gunzip(b"not gzip")
    assert err.value.status == 400


def test_the_base_image_recipe_and_its_user(tmp_path):
    base = recipe.e2b_base("amd64")
    assert {"bash", "curl", "sudo", "python3"} <= set(base.packages) and base.users == ("user",)
    assert recipe.Recipe.from_dict(json.loads(json.dumps(base.to_dict()))) == base
    plain = recipe.debian("amd64")
    assert "users" not in plain.to_dict()  # recipes without users keep their keys
    assert plain.key() != base.key()
    etc = tmp_path / "etc"
    (etc / "skel").mkdir(parents=True)
    (etc / "sudoers.d").mkdir()
    (etc / "skel" / ".profile").write_text("# profile\n")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/x\n")
    (etc / "shadow").write_text("root:*:1:0:99999:7:::\n")
    (etc / "group").write_text("root:x:0:\nsudo:x:27:\n")
    (etc / "gshadow").write_text("root:*::\nsudo:*::\n")
    debian.add_user(tmp_path, "user")
    assert "user:x:1000:1000::/home/user:/bin/bash" in (etc / "passwd").read_text()
    assert "sudo:x:27:user" in (etc / "group").read_text()
    assert "sudo:*::user" in (etc / "gshadow").read_text()
    assert (tmp_path / "home/user/.profile").stat().st_uid == 1000
    assert (etc / "sudoers.d/user").read_text() == "user ALL=(ALL:ALL) NOPASSWD: ALL\n"
    assert oct((etc / "sudoers.d/user").stat().st_mode & 0o777) == "0o440"


def test_the_application_s_doors_without_a_guest(tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    from qemubox.serve.app import App
    from qemubox.serve.registry import Registry

    monkeypatch.setenv("QEMUBOX_STATE_DIR", str(tmp_path / "state"))
    key = keys.add("t")
    client = TestClient(App(Registry(), keys.KeyRing(), lambda template: None))
    auth = {"X-API-Key": key}
    assert client.get("/health").status_code == 200  # no key needed
    assert client.get("/v2/sandboxes").json() == {"code": 401, "message": "An API key is needed"}
    assert client.get("/v2/sandboxes", headers={"X-API-Key": "e2b_x"}).status_code == 401
    bearer = {"Authorization": f"Bearer {key}"}
    assert client.get("/v2/sandboxes", headers=bearer).json() == []
    assert client.get("/nope", headers=auth).json()["code"] == 404
    assert client.put("/v2/sandboxes", headers=auth).json()["code"] == 405
    r = client.post("/v2/sandboxes", headers=auth, content=b"x" * (2 << 20))
    assert r.status_code == 413 and "body" in r.json()["message"]
    r = client.get("/sandboxes/nosuch", headers=auth)
    assert r.status_code == 404 and "nosuch" in r.json()["message"]
    envd_headers = {"E2b-Sandbox-Id": "nosuch", "E2b-Sandbox-Port": "49983"}
    r = client.get("/files?path=/x", headers=envd_headers)
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    r = client.get("/health", headers={"Host": "49983-nosuch.example.test"})
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    r = client.get("/", headers={**envd_headers, "E2b-Sandbox-Port": "8080"})
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    for bad in ("0", "65536", "80x", "123456"):
        r = client.get("/", headers={**envd_headers, "E2b-Sandbox-Port": bad})
        assert r.status_code == 400 and "is not a port" in r.json()["message"], bad


def test_a_relayed_request_is_the_client_s_less_its_connection_s_headers():
    import h11

    from qemubox.serve import ports

    scope = {
        "method": "POST",
        "path": "/a b",
        "raw_path": b"/a%20b",
        "query_string": b"x=1",
        "headers": [
            (b"host", b"8000-abc.example.test"),
            (b"connection", b"keep-alive"),
            (b"transfer-encoding", b"chunked"),
            (b"e2b-sandbox-id", b"abc"),
            (b"e2b-traffic-access-token", b"secret"),
            (b"x-kept", b"1"),
        ],
    }
    request = ports.request_of(scope)
    assert request.target == b"/a%20b?x=1"
    assert request.headers.raw_items() == [
        (b"host", b"8000-abc.example.test"),
        (b"x-kept", b"1"),
        (b"transfer-encoding", b"chunked"),  # the body framed anew
        (b"connection", b"close"),
    ]
    get = ports.request_of(scope | {"method": "GET", "headers": [(b"content-length", b"0")]})
    assert get.headers.raw_items() == [
        (b"content-length", b"0"),
        (b"host", b"localhost"),
        (b"connection", b"close"),
    ]
    wire = h11.Connection(h11.CLIENT).send(request)
    assert wire.startswith(b"POST /a%20b?x=1 HTTP/1.1\r\nhost: 8000-abc.example.test\r\n")
    kept = ports.response_headers([(b"Connection", b"close"), (b"Content-Type", b"text/plain")])
    assert kept == [(b"Content-Type", b"text/plain")]
    assert [ports.parse_port(t) for t in ("1", "65535", "0", "65536", "", "8o")] == [
        1, 65535, None, None, None, None,
    ]  # fmt: skip
    assert ports.relay_argv(8000) == ["/run/qemubox/busybox", "nc", "127.0.0.1", "8000"]


def test_a_create_may_keep_its_ports_to_holders_of_its_traffic_token():
    base = {"templateID": "base"}
    assert CreateRequest.parse(base).public_traffic
    closed = CreateRequest.parse(base | {"network": {"allowPublicTraffic": False}})
    assert not closed.public_traffic and closed.network == "user"
    with pytest.raises(BadRequest, match=r"network\.allowPublicTraffic: expected true or false"):
        CreateRequest.parse(base | {"network": {"allowPublicTraffic": "no"}})
    served = Served("abc", "k", "base", 0.0, 15, traffic_token="t0k")
    assert served.created()["trafficAccessToken"] == "t0k"
    assert Served.from_dict(served.to_dict()).traffic_token == "t0k"


def test_serve_names_an_address_it_cannot_listen_on(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "qemubox", "serve", "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "QEMUBOX_STATE_DIR": str(tmp_path / "state")},
        )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"qemubox: error: --listen 127.0.0.1:{port}: Address already in use"


def test_templates_name_images_and_the_interpreter_speaks_e2b_s_protocol(tmp_path):
    """The interpreter program on this machine's python3 (in a sandbox it is the guest's;
    test_serve.py drives it there with e2b-code-interpreter): contexts, streamed output,
    results, errors, refusals."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    from qemubox.serve import templates

    assert templates.image_of("code-interpreter-v1") == "base"
    assert templates.image_of("mine") == "mine"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    program = Path(templates.__file__).with_name("interpreter.py")
    proc = subprocess.Popen(
        [sys.executable, str(program), str(port)], cwd=tmp_path, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout.readline() == b"ready\n"
        url = f"http://127.0.0.1:{port}"
        lines = [
            json.loads(line)
            for line in httpx.post(
                f"{url}/execute", json={"code": "print('a')\n6 * 7"}
            ).iter_lines()
        ]
        assert [m["type"] for m in lines] == ["stdout", "result", "number_of_executions"]
        assert lines[0]["text"] == "a\n" and lines[1]["text"] == "42"
        failed = httpx.post(f"{url}/execute", json={"code": "def f(:"}).text
        assert '"name": "SyntaxError"' in failed
        contexts = httpx.get(f"{url}/contexts").json()
        assert [c["cwd"] for c in contexts] == [str(tmp_path)]
        made = httpx.post(f"{url}/contexts", json={"cwd": "/"}).json()
        assert made["language"] == "python" and made["cwd"] == "/"
        assert httpx.delete(f"{url}/contexts/{made['id']}").status_code == 200
        assert httpx.delete(f"{url}/contexts/{made['id']}").status_code == 404
        r = httpx.post(f"{url}/execute", json={"code": "1", "context_id": "nosuch"})
        assert r.status_code == 404
        assert httpx.post(f"{url}/execute", json={"code": "1", "language": "js"}).status_code == 400
        assert httpx.post(f"{url}/execute", content=b"[1]").status_code == 400
        assert httpx.post(f"{url}/execute", json={"code": 1}).status_code == 400
    finally:
        proc.kill()
        proc.wait()
