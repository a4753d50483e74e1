"""The sandbox under attack and misuse, for real: a hostile program as root in the guest,
heavy streams, a full host file system, and careless inputs. Each case ends in one line and
the right exit status, with bounded memory and without touching what the user had."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qemubox.errors import HostIOError
from qemubox.qemu import process
from qemubox.sandbox.sandbox import Sandbox
from qemubox.sandbox.spec import Disk, Session
from qemubox.vm import machine as machine_mod
from qemubox.vm.machine import Machine

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A directory holding the static hostile program, shared read-only into guests."""
    out = tmp_path_factory.mktemp("hostile")
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(out / "hostile"), str(HERE / "guest" / "hostile.c")],
        check=True,
    )
    return out


def run(kernel, *args, stdin=None, timeout=300, env=None):
    """``qemubox run`` as a user types it; stdin may be a file object. Returns (code,
    stdout, stderr, seconds)."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "qemubox", "run", "--kernel", kernel, *map(str, args)],
        stdin=stdin,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "using TCG" not in ln]
    return proc.returncode, proc.stdout, "\n".join(lines), time.monotonic() - start


def one_line(err: str) -> str:
    assert len(err.splitlines()) == 1, err
    return err


# --- a hostile guest ----------------------------------------------------------------------------


# Runs a command and says the largest RSS (KiB) of its process tree: this run's alone (this
# process's own children include whatever else the test run waited for, kernel links among
# them).
PEAK = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], capture_output=True)\n"
    "sys.stdout.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.stderr.buffer.write(r.stderr)\n"
    "sys.exit(r.returncode)\n"
)


def test_a_huge_frame_is_a_protocol_violation_with_bounded_memory(kernel, hostile):
    cli = [sys.executable, "-m", "qemubox", "run", "--kernel", kernel]
    guest = ["-v", f"{hostile}:/mnt:ro", "--", "/mnt/hostile", "huge"]
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, *cli, *guest], capture_output=True, text=True, timeout=300
    )
    err = "\n".join(ln for ln in proc.stderr.splitlines() if "using TCG" not in ln)
    assert proc.returncode == 123, err
    assert "protocol violation by the guest: STDOUT frame claims 4294967280 bytes" in one_line(err)
    # The CLI (and its QEMU) stayed small though the guest sent on.
    assert int(proc.stdout) < 400 * 1024, proc.stdout


@pytest.mark.parametrize(
    "mode, says",
    [("short", "EXIT frame is too short"), ("ok", "OK frame answers a command")],
)
def test_malformed_frames_are_protocol_violations(kernel, hostile, mode, says):
    code, _, err, _ = run(kernel, "-v", f"{hostile}:/mnt:ro", "--", "/mnt/hostile", mode)
    assert code == 123
    assert f"protocol violation by the guest: {says}" in one_line(err)


def test_a_timeout_ends_the_run_when_the_agent_stops_reading(kernel, hostile):
    """The agent is ptrace-stopped while stdin streams in: the timeout still ends the run
    (the subprocess limit is the hang detector, not a speed target)."""
    feeder = subprocess.Popen(["head", "-c", "2G", "/dev/zero"], stdout=subprocess.PIPE)
    try:
        script = "/mnt/hostile stop & sleep 1; cat > /dev/null"
        code, _, err, _ = run(
            kernel,
            "-i",
            "--timeout",
            "5",
            "-v",
            f"{hostile}:/mnt:ro",
            "--",
            "sh",
            "-c",
            script,
            stdin=feeder.stdout,
            timeout=60,
        )
    finally:
        feeder.kill()
        feeder.wait()
    assert code == 124
    assert "timed out and the guest did not end it" in one_line(err)


# --- streams and resources ----------------------------------------------------------------------


def test_600_megabytes_of_stdin_reach_a_command_in_a_small_guest(kernel):
    """More stdin than the guest has memory, to a command that starts reading late."""
    feeder = subprocess.Popen(["head", "-c", "600M", "/dev/zero"], stdout=subprocess.PIPE)
    try:
        code, out, err, _ = run(
            kernel, "-i", "-m", "256M", "--", "sh", "-c", "sleep 3; wc -c", stdin=feeder.stdout
        )
    finally:
        feeder.kill()
        feeder.wait()
    assert code == 0, err
    assert out.split() == [b"629145600"]


def test_the_console_log_is_kept_small_and_shown_sanitised(kernel, tmp_path, monkeypatch):
    """A guest writing its console without end: the log on disk stays near its cap while
    the guest runs; the user's copy keeps the tail and the earlier copy as .old; a guest's
    escape sequences reach the user's terminal as text."""
    keep = 256 << 10
    monkeypatch.setattr(machine_mod, "CONSOLE_KEEP", keep)
    log = tmp_path / "console.log"
    log.write_text("an earlier run\n")
    flood = "head -c 3145728 /dev/zero | tr '\\0' x > /dev/console; echo; echo the-end"
    with Sandbox(Session(memory="256M", kernel=kernel, console_log=str(log))) as box:
        box.exec(["sh", "-c", f"{flood} > /dev/console"], timeout=120)
        on_disk = _on_disk_soon(Path(box.plan.console_log), 2 * keep + (1 << 20))
        assert on_disk <= 2 * keep + (1 << 20), on_disk
        box.exec(["sh", "-c", r"printf '\033]52;c;ZXZpbA==\007osc\n' > /dev/console"])
        time.sleep(0.2)
        tail = box.console_tail()
        assert "\x1b" not in tail and "\\x1b]52;c;ZXZpbA==\\x07osc" in tail
    assert (tmp_path / "console.log.old").read_text() == "an earlier run\n"
    kept = log.read_bytes()
    assert len(kept) <= 2 * keep + 4096 and b"the-end" in kept


def test_a_detached_guest_with_no_client_keeps_its_console_log_small(kernel, monkeypatch):
    """Nobody attached: the keeper QEMU runs under still caps the log."""
    keep = 256 << 10
    monkeypatch.setattr(machine_mod, "CONSOLE_KEEP", keep)
    box = Sandbox(Session(memory="256M", kernel=kernel)).start(detach=True)
    machine_id = box.machine.id
    try:
        flood = "while :; do head -c 65536 /dev/zero | tr '\\0' y; done > /dev/console"
        box.exec(["setsid", "sh", "-c", f"{flood} & echo started"])
        log = Path(box.plan.console_log)
        box.detach()
        deadline = time.monotonic() + 20
        while log.stat().st_size < 8 * keep and time.monotonic() < deadline:
            time.sleep(0.2)
        assert log.stat().st_size >= 8 * keep, "the guest did not write its console"
        assert _on_disk_soon(log, 2 * keep + (1 << 20)) <= 2 * keep + (1 << 20)
    finally:
        try:
            Sandbox.attach(machine_id).close()
        except Exception:  # never leave it running
            Machine.open(machine_id).kill()
            raise


STARTER_KILLED_WHILE_BOOTING = """
import sys
from qemubox import Sandbox, Session
Sandbox(Session(memory="256M", kernel=sys.argv[1])).start(detach=True)
"""


def test_a_detached_guest_dies_with_a_starter_killed_before_it_is_ready(kernel):
    """Until set up, a detached guest is tied to its starter: killing the starter while the
    guest boots leaves no QEMU and no machine behind."""
    from qemubox import paths

    before = set(paths.runtime_root().iterdir()) if paths.runtime_root().exists() else set()
    starter = subprocess.Popen([sys.executable, "-c", STARTER_KILLED_WHILE_BOOTING, kernel])
    deadline = time.monotonic() + 20
    new: set[Path] = set()
    while not new and time.monotonic() < deadline:
        time.sleep(0.05)
        new = {d for d in paths.runtime_root().iterdir() if (d / "machine.json").exists()}
        new -= before
    assert new, "the starter did not start a machine"
    starter.kill()
    starter.wait()
    (machine,) = new
    record = json.loads((machine / "machine.json").read_text())
    assert process.wait_gone(record["pid"], record["started"], 5), "QEMU outlived its starter"


def _on_disk_soon(path: Path, at_most: int, within: float = 5) -> int:
    """What ``path`` holds on disk once it is at most ``at_most`` bytes (its keeper looks
    once a second), or after ``within`` seconds."""
    deadline = time.monotonic() + within
    while (on_disk := path.stat().st_blocks * 512) > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
    return on_disk


def test_escape_sequences_in_a_panic_reach_the_terminal_as_text(kernel):
    script = r"printf '\033]0;owned\007title\n' > /dev/console; echo c > /proc/sysrq-trigger"
    code, _, err, _ = run(kernel, "--", "sh", "-c", script)
    assert code == 122
    assert "\x1b" not in err and "\x07" not in err
    assert "\\x1b]0;owned\\x07title" in err


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB file system on the host (a tmpfs), to fill."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_host_file_system_under_a_disk_is_an_error_naming_the_file(kernel, small_fs):
    image = small_fs / "data.img"
    session = Session(memory="256M", kernel=kernel, disks=[Disk("64M", "/d", str(image))])
    expected = pytest.raises(HostIOError, match=f"could not write disk image {image}")
    with expected as err, Sandbox(session) as box:
        r = box.exec(
            ["sh", "-c", "dd if=/dev/urandom of=/d/big bs=1M count=40 conv=fsync"],
            timeout=120,
        )
        pytest.fail(f"the full host file system went unnoticed: {r}")
    assert err.value.exit_code == 125
    assert "No space left on device" in str(err.value)


def test_the_cli_reports_a_full_host_file_system(kernel, small_fs):
    image = small_fs / "data.img"
    script = "dd if=/dev/urandom of=/d/big bs=1M count=40 conv=fsync 2>/dev/null; true"
    code, _, err, _ = run(kernel, "--disk", f"64M:/d:{image}", "--", "sh", "-c", script)
    assert code == 125
    assert f"could not write disk image {image}: No space left on device" in one_line(err)


def test_an_ephemeral_disk_must_fit_where_it_is_made(kernel, tmp_path):
    runtime = tmp_path / "rt"
    env = {"QEMUBOX_RUNTIME_DIR": str(runtime)}
    code, _, err, _ = run(kernel, "--disk", "99999G:/d", "--", "true", env=env)
    assert code == 2
    assert "does not fit in" in one_line(err) and "ask for less" in err
    assert not any(runtime.glob("*"))


# --- process lifetime and privileges ------------------------------------------------------------


def test_qemubox_as_pid_1_starts_a_vm(kernel):
    """A container's entrypoint: qemubox is PID 1 of a new PID namespace."""
    code = (
        "import os, sys; assert os.getpid() == 1; "
        f"sys.argv = ['qemubox', 'run', '--kernel', {kernel!r}, '--', 'echo', 'as-init']; "
        "from qemubox.cli import main; main()"
    )
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "as-init\n"


def _qemu_users_while(kernel, *args) -> set[str]:
    """The users of this run's QEMU processes, last seen while its command runs (QEMU
    changes user once its files are open: the last look is the settled one)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qemubox", "run", "--kernel", kernel, *args, "--", "sleep", "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    users: set[str] = set()
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        ps = subprocess.run(
            ["ps", "-e", "-o", "pid=,ppid=,user=,comm="], capture_output=True, text=True
        )
        rows = [line.split() for line in ps.stdout.splitlines()]
        ours = {proc.pid}  # the CLI's descendants (QEMU may run under a keeper)
        for _ in range(3):
            ours |= {int(pid) for pid, ppid, _, _ in rows if int(ppid) in ours}
        seen = {user for pid, _, user, comm in rows if int(pid) in ours and "qemu" in comm}
        users = seen or users
        time.sleep(0.1)
    assert proc.wait(timeout=60) == 0
    return users


@pytest.mark.skipif(os.geteuid() != 0, reason="QEMU changes user only when qemubox is root")
def test_qemu_drops_root_unless_a_share_needs_it(kernel, tmp_path):
    assert _qemu_users_while(kernel, "--disk", "16M:/d", "--net", "user") == {"nobody"}
    assert _qemu_users_while(kernel, "-v", f"{tmp_path}:/mnt:ro") == {"root"}


def test_qemu_runs_under_its_seccomp_filter(kernel):
    code, out, err, _ = run(kernel, "--dry-run", "--", "true")
    assert code == 0, err
    assert "-sandbox on,obsolete=deny," in out.decode() and "spawn=deny" in out.decode()


# --- careless inputs ----------------------------------------------------------------------------


def test_a_disk_too_large_for_its_file_system_leaves_nothing(kernel, tmp_path):
    image = tmp_path / "big.img"
    code, _, err, _ = run(kernel, "--disk", f"99999T:/d:{image}", "--", "true")
    assert code == 2
    assert f"cannot make a 104856551424 MiB disk at {image}: File too large" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_with_only_an_ext4_magic_is_refused_and_kept(kernel, tmp_path):
    image = tmp_path / "fake.img"
    data = bytearray(8 << 20)
    data[1024 + 0x38 : 1024 + 0x3A] = b"\x53\xef"
    image.write_bytes(bytes(data))
    code, _, err, _ = run(kernel, "--disk", f"8M:/d:{image}", "--", "true")
    assert code == 2
    assert f"disk {image} is not a usable ext4 image" in one_line(err)
    assert image.read_bytes() == bytes(data)


def test_console_log_into_a_missing_directory_is_refused(kernel, tmp_path):
    code, _, err, _ = run(kernel, "--console-log", tmp_path / "no" / "c.log", "--", "true")
    assert code == 2
    assert f"directory {tmp_path / 'no'} does not exist" in one_line(err)


def test_the_commands_path_finds_the_command(kernel, tmp_path):
    (tmp_path / "bin").mkdir()
    tool = tmp_path / "bin" / "only-here"
    tool.write_text("#!/bin/sh\necho found via PATH\n")
    tool.chmod(0o755)
    code, out, err, _ = run(
        kernel, "-v", f"{tmp_path}:/opt:ro", "-e", "PATH=/opt/bin:/bin", "--", "only-here"
    )
    assert code == 0, err
    assert out == b"found via PATH\n"


def test_a_port_in_use_is_a_start_error_with_qemus_words(kernel):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for _ in range(3):  # QEMU exiting raced the agent's hang-up into "booting" before
            code, _, err, _ = run(kernel, "--net", "user", "-p", f"{port}:80", "--", "true")
            assert code == 125
            assert "QEMU failed:" in one_line(err)
            assert f"Could not set up host forwarding rule 'tcp:127.0.0.1:{port}" in err


def test_untrusted_cache_directories_are_refused(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    env = {**os.environ, "QEMUBOX_CACHE_DIR": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "qemubox", "run", "--", "true"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    assert f"{cache} is writable by others (mode 777)" in one_line(proc.stderr.strip())
