"""The agent protocol: wire format, decoder limits, and the client against a fake agent over
a socketpair (no VM)."""

from __future__ import annotations

import errno
import re
import socket
import struct
import threading
import time
from importlib import resources

import pytest

from qemubox.errors import GuestError, ProtocolViolation
from qemubox.guest import protocol as p
from qemubox.guest.client import AgentClient, AgentGone
from qemubox.guest.protocol import Frame

# --- the C agent mirrors the Python constants ---------------------------------------------------


def agent_c() -> str:
    return (resources.files("qemubox.guest") / "agent.c").read_text()


def test_agent_c_frame_types_match():
    c_types = {m[0]: int(m[1]) for m in re.findall(r"\bFR_([A-Z_]+) = (\d+)", agent_c())}
    assert c_types == {f.name: f.value for f in Frame}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VERSION", p.VERSION),
        ("HEADER", p.HEADER.size),
        ("MAX_PAYLOAD", p.MAX_PAYLOAD),
        ("CHUNK", p.CHUNK),
        ("NONCE_SIZE", p.NONCE_SIZE),
        ("STDIN_WINDOW", p.STDIN_WINDOW),
        ("EXEC_STDIN", p.EXEC_STDIN),
        ("EXEC_TTY", p.EXEC_TTY),
        ("EXEC_USER", p.EXEC_USER),
        ("MAX_GROUPS", p.MAX_GROUPS),
        ("FS_USER", p.FS_USER),
        ("EXEC_KEEP", p.EXEC_KEEP),
        ("MAX_NOTE", p.MAX_NOTE),
        ("MAX_EXECS", p.MAX_EXECS),
        ("WATCH_RECURSIVE", p.WATCH_RECURSIVE),
        ("MAX_WATCHES", p.MAX_WATCHES),
        ("MAX_DEPTH", p.MAX_DEPTH),
        ("MAX_ENTRIES", p.MAX_ENTRIES),
        ("MAX_LISTING", p.MAX_LISTING),
    ],
)
def test_agent_c_limits_match(name, value):
    m = re.search(rf"^#define {name} \(?(\d+)(?: \* (\d+))?\)?$", agent_c(), re.M)
    assert m, f"agent.c does not define {name}"
    assert int(m[1]) * int(m[2] or 1) == value


def test_agent_c_file_operations_match():
    c_ops = dict(re.findall(r"\bFS_([A-Z]+) = (\d+)", agent_c()))
    assert {k: int(v) for k, v in c_ops.items()} == {op.name: op.value for op in p.FsOp}
    c_events = dict(re.findall(r"\bEV_([A-Z]+) = (\d+)", agent_c()))
    assert {k: int(v) for k, v in c_events.items()} == {ev.name: ev.value for ev in p.FsEvent}


# --- framing ------------------------------------------------------------------------------------


def test_decoder_takes_frames_in_any_pieces():
    stream = (
        p.encode(Frame.STDOUT, 7, b"hello")
        + b"\0\0\0"  # padding between frames
        + p.encode(Frame.EXIT, 7, p.exit_status(3))
    )
    for size in (1, 2, 5, 9, len(stream)):
        d = p.Decoder()
        frames = []
        for i in range(0, len(stream), size):
            frames += d.feed(stream[i : i + size])
        assert frames == [
            (Frame.STDOUT, 7, b"hello"),
            (Frame.EXIT, 7, p.exit_status(3)),
        ]
        assert d.pending == 0


def test_decoder_refuses_a_huge_length_before_reading_it():
    d = p.Decoder()
    with pytest.raises(ProtocolViolation, match="claims 4294967295 bytes"):
        d.feed(p.HEADER.pack(Frame.STDOUT, 1, 0xFFFFFFFF))
    assert d.pending < 64


@pytest.mark.parametrize("garbage", [b"\x63" * 20, p.HEADER.pack(Frame.HELLO, 1, 0)])
def test_decoder_refuses_unknown_or_misdirected_types(garbage):
    with pytest.raises(ProtocolViolation, match="unexpected frame type"):
        p.Decoder().feed(garbage)


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"\1\0\0", "too short"), (struct.pack("<ii", 0, 300), "no command can end"),
     (struct.pack("<ii", 1, 0), "no command can end"), (b"\0" * 9, "extra bytes")],
)  # fmt: skip
def test_exit_payloads_are_checked(payload, message):
    with pytest.raises(ProtocolViolation, match=message):
        p.decode_exit(payload)


def test_exit_status_decoding():
    assert p.decode_exit(p.exit_status(3)) == p.ExitStatus(None, 3)
    assert p.decode_exit(p.exit_status(0, 9)) == p.ExitStatus(9, 137)


def test_find_ready_skips_an_earlier_clients_leftovers():
    nonce = b"N" * p.NONCE_SIZE
    leftover = p.encode(Frame.STDOUT, 3, b"old output")[:-4]  # cut inside a frame
    frame = p.encode(Frame.READY, 0, p.ready(nonce, "6.12"))
    stream = leftover + frame
    assert p.find_ready(stream, nonce) == len(leftover)
    assert p.find_ready(leftover, nonce) is None


def test_padding_completes_a_partial_frame():
    """What the agent does with an earlier client's half frame: SYNC_PADDING zeros finish
    it, whatever its size, and HELLO then parses."""
    half = p.encode(Frame.STDIN, 5, b"x" * p.MAX_PAYLOAD)[:1000]
    hello = p.encode(Frame.HELLO, 0, b"n" * p.NONCE_SIZE)
    d = p.Decoder(p.HOST_FRAMES)
    frames = d.feed(half + b"\0" * p.SYNC_PADDING + hello)
    assert frames[-1] == (Frame.HELLO, 0, b"n" * p.NONCE_SIZE)


# --- the client against a fake agent --------------------------------------------------------------


class FakeAgent:
    """The guest's end of the port, scripted by a test."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = p.Decoder(p.HOST_FRAMES)
        self.frames: list[tuple[Frame, int, bytes]] = []

    def next(self, timeout: float = 5) -> tuple[Frame, int, bytes]:
        self.sock.settimeout(timeout)
        while not self.frames:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    def send(self, kind: Frame, ident: int, payload: bytes = b"") -> None:
        self.sock.sendall(p.encode(kind, ident, payload))

    def greet(self, release: str = "6.12.0-test") -> None:
        kind, ident, nonce = self.next()
        assert kind == Frame.HELLO
        self.send(Frame.READY, ident, p.ready(nonce, release))


def listening(tmp_path, backlog: int = 1) -> tuple:
    """A socket listening where QEMU's agent chardev would: its path, and it."""
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(backlog)
    return path, server


@pytest.fixture
def pair(tmp_path):
    """A client attached to a fake agent through a listening socket, as QEMU would be."""
    path, server = listening(tmp_path)
    result = {}

    def accept():
        conn, _ = server.accept()
        agent = FakeAgent(conn)
        conn.sendall(b"stale \x15 bytes from an earlier client")
        agent.greet()
        result["agent"] = agent

    t = threading.Thread(target=accept)
    t.start()
    client = AgentClient.attach(path, timeout=5)
    t.join()
    yield client, result["agent"]
    client.close()
    server.close()


def test_attach_greets_and_ignores_leftovers(pair):
    client, _ = pair
    assert client.release == "6.12.0-test"


def test_concurrent_requests_are_told_apart_by_id(pair):
    client, agent = pair
    a, pa = client.start(["a"], {}, "/", False)
    b, pb = client.start(["b"], {}, "/", False)
    assert {agent.next()[1], agent.next()[1]} == {a, b}
    agent.send(Frame.STDOUT, b, b"from b")
    agent.send(Frame.STDOUT, a, b"from a")
    agent.send(Frame.EXIT, b, p.exit_status(2))
    agent.send(Frame.EXIT, a, p.exit_status(0, 9))
    assert client.wait(a, pa, 5) and client.wait(b, pb, 5)
    assert (pa.stdout, pa.status.code, pa.status.signal) == ([b"from a"], 137, 9)
    assert (pb.stdout, pb.status.code) == ([b"from b"], 2)


def test_partial_reads_of_a_frame(pair):
    client, agent = pair
    ident, pend = client.start(["x"], {}, "/", False)
    agent.next()
    data = p.encode(Frame.STDOUT, ident, b"y" * 1000) + p.encode(
        Frame.EXIT, ident, p.exit_status(0)
    )
    for byte in range(len(data)):
        agent.sock.sendall(data[byte : byte + 1])
    assert client.wait(ident, pend, 5)
    assert b"".join(pend.stdout) == b"y" * 1000


def test_max_output_truncates(pair):
    client, agent = pair
    ident, pend = client.start(["x"], {}, "/", False, max_output=10)
    agent.next()
    agent.send(Frame.STDOUT, ident, b"0123456789abcdef")
    agent.send(Frame.STDERR, ident, b"more")
    agent.send(Frame.EXIT, ident, p.exit_status(0))
    assert client.wait(ident, pend, 5)
    assert (b"".join(pend.stdout), pend.stderr, pend.truncated) == (b"0123456789", [], True)


def test_peer_hangs_up_mid_frame(pair):
    client, agent = pair
    ident, pend = client.start(["x"], {}, "/", False)
    agent.next()
    agent.sock.sendall(p.encode(Frame.STDOUT, ident, b"z" * 100)[:50])
    agent.sock.close()
    with pytest.raises(AgentGone):
        client.wait(ident, pend, 5)


def test_huge_length_is_a_violation_with_bounded_memory(pair):
    client, agent = pair
    ident, pend = client.start(["x"], {}, "/", False)
    agent.next()
    agent.sock.sendall(p.HEADER.pack(Frame.STDOUT, ident, 0xFFFFFFF0) + b"a" * 4096)
    with pytest.raises(ProtocolViolation, match="claims"):
        client.wait(ident, pend, 5)
    assert client.closed


def test_a_command_s_pid_arrives_before_its_output(pair):
    client, agent = pair
    ident, pend = client.start(["x"], {}, "/", False)
    agent.next()
    agent.send(Frame.STARTED, ident, (4242).to_bytes(4, "little"))
    agent.send(Frame.EXIT, ident, p.exit_status(0))
    assert client.wait(ident, pend, 5) and pend.pid == 4242


def test_a_connection_lost_before_a_command_started_says_so_at_once(pair):
    client, agent = pair
    ident, pend = client.start(["x"], {}, "/", False)
    agent.next()
    agent.sock.close()
    began = time.monotonic()
    with pytest.raises(AgentGone):
        client.started(ident, pend, timeout=20)
    assert time.monotonic() - began < 5  # not the whole timeout


def test_a_command_said_to_start_twice_is_a_violation(pair):
    client, agent = pair
    ident, pend = client.start(["x"], {}, "/", False)
    agent.next()
    for _ in range(2):
        agent.send(Frame.STARTED, ident, (7).to_bytes(4, "little"))
    with pytest.raises(ProtocolViolation, match="start twice"):
        client.wait(ident, pend, 5)


ENTRY = p.Entry("/tmp/caf\udce9", 0o100640, 1000, 1001, 5, 1_800_000_000_123_456_789)


def test_file_requests_and_entries_on_the_wire():
    payload = p.fs_request(p.FsOp.MOVE, "/a", "/b", user=(1000, 1001, (27,)))
    assert payload == (
        struct.pack("<III", 4, p.FS_USER, 0) + b"\2\0\0\0/a" + b"\2\0\0\0/b"
        + struct.pack("<IIII", 1000, 1001, 1, 27)
    )  # fmt: skip
    link = p.Entry("/l", 0o120777, 0, 0, 3, 0, "dir")
    assert p.decode_entries(p.entries([ENTRY, link])) == [ENTRY, link]
    assert p.entries([ENTRY])[4:17] == b"\t\0\0\0/tmp/caf\xe9"  # the guest's bytes, as they are
    assert (ENTRY.kind, ENTRY.name, link.kind, p.Entry("/", 0o40755, 0, 0, 0, 0).name) == (
        "file", "caf\udce9", "symlink", "/"
    )  # fmt: skip
    with pytest.raises(ProtocolViolation, match="extra bytes"):
        p.decode_entries(p.entries([ENTRY]) + b"x")
    with pytest.raises(ProtocolViolation, match="too short"):
        p.decode_entries(p.entries([ENTRY])[:-1])
    with pytest.raises(ValueError, match="'x' is not an absolute path"):
        p.fs_request(p.FsOp.STAT, "x")
    with pytest.raises(ValueError, match="a listing 0 levels deep"):
        p.fs_request(p.FsOp.LIST, "/")


def test_a_listing_comes_in_parts_until_ok(pair):
    client, agent = pair
    got = {}
    t = threading.Thread(target=lambda: got.update(e=client.fs(p.FsOp.LIST, "/", depth=1)))
    t.start()
    _, ident, _ = agent.next()
    agent.send(Frame.ENTRIES, ident, p.entries([ENTRY] * 2))
    agent.send(Frame.ENTRIES, ident, p.entries([ENTRY]))
    agent.send(Frame.OK, ident)
    t.join(5)
    assert got["e"] == [ENTRY] * 3


def test_a_listing_longer_than_the_bound_is_a_violation(pair):
    client, agent = pair
    failed = {}

    def listing():
        try:
            client.fs(p.FsOp.LIST, "/", depth=1)
        except ProtocolViolation as err:
            failed["err"] = err

    t = threading.Thread(target=listing)
    t.start()
    _, ident, _ = agent.next()
    part = p.entries([p.Entry("/", 0, 0, 0, 0, 0)] * 5000)
    for _ in range(p.MAX_ENTRIES // 5000 + 1):
        agent.send(Frame.ENTRIES, ident, part)
    t.join(5)
    assert "more entries than a listing has" in str(failed["err"])


def test_kept_commands_on_the_wire(pair):
    kept = p.Kept(77, True, False, b'{"tag": "t"}')
    assert p.decode_command(p.command(kept)) == kept
    payload = p.exec_request([b"sh"], [], b"/", False, keep=b"note")
    assert struct.unpack_from("<I", payload)[0] == p.EXEC_KEEP
    assert payload.endswith(b"\4\0\0\0note")
    with pytest.raises(ValueError, match="a note of 65537 bytes"):
        p.exec_request([b"sh"], [], b"/", False, keep=b"x" * (p.MAX_NOTE + 1))
    with pytest.raises(ProtocolViolation, match="extra bytes"):
        p.decode_command(p.command(kept) + b"x")

    client, agent = pair
    got = {}
    t = threading.Thread(target=lambda: got.update(k=client.kept()))
    t.start()
    kind, ident, _ = agent.next()
    assert kind == Frame.KEPT
    agent.send(Frame.COMMAND, ident, p.command(kept))
    agent.send(Frame.COMMAND, ident, p.command(p.Kept(78, False, True, b"")))
    agent.send(Frame.OK, ident)
    t.join(5)
    assert got["k"] == [kept, p.Kept(78, False, True, b"")]


def test_a_taken_over_command_starts_again_with_its_pid(pair):
    client, agent = pair
    ident, pend = client.attach_command(77)
    kind, sent_id, payload = agent.next()
    assert (kind, sent_id, payload) == (Frame.ATTACH, ident, (77).to_bytes(4, "little"))
    agent.send(Frame.STARTED, ident, (77).to_bytes(4, "little"))
    agent.send(Frame.STDOUT, ident, b"later")
    agent.send(Frame.EXIT, ident, p.exit_status(0))
    assert client.wait(ident, pend, 5) and (pend.pid, pend.stdout) == (77, [b"later"])


def test_a_watch_streams_events_until_its_error(pair):
    client, agent = pair
    ident, pend = client.watch("/w", recursive=True)
    kind, sent_id, payload = agent.next()
    assert (kind, sent_id, payload) == (Frame.WATCH, ident, p.watch_request("/w", True))
    agent.send(Frame.STARTED, ident, (2).to_bytes(4, "little"))
    created, gone = p.Event(p.FsEvent.CREATE, "/w/a"), p.Event(p.FsEvent.REMOVE, "/w/a")
    agent.send(Frame.EVENT, ident, p.event(created))
    agent.send(Frame.EVENT, ident, p.event(gone))
    agent.send(Frame.ERROR, ident, p.error(errno.EOVERFLOW, "events came faster"))
    assert pend.done.wait(5) and pend.pid == 2
    assert client.take_events(ident, pend) == [created, gone]  # what came before the end
    with pytest.raises(GuestError, match="events came faster") as caught:
        client.take_events(ident, pend)
    assert caught.value.errno == errno.EOVERFLOW
    with pytest.raises(ProtocolViolation, match="no file operation is"):
        p.decode_event(struct.pack("<I", 9) + b"\0\0\0\0")
    with pytest.raises(ValueError, match="'w' is not an absolute path"):
        p.watch_request("w", False)


def test_events_kept_past_the_bound_are_dropped_and_said_to_be(pair, monkeypatch):
    from qemubox.guest import client as client_module
    from qemubox.guest import transport

    monkeypatch.setattr(transport, "MAX_EVENTS_KEPT", 3)
    monkeypatch.setattr(client_module, "MAX_EVENTS_KEPT", 3)
    client, agent = pair
    ident, pend = client.watch("/w", recursive=False)
    agent.next()
    agent.send(Frame.STARTED, ident, (1).to_bytes(4, "little"))
    for i in range(5):
        agent.send(Frame.EVENT, ident, p.event(p.Event(p.FsEvent.CREATE, f"/w/{i}")))
    deadline = time.monotonic() + 5
    while not pend.truncated and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [e.path for e in client.take_events(ident, pend)] == ["/w/0", "/w/1", "/w/2"]
    with pytest.raises(GuestError, match="events were dropped: more than 3") as caught:
        client.take_events(ident, pend)
    assert caught.value.errno == errno.EOVERFLOW
    assert client.take_events(ident, pend) == [] and not pend.done.is_set()  # it goes on


def test_an_event_before_the_watch_started_is_a_violation(pair):
    client, agent = pair
    ident, _ = client.watch("/w", recursive=False)
    agent.next()
    agent.send(Frame.EVENT, ident, p.event(p.Event(p.FsEvent.WRITE, "/w/x")))
    deadline = time.monotonic() + 5
    while client.violation is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "EVENT frame answers a watch" in str(client.violation)


def test_a_renew_sent_ahead_is_not_waited_for(pair):
    client, agent = pair
    client.renew(wait=False)  # returns with no answer
    kind, ident, payload = agent.next()
    assert kind == Frame.RENEW and len(payload) == 8 + p.RENEW_SEED
    agent.send(Frame.OK, ident)  # answered later: for nobody
    pinging = threading.Thread(target=client.ping, kwargs={"timeout": 5})
    pinging.start()
    kind, ident, payload = agent.next()
    agent.send(Frame.PONG, ident, payload)
    pinging.join(5)
    assert kind == Frame.PING and not pinging.is_alive() and client.violation is None


def test_a_request_the_agent_never_answers_is_an_agent_timeout(pair):
    from qemubox.errors import AgentTimeout, Exit

    client, agent = pair
    with pytest.raises(AgentTimeout, match=r"did not answer within 0\.3 s") as caught:
        client.ping(timeout=0.3)
    assert agent.next()[0] == Frame.PING
    assert isinstance(caught.value, TimeoutError) and caught.value.exit_code == Exit.VM_DIED


def test_garbage_is_a_violation(pair):
    client, agent = pair
    ident, pend = client.start(["x"], {}, "/", False)
    agent.next()
    agent.sock.sendall(b"\xff" * 64)
    with pytest.raises(ProtocolViolation):
        client.wait(ident, pend, 5)


def test_an_ok_frame_for_a_command_is_a_violation(pair):
    client, agent = pair
    ident, pend = client.start(["x"], {}, "/", False)
    agent.next()
    agent.send(Frame.OK, ident)
    with pytest.raises(ProtocolViolation, match="OK frame answers a command"):
        client.wait(ident, pend, 5)


def test_a_short_error_payload_is_a_violation(pair):
    client, agent = pair
    ident, pend = client.start(["x"], {}, "/", False)
    agent.next()
    agent.send(Frame.ERROR, ident, b"\2\0")
    with pytest.raises(ProtocolViolation, match="too short"):
        client.wait(ident, pend, 5)


def test_guest_errors_reach_the_request(pair):
    client, agent = pair
    done = {}

    def mount():
        try:
            client.mount("serial:x", "/d", "ext4")
        except GuestError as err:
            done["err"] = err

    t = threading.Thread(target=mount)
    t.start()
    kind, ident, _ = agent.next()
    assert kind == Frame.MOUNT
    agent.send(Frame.ERROR, ident, p.error(19, "mount: no such device\x1b]52;c;eA==\x07"))
    t.join(5)
    assert done["err"].errno == 19
    assert str(done["err"]) == "mount: no such device\\x1b]52;c;eA==\\x07"  # printable


def test_stdin_waits_for_the_window(pair):
    """At most STDIN_WINDOW bytes are in flight until the guest acknowledges them."""
    client, agent = pair
    ident, pend = client.start(["cat"], {}, "/", True)
    agent.next()
    total = p.STDIN_WINDOW * 2
    sent = threading.Thread(target=client.write_stdin, args=(ident, pend, b"s" * total))
    sent.start()
    got = 0
    deadline = time.monotonic() + 10
    while got < p.STDIN_WINDOW and time.monotonic() < deadline:
        kind, _, payload = agent.next()
        assert kind == Frame.STDIN
        got += len(payload)
    time.sleep(0.3)
    assert pend.in_flight == p.STDIN_WINDOW  # and no more, until acknowledged
    agent.send(Frame.STDIN_ACK, ident, struct.pack("<I", got))
    while got < total:
        got += len(agent.next()[2])
    sent.join(5)
    assert got == total


def test_an_ack_for_unsent_stdin_is_a_violation(pair):
    client, agent = pair
    ident, pend = client.start(["cat"], {}, "/", True)
    agent.next()
    agent.send(Frame.STDIN_ACK, ident, struct.pack("<I", 5))
    with pytest.raises(ProtocolViolation, match="never sent"):
        client.wait(ident, pend, 5)


def test_attach_times_out_when_nobody_answers(tmp_path):
    path, server = listening(tmp_path)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        AgentClient.attach(path, timeout=0.5)
    assert time.monotonic() - start < 3
    server.close()


def test_attach_times_out_when_ready_stops_midway(tmp_path):
    """A guest that sends READY's header and nonce and then nothing cannot hang attach."""
    path, server = listening(tmp_path)

    def half_ready():
        conn, _ = server.accept()
        agent = FakeAgent(conn)
        _, ident, nonce = agent.next()
        conn.sendall(p.encode(Frame.READY, ident, p.ready(nonce, "6.12"))[:-2])
        time.sleep(3)
        conn.close()

    t = threading.Thread(target=half_ready)
    t.start()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        AgentClient.attach(path, timeout=0.5)
    assert time.monotonic() - start < 2
    t.join()
    server.close()


def test_attach_asks_again_on_a_new_connection_when_ready_does_not_come(tmp_path, monkeypatch):
    """A port that takes HELLO and never carries READY back (QEMU's port left throttled by
    a client killed while it was full) is hung up on; the next connection pads first, so
    whatever the first one left in the agent half-read is completed, and is greeted."""
    from qemubox.guest import transport

    monkeypatch.setattr(transport, "PATIENCE", 0.2)
    path, server = listening(tmp_path)
    seen = {}

    def stuck_then_fine():
        first, _ = server.accept()
        seen["first"] = FakeAgent(first).next()[0]
        first.settimeout(5)
        seen["hung up"] = first.recv(1) == b""  # the client gave up on this connection
        second, _ = server.accept()
        raw = b""
        while len(raw) < p.SYNC_PADDING + p.HEADER.size:
            raw += second.recv(1 << 16)
        seen["padded"] = raw[: p.SYNC_PADDING] == b"\0" * p.SYNC_PADDING
        agent = FakeAgent(second)
        agent.frames += agent.decoder.feed(raw)  # the padding, and HELLO or its start
        agent.greet()
        seen["agent"] = agent

    t = threading.Thread(target=stuck_then_fine)
    t.start()
    start = time.monotonic()
    client = AgentClient.attach(path, timeout=5)
    took = time.monotonic() - start
    t.join()
    assert seen["first"] == Frame.HELLO and seen["hung up"] and seen["padded"]
    assert client.release == "6.12.0-test"
    assert 0.2 <= took < 3
    client.close()
    server.close()


def test_attach_keeps_its_deadline_when_the_socket_takes_no_connection(tmp_path):
    """A listener whose backlog is full (its one client not yet let go) blocks a plain
    connect for good; attach gives up at its deadline instead."""
    path, server = listening(tmp_path, 0)
    queued = []
    while True:  # fill the backlog
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            break
        queued.append(s)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        AgentClient.attach(path, timeout=0.5)
    assert time.monotonic() - start < 3
    for s in queued:
        s.close()
    server.close()
