"""Named sandboxes, for real: the whole lifecycle through the command line, what `ls` says
after QEMU dies, idle expiry, names refused, two commands at once, and the Python API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import qemubox, wait_for
from qemubox.errors import InputError
from qemubox.qemu import process

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]


def ls(*flags: str) -> list[dict]:
    r = qemubox("ls", "--json", *flags)
    assert r.code == 0, r.err
    return json.loads(r.out)


def by_name(name: str) -> dict:
    (found,) = [s for s in ls("-a") if s["name"] == name]
    return found


def test_full_lifecycle_through_the_cli(kernel, state, tmp_path):
    r = qemubox("create", "--kernel", kernel, "-m", "256M", "--disk", "64M:/data", "box")
    assert (r.code, r.out) == (0, "box\n"), r.err
    assert by_name("box")["state"] == "running"
    for i in range(3):
        r = qemubox("exec", "box", "--", "sh", "-c", f"echo {i} >> /data/n; cat /data/n; exit {i}")
        assert r.code == i and r.out.split() == [str(k) for k in range(i + 1)], r.err
    # cp both ways: a tree with modes and a symlink, a file renamed, a tar stream
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(src / "sub" / "run.sh", 0o750)
    os.chmod(src / "sub", 0o711)
    os.symlink("run.sh", src / "sub" / "link")
    assert qemubox("cp", src, "box:/data/").code == 0
    r = qemubox(
        "exec",
        "box",
        "--",
        "sh",
        "-c",
        "stat -c '%a %n' /data/tree/sub /data/tree/sub/run.sh; /data/tree/sub/link",
    )
    assert r.out.split("\n")[:3] == ["711 /data/tree/sub", "750 /data/tree/sub/run.sh", "ran"], r
    assert qemubox("cp", src / "sub" / "run.sh", "box:/data/renamed").code == 0
    back = tmp_path / "back"
    back.mkdir()
    assert qemubox("cp", "box:/data/tree", back / "copy").code == 0
    assert (back / "copy" / "sub" / "run.sh").read_text() == "#!/bin/sh\necho ran\n"
    assert oct(os.stat(back / "copy" / "sub" / "run.sh").st_mode & 0o777) == "0o750"
    assert os.readlink(back / "copy" / "sub" / "link") == "run.sh"
    assert qemubox("cp", "box:/data/renamed", back).code == 0
    assert (back / "renamed").read_text().endswith("echo ran\n")
    tar = subprocess.run(
        [sys.executable, "-m", "qemubox", "cp", "box:/data/n", "-"], capture_output=True
    )
    listing = subprocess.run(["tar", "-t"], input=tar.stdout, capture_output=True)
    assert listing.stdout.split() == [b"n"], tar.stderr
    # logs: what the guest wrote to its console
    qemubox("exec", "box", "--", "sh", "-c", "echo hello-console > /dev/console")
    time.sleep(0.3)
    r = qemubox("logs", "-n", "2", "box")
    assert "hello-console" in r.out and len(r.out.splitlines()) <= 2, r
    # stop: clean (the disk keeps what was written), start: the same disk
    assert qemubox("stop", "box").code == 0
    assert by_name("box")["state"] == "stopped"
    assert "box" not in [s["name"] for s in ls()]  # running ones only without -a
    assert "hello-console" in qemubox("logs", "box").out  # the last run's
    r = qemubox("exec", "box", "--", "true")
    assert r.code == 2 and "is stopped" in r.err and "qemubox start box" in r.err
    assert qemubox("start", "box").code == 0
    r = qemubox("exec", "box", "--", "cat", "/data/n")
    assert r.out.split() == ["0", "1", "2"], r
    assert qemubox("rm", "box").code == 2  # running
    assert by_name("box")["state"] == "running"
    assert qemubox("stop", "box").code == 0
    assert qemubox("rm", "box").code == 0
    assert ls("-a") == []
    assert not (state / "sandboxes" / "box").exists()


def test_a_killed_qemu_shows_as_failed_and_rm_works(kernel, state):
    assert qemubox("create", "--kernel", kernel, "-m", "256M", "victim").code == 0
    machine = by_name("victim")["machine"]
    from qemubox import paths

    record = json.loads((paths.machine_runtime_dir(machine) / "machine.json").read_text())
    os.kill(record["pid"], signal.SIGKILL)
    assert process.wait_gone(record["pid"], record["started"], 5)
    time.sleep(0.3)  # the keeper writes QEMU's status down
    # another VM starting meanwhile sweeps dead machines' directories, but not this one's
    assert qemubox("run", "--kernel", kernel, "-m", "256M", "--", "true").code == 0
    status = by_name("victim")
    assert status["state"] == "failed" and "signal 9" in status["note"], status
    r = qemubox("exec", "victim", "--", "true")
    assert r.code == 2 and "failed" in r.err
    assert qemubox("rm", "victim").code == 0
    assert ls("-a") == []


def test_a_sandbox_unused_for_its_ttl_is_stopped(kernel, state):
    assert qemubox("create", "--kernel", kernel, "-m", "256M", "--ttl", "3s", "brief").code == 0
    first = by_name("brief")
    assert first["ttl"] == 3 and first["expires"] is not None
    # in use (a client attached) holds it
    r = qemubox("exec", "brief", "--", "sleep", "5")
    assert r.code == 0, r.err
    assert by_name("brief")["state"] == "running"
    deadline = time.monotonic() + 20
    while by_name("brief")["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    status = by_name("brief")
    assert status["state"] == "stopped" and "3s unused" in status["note"], status


@pytest.mark.parametrize("name", ["-x", "a b", "x" * 64, ".hidden", "a/b", "", "é"])
def test_bad_names_are_refused_in_one_line(name, state):
    r = qemubox("create", "--", name) if name.startswith("-") else qemubox("create", name)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r


def test_unknown_and_duplicate_names(kernel, state):
    for args in (
        ("exec", "nope", "--", "true"),
        ("stop", "nope"),
        ("rm", "nope"),
        ("logs", "nope"),
        ("inspect", "nope"),
        ("start", "nope"),
        ("cp", "nope:/x", "/tmp"),
    ):
        r = qemubox(*args)
        assert r.code == 2 and "no sandbox named 'nope'" in r.err, (args, r)
    assert qemubox("create", "--kernel", kernel, "-m", "256M", "twice").code == 0
    r = qemubox("create", "--kernel", kernel, "-m", "256M", "twice")
    assert r.code == 2 and "already exists" in r.err
    assert by_name("twice")["state"] == "running"


def test_two_execs_at_once_in_one_sandbox(kernel, state):
    assert qemubox("create", "--kernel", kernel, "-m", "256M", "pair").code == 0
    results = {}

    def work(i):
        results[i] = qemubox("exec", "pair", "--", "sh", "-c", f"sleep 2; echo {i}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i].out for i in range(2)] == ["0\n", "1\n"], results
    assert time.monotonic() - start < 8  # side by side, not one after the other


def test_the_python_api_on_the_same_records(kernel, state):
    from qemubox import Sandbox, Session

    sb = Sandbox.create("api", Session(memory="256M", kernel=kernel))
    assert sb.exec(["sh", "-c", "echo kept > /tmp/mark"]).exit_code == 0
    sb.detach()
    assert [s.name for s in Sandbox.list()] == ["api"]
    again = Sandbox.attach("api")
    assert again.read_file("/tmp/mark") == b"kept\n"
    again.stop()
    assert Sandbox.list()[0].state == "stopped"
    again.remove()
    assert Sandbox.list() == []


def test_kept_processes_outlive_their_client_and_are_taken_over_by_pid(kernel, state):
    from qemubox import GuestError, Sandbox, Session

    first = Sandbox.create("procs", Session(memory="256M", kernel=kernel))
    script = 'echo "up $$"; while read line; do echo "got $line"; done; echo eof; exit 5'
    said: list[bytes] = []
    kept = first.processes.start(
        ["sh", "-c", script], stdin=True, keep=b'{"tag": "server"}', on_stdout=said.append
    )
    mortal = first.processes.start(["sleep", "1000"])  # not kept: it ends with its client
    as_user = first.processes.start(["sh", "-c", 'id -u; echo "$HOME"'], user="1000:1000")
    assert as_user.wait(30).stdout == b"1000\n/\n"  # no passwd entry: home is /
    ended = first.processes.start(["true"], keep=b"gone")
    assert ended.wait(30).exit_code == 0
    assert kept.write_stdin(b"one\n") and kept.running
    assert wait_for(lambda: b"got one" in b"".join(said))
    listed = first.processes.list()
    assert [(k.pid, k.attached, k.tty, k.note) for k in listed] == [
        (kept.pid, True, False, b'{"tag": "server"}')
    ]  # the ended one is not listed
    first.leave()  # this client goes; the kept command runs on, its output dropped meanwhile

    second = Sandbox.attach("procs")
    (again,) = second.processes.list()
    assert (again.pid, again.attached, again.note) == (kept.pid, False, b'{"tag": "server"}')
    assert second.exec(["kill", "-0", str(mortal.pid)]).exit_code == 1  # gone with its client
    seen: list[bytes] = []
    taken = second.processes.connect(kept.pid, on_stdout=seen.append)
    assert taken.pid == kept.pid and second.processes.list()[0].attached
    assert taken.write_stdin(b"two\n")
    assert wait_for(lambda: seen)  # answered before it changes hands
    third = Sandbox.attach("procs")  # a third client takes it over from the second
    final = third.processes.connect(kept.pid)
    with pytest.raises(GuestError, match="another client took the command over"):
        taken.wait(10)
    assert b"".join(seen) == b"got two\n"  # its output while the second had it
    final.write_stdin(b"three\n")
    final.close_stdin()
    result = final.wait(30)
    assert (result.exit_code, result.stdout, result.pid) == (5, b"got three\neof\n", kept.pid)
    assert third.processes.list() == []
    with pytest.raises(GuestError, match=f"no kept command has pid {kept.pid}") as gone:
        third.processes.connect(kept.pid)
    assert gone.value.errno == 3  # ESRCH

    # A terminal's, and a signal: a kept shell on a terminal, resized, killed.
    shown: list[bytes] = []
    term = third.processes.start(["sh"], tty=(24, 80), keep=b"term", on_stdout=shown.append)
    assert third.processes.list()[0].tty
    term.resize(40, 132)
    term.write_stdin(b"stty size\n")
    assert wait_for(lambda: b"40 132" in b"".join(shown))
    term.kill()
    assert term.wait(10).signal == 9 and not term.running
    for bad, message in [
        (lambda: third.processes.start([]), "a process needs a command"),
        (lambda: third.processes.start(["true"], keep=b"x" * 65537), "a note of 65537 bytes"),
        (lambda: third.processes.connect(0), "no process has pid 0"),
    ]:
        with pytest.raises(InputError, match=message):
            bad()
    with pytest.raises(GuestError, match="no-such-command"):
        third.processes.start(["no-such-command"], keep=b"")
    second.leave()
    third.stop()
    third.remove()


def test_the_readme_s_kept_process_example(kernel, state):
    from qemubox import Sandbox, Session

    sb = Sandbox.create("clock", Session(kernel=kernel))
    ticks = ["sh", "-c", "while sleep 1; do date; done"]
    server = sb.processes.start(ticks, keep=b'{"tag": "clock"}')
    sb.detach()
    later = Sandbox.attach("clock")
    (kept,) = later.processes.list()
    assert (kept.pid, kept.note) == (server.pid, b'{"tag": "clock"}')
    dates: list[bytes] = []
    taken = later.processes.connect(kept.pid, on_stdout=dates.append)
    assert wait_for(lambda: dates) and b"UTC" in dates[0]
    taken.kill()
    assert taken.wait().signal == 9
    later.remove(force=True)


def test_run_with_a_name_keeps_the_sandbox_and_run_d_returns_at_once(kernel, state):
    boot = ("--kernel", kernel, "-m", "256M")
    r = qemubox("run", "--name", "kept", *boot, "--", "sh", "-c", "echo hi > /tmp/x; exit 3")
    assert r.code == 3
    assert qemubox("exec", "kept", "--", "cat", "/tmp/x").out == "hi\n"
    r = qemubox("run", "--name", "gone", "--rm", *boot, "--", "true")
    assert r.code == 0 and "gone" not in [s["name"] for s in ls("-a")]
    background = "sleep 1; echo from-the-background"
    r = qemubox("run", "-d", "--name", "bg", *boot, "--", "sh", "-c", background)
    assert (r.code, r.out) == (0, "bg\n"), r.err
    deadline = time.monotonic() + 10
    while "from-the-background" not in qemubox("logs", "bg").out and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "from-the-background" in qemubox("logs", "bg").out
    r = qemubox("run", "-d", "--name", "bad", *boot, "--", "no-such-cmd")
    assert r.code != 0 and "no-such-cmd" in r.err


def test_a_create_killed_while_booting_leaves_no_running_sandbox(kernel, state):
    proc = subprocess.Popen(
        [sys.executable, "-m", "qemubox", "create", "--kernel", kernel, "-m", "256M", "half"],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rec = Path(state, "sandboxes", "half", "record.json")
        if rec.exists() and json.loads(rec.read_text()).get("machine"):
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    time.sleep(0.5)
    found = [s for s in ls("-a") if s["name"] == "half"]
    assert found == [] or found[0]["state"] == "failed", found
    if found:
        assert qemubox("rm", "half").code == 0


def test_exec_t_gives_a_terminal_like_docker_exec_it(kernel, state):
    """Driven through a pty, as a terminal would: the guest's terminal has our size and
    follows it, ^C interrupts the guest's foreground program and not the shell, and the
    shell's exit status is ours."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    assert qemubox("create", "--kernel", kernel, "-m", "256M", "term").code == 0
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    cli = subprocess.Popen(
        [sys.executable, "-m", "qemubox", "exec", "-t", "term", "--", "sh"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    seen = bytearray()

    def until(token: bytes, within: float = 15) -> bool:
        deadline = time.monotonic() + within
        while token not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen.extend(os.read(master, 65536))
                except OSError:
                    break
        return token in seen

    try:
        assert until(b"# "), bytes(seen)
        os.write(master, b"stty size; tty\n")
        assert until(b"33 101") and until(b"/dev/pts/"), bytes(seen)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        cli.send_signal(signal.SIGWINCH)  # what the terminal's kernel would send it
        time.sleep(0.5)
        os.write(master, b"stty size\n")
        assert until(b"40 120"), bytes(seen)
        os.write(master, b"sleep 100\n")
        time.sleep(1)
        os.write(master, b"\x03")
        time.sleep(0.5)
        os.write(master, b"echo status=$?\n")
        assert until(b"status=130"), bytes(seen)
        os.write(master, b"exit 7\n")
        assert cli.wait(15) == 7
    finally:
        if cli.poll() is None:
            cli.kill()
        os.close(master)


def test_eight_named_sandboxes_alive_at_once(kernel, state):
    """Eight created side by side on 2 cores: all running, each answers with its own name,
    and `ls` lists all eight."""
    from concurrent.futures import ThreadPoolExecutor

    names = [f"many{i}" for i in range(8)]

    def make(name):
        return qemubox("create", "--kernel", kernel, "-m", "192M", name, timeout=300)

    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(make, names))
    assert all(r.code == 0 for r in made), [r.err for r in made if r.code]
    assert sorted(s["name"] for s in ls() if s["state"] == "running") == names
    with ThreadPoolExecutor(8) as pool:
        said = list(pool.map(lambda n: qemubox("exec", n, "--", "echo", n).out, names))
    assert said == [f"{n}\n" for n in names]


def test_kill_inspect_the_ls_table_logs_f_and_a_tar_stream_in(kernel, state, tmp_path):
    """The verbs the lifecycle test does not walk through."""
    assert (
        qemubox(
            "create", "--kernel", kernel, "-m", "256M", "-p", "0:80", "--net", "restricted", "verbs"
        ).code
        == 0
    )
    record = json.loads(qemubox("inspect", "verbs").out)
    assert record["status"]["state"] == "running" and record["plan"]["ports"][0]["guest"] == 80
    table = qemubox("ls").out.splitlines()
    assert table[0].split() == [
        "NAME",
        "STATE",
        "IMAGE",
        "ARCH",
        "KERNEL",
        "MEMORY",
        "CPUS",
        "UP",
        "PORTS",
        "EXPIRES",
    ]
    assert table[1].split()[:4] == ["verbs", "running", "minimal", "x86_64"]
    assert "->80" in table[1]
    # a tar stream into a directory of the sandbox
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "f").write_text("streamed\n")
    tar = subprocess.run(["tar", "-c", "-C", str(tmp_path / "in"), "f"], capture_output=True)
    cp = subprocess.run(
        [sys.executable, "-m", "qemubox", "cp", "-", "verbs:/tmp"], input=tar.stdout
    )
    assert cp.returncode == 0
    assert qemubox("exec", "verbs", "--", "cat", "/tmp/f").out == "streamed\n"
    # logs -f follows the console until the sandbox stops
    follow = subprocess.Popen(
        [sys.executable, "-m", "qemubox", "logs", "-f", "verbs"], stdout=subprocess.PIPE
    )
    qemubox("exec", "verbs", "--", "sh", "-c", "echo followed-line > /dev/console")
    time.sleep(1)
    r = qemubox("kill", "verbs")
    assert r.code == 0, r.err
    out, _ = follow.communicate(timeout=15)
    assert b"followed-line" in out and follow.returncode == 0
    status = by_name("verbs")
    assert (status["state"], status["note"]) == ("stopped", "killed")
    r = qemubox("run", "--name", "x", "--console-log", tmp_path / "c.log", "--", "true")
    assert r.code == 2 and "--console-log goes without --name" in r.err
    assert qemubox("rm", "verbs").code == 0
