"""The monitor's event loops: each monitor's own, closed with it (or when it is collected, or
at exit), and no thread left holding one — the cells of a matrix open monitors in worker
threads, and a loop left open there used to be collected as the interpreter exited, after its
sockets, printing a traceback on the command's stderr."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from qemubox.qemu.qmp import Monitor


def _thread_loop():
    try:
        return asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:  # a thread other than the main one, with no loop set
        return None


def test_a_monitor_closes_its_own_loop_and_leaves_its_thread_without_one(tmp_path):
    def work():
        m = Monitor.listen(str(tmp_path / "qmp.sock"))
        assert not m.loop.is_closed() and _thread_loop() is None
        m.close()
        return m.loop, _thread_loop()

    with ThreadPoolExecutor(1) as pool:
        loop, left = pool.submit(work).result()
    assert loop.is_closed() and left is None


def test_two_monitors_of_one_thread_have_a_loop_each(tmp_path):
    a = Monitor.listen(str(tmp_path / "a.sock"))
    b = Monitor.listen(str(tmp_path / "b.sock"))
    assert a.loop is not b.loop
    a.close()
    assert a.loop.is_closed() and not b.loop.is_closed()
    b.close()
    assert b.loop.is_closed()


def test_a_monitor_never_closed_has_its_loop_closed_when_collected(tmp_path):
    m = Monitor.listen(str(tmp_path / "qmp.sock"))
    loop = m.loop
    del m
    gc.collect()
    assert loop.is_closed()


def test_monitors_left_open_in_worker_threads_print_nothing_as_the_program_exits(tmp_path):
    program = f"""
import threading
from qemubox.qemu.qmp import Monitor
kept = []
def work(i):
    kept.append(Monitor.listen("{tmp_path}/m%d.sock" % i))
threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
"""
    r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert threading.active_count() >= 1


def test_a_command_a_stuck_qemu_never_answers_is_an_error_in_time(tmp_path, monkeypatch):
    """A monitor that greets and negotiates, then answers nothing more (a QEMU stuck): the
    command fails with a one-line error after COMMAND_TIMEOUT, not waited for forever."""
    import json
    import socket
    import time

    from qemubox.errors import SandboxError
    from qemubox.qemu import qmp

    monkeypatch.setattr(qmp, "COMMAND_TIMEOUT", 0.5)
    path = str(tmp_path / "qmp.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    seen: list[str] = []

    def silent_qemu():
        conn, _ = server.accept()
        version = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}
        greeting = {"QMP": {"version": version, "capabilities": []}}
        conn.sendall(json.dumps(greeting).encode() + b"\r\n")
        buffer, decoder = "", json.JSONDecoder()
        while data := conn.recv(4096):  # messages as they come (no line ends needed)
            buffer = (buffer + data.decode()).lstrip()
            while buffer:
                try:
                    message, end = decoder.raw_decode(buffer)
                except ValueError:
                    break
                buffer = buffer[end:].lstrip()
                seen.append(message["execute"])
                if message["execute"] == "qmp_capabilities":
                    reply = {"return": {}, "id": message.get("id")}
                    conn.sendall(json.dumps(reply).encode() + b"\r\n")
        conn.close()

    peer = threading.Thread(target=silent_qemu, daemon=True)
    peer.start()
    mon = Monitor(path)
    start = time.monotonic()
    try:
        mon.command("query-status")
    except SandboxError as err:
        assert str(err) == "QEMU did not answer query-status within 0.5 s (it is stuck)"
    else:
        raise AssertionError("a command nobody answered returned")
    assert 0.4 < time.monotonic() - start < 5
    assert seen == ["qmp_capabilities", "query-status"]
    mon.close()
    server.close()
