"""The sandbox runtime against real QEMU boots (TCG here) of real kernels."""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import qemubox, wait_for
from qemubox.errors import GuestError, InputError
from qemubox.guest import protocol as p
from qemubox.sandbox.sandbox import KernelPanic, Sandbox, SandboxError
from qemubox.sandbox.spec import Disk, FSShare, Session

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.qemu,
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def sb(kernel):
    with Sandbox(Session(memory="256M", kernel=kernel, timeout=60)) as box:
        yield box


def run(box, script: str, **kw):
    return box.exec(["sh", "-c", script], **kw)


# --- commands ---------------------------------------------------------------------------------


def test_kernel_from_path_is_recognised(sb, kernel):
    assert sb.kernel.image == str(Path(kernel).resolve())
    assert sb.kernel.version.startswith("6.12.")
    assert sb.kernel.mmio
    assert sb.exec(["uname", "-r"]).stdout.decode().strip() == sb.kernel.version


def test_stdout_stderr_and_exit_codes(sb):
    r = run(sb, "echo hi; echo oops >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr, r.signal) == (3, b"hi\n", b"oops\n", None)
    assert run(sb, "true").exit_code == 0
    r = run(sb, "echo before; kill -TERM $$")
    assert (r.exit_code, r.signal, r.stdout) == (128 + signal.SIGTERM, signal.SIGTERM, b"before\n")
    assert run(sb, "kill -9 $$").exit_code == 137


def test_command_not_found_and_not_executable(sb):
    r = sb.exec(["/no/such/program"])
    assert r.exit_code == 127 and b"No such file or directory" in r.stderr
    r = sb.exec(["/etc/passwd"])
    assert r.exit_code == 126
    r = sb.exec(["ls"], cwd="/no/such/dir")
    assert r.exit_code == 127 and b"cannot change directory to /no/such/dir" in r.stderr


def test_env_and_cwd(sb):
    r = run(sb, 'echo "$A|$B|$PATH"; pwd', env={"A": "1", "B": "two words"}, cwd="/tmp")
    a, path = r.stdout.decode().splitlines()
    assert a.startswith("1|two words|/usr/local/sbin:")
    assert path == "/tmp"


def test_stdin(sb):
    r = sb.exec(["sh", "-c", "tr a-z A-Z; echo done >&2"], stdin=b"hello\nworld\n")
    assert r.stdout == b"HELLO\nWORLD\n" and r.stderr == b"done\n"
    # Without stdin, the command reads end of file at once.
    assert sb.exec(["cat"]).stdout == b""


def test_five_megabytes_of_binary_output(sb):
    data = os.urandom(5 * 1024 * 1024)
    sb.write_file("/tmp/blob", data, mode=0o600)
    r = sb.exec(["cat", "/tmp/blob"])
    assert len(r.stdout) == len(data)
    assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(data).digest()
    assert sb.read_file("/tmp/blob") == data
    assert run(sb, "stat -c %a /tmp/blob").stdout == b"600\n"
    # Interleaved streams stay apart, in order within each.
    r = run(sb, "for i in $(seq 1 2000); do echo out$i; echo err$i >&2; done")
    assert r.stdout.decode().split() == [f"out{i}" for i in range(1, 2001)]
    assert r.stderr.decode().split() == [f"err{i}" for i in range(1, 2001)]


def test_max_output_keeps_that_much_and_says_so(sb):
    r = run(sb, "head -c 300000 /dev/zero; echo done >&2", max_output=1000)
    assert (len(r.stdout), r.stderr, r.truncated, r.exit_code) == (1000, b"", True, 0)
    assert not run(sb, "echo short", max_output=1000).truncated


def test_stdin_larger_than_the_window_arrives_whole(sb):
    data = os.urandom(24 << 20)  # 24 windows; the command reads slowly at first
    r = run(sb, "sleep 1; sha256sum", stdin=data)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_streaming_callbacks(sb):
    chunks = []
    r = run(sb, "echo one; sleep 0.3; echo two", on_stdout=chunks.append)
    assert r.exit_code == 0 and r.stdout == b""
    assert b"".join(chunks) == b"one\ntwo\n" and len(chunks) >= 2


def test_timeout_kills_within_two_seconds(sb):
    start = time.monotonic()
    r = run(sb, "sleep 30 & sleep 30; echo never", timeout=1.0)
    took = time.monotonic() - start
    assert r.timed_out and r.exit_code == 137 and r.stdout == b""
    assert took < 1.0 + 2.0, took
    # The whole process group went: nothing of it is left.
    assert run(sb, "pgrep -f 'sleep 30' || echo none").stdout == b"none\n"


def test_background_process_does_not_hold_the_command(sb):
    start = time.monotonic()
    r = run(sb, "sleep 20 & echo started")
    assert r.stdout == b"started\n" and time.monotonic() - start < 5


def test_many_execs_and_concurrent_execs(sb):
    for i in range(20):
        assert sb.exec(["echo", str(i)]).stdout == f"{i}\n".encode()
    results = {}

    def work(n):
        results[n] = run(sb, f"sleep 0.5; echo {n}").stdout

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {n: f"{n}\n".encode() for n in range(4)}


def test_write_and_read_file_errors(sb):
    with pytest.raises(SandboxError, match="cannot read /nope"):
        sb.read_file("/nope")
    with pytest.raises(SandboxError, match="cannot write /proc/nope/x"):
        sb.write_file("/proc/nope/x", b"x")


def test_a_command_reports_its_guest_pid(sb):
    r = sb.exec(["sh", "-c", "echo $$"])
    assert r.pid is not None and r.stdout == f"{r.pid}\n".encode()
    assert sb.exec(["/nope"]).pid is None  # it never ran


def test_file_operations_without_a_command(sb):
    sb.exec(["sh", "-c", "mkdir -p /tmp/f/sub/deeper && printf 12345 > /tmp/f/a && "
                         "ln -s sub /tmp/f/link && touch /tmp/f/sub/deeper/z"])  # fmt: skip
    started = time.time_ns()
    a = sb.files.stat("/tmp/f/a")
    assert (a.path, a.name, a.kind, a.size, a.uid, a.mode & 0o777) == (
        "/tmp/f/a", "a", "file", 5, 0, 0o644
    )  # fmt: skip
    assert abs(a.mtime_ns - started) < 60 * 10**9  # the guest's clock is the host's
    link = sb.files.stat("/tmp/f/link")
    assert (link.kind, link.target) == ("symlink", "sub")
    assert sb.files.stat("/tmp/f/sub").kind == "dir"

    top = {e.path: e.kind for e in sb.files.list("/tmp/f")}
    assert top == {"/tmp/f/a": "file", "/tmp/f/sub": "dir", "/tmp/f/link": "symlink"}
    deep = {e.path for e in sb.files.list("/tmp/f", depth=3)}
    assert deep == {*top, "/tmp/f/sub/deeper", "/tmp/f/sub/deeper/z"}  # the link not entered
    assert {e.path for e in sb.files.list("/tmp/f", depth=2)} == {*top, "/tmp/f/sub/deeper"}

    made = sb.files.make_dir("/tmp/f/new/one/two")
    assert (made.path, made.kind, made.mode & 0o777) == ("/tmp/f/new/one/two", "dir", 0o755)
    moved = sb.files.rename("/tmp/f/a", "/tmp/f/elsewhere/b")  # its parents made
    assert (moved.path, moved.size) == ("/tmp/f/elsewhere/b", 5)
    assert sb.read_file("/tmp/f/elsewhere/b") == b"12345"
    sb.files.remove("/tmp/f/new")  # all it holds
    sb.files.remove("/tmp/f/link")  # the link, not what it points to
    assert {e.name for e in sb.files.list("/tmp/f")} == {"sub", "elsewhere"}
    assert [e.name for e in sb.files.list("/tmp/f/sub/deeper/..")] == ["deeper"]  # as it is

    # Each refusal is the guest's errno with the path it concerns.
    for call, err in [
        (lambda: sb.files.stat("/tmp/f/nope"), errno.ENOENT),
        (lambda: sb.files.list("/tmp/f/elsewhere/b"), errno.ENOTDIR),
        (lambda: sb.files.make_dir("/tmp/f/sub"), errno.EEXIST),
        (lambda: sb.files.rename("/tmp/f/nope", "/tmp/f/x"), errno.ENOENT),
        (lambda: sb.files.remove("/tmp/f/nope"), errno.ENOENT),
        (lambda: sb.files.remove("/"), errno.EBUSY),
    ]:
        with pytest.raises(GuestError) as caught:
            call()
        assert caught.value.errno == err and str(caught.value).startswith("/"), caught.value
    for call, message in [
        (lambda: sb.files.stat("tmp"), "'tmp' is not an absolute path"),
        (lambda: sb.files.rename("/tmp/f/sub", "x"), "'x' is not an absolute path"),
        (lambda: sb.files.list("/tmp", depth=0), "a listing 0 levels deep"),
        (lambda: sb.files.list("/tmp", depth=65), "a listing 65 levels deep"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            call()
    sb.files.remove("/tmp/f")
    assert sb.exec(["test", "-e", "/tmp/f"]).exit_code == 1


def test_file_operations_as_a_user(sb):
    sb.exec(["sh", "-c", "mkdir -p /tmp/u && chmod 1777 /tmp/u && mkdir -p /tmp/closed && "
                         "chmod 700 /tmp/closed && touch /tmp/closed/secret"])  # fmt: skip
    mine = sb.files.make_dir("/tmp/u/mine/deep", user="1000:1001")
    assert (mine.uid, mine.gid) == (1000, 1001)
    assert (sb.files.stat("/tmp/u/mine").uid, sb.files.stat("/tmp/u/mine").gid) == (1000, 1001)
    for call in (
        lambda: sb.files.list("/tmp/closed", user="1000"),
        lambda: sb.files.stat("/tmp/closed/secret", user="1000"),
        lambda: sb.files.make_dir("/tmp/closed/x", user="1000"),
        lambda: sb.files.remove("/tmp/closed/secret", user="1000"),
    ):
        with pytest.raises(GuestError) as caught:
            call()
        assert caught.value.errno == errno.EACCES
    assert sb.files.stat("/tmp/closed/secret").uid == 0  # root again for the next request
    assert sb.files.make_dir("/tmp/closed/x").uid == 0
    sb.files.remove("/tmp/u/mine", user="1000")
    sb.exec(["rm", "-rf", "/tmp/u", "/tmp/closed"])


def events_until(watch, wanted: set, timeout: float = 20) -> set:
    """The watch's events, as (kind name, path), once they include ``wanted`` (or time is
    up)."""
    seen: set = set()

    def all_seen() -> bool:
        seen.update((e.kind.name, e.path) for e in watch.events())
        return wanted <= seen

    wait_for(all_seen, timeout)
    return seen


def test_a_watched_directory_tells_what_happens_in_it(sb):
    sb.exec(["sh", "-c", "rm -rf /tmp/w && mkdir -p /tmp/w/old/older"])
    with sb.files.watch("/tmp/w", recursive=True) as w:
        assert w.directories == 3 and w.active
        script = (
            "cd /tmp/w && echo a > f && chmod 600 f && mv f g && rm g && "
            "mkdir -p new/deeper && echo b > new/deeper/inner && echo c > old/older/y"
        )
        assert sb.exec(["sh", "-c", script]).exit_code == 0
        wanted = {
            ("CREATE", "/tmp/w/f"), ("WRITE", "/tmp/w/f"), ("CHMOD", "/tmp/w/f"),
            ("RENAME", "/tmp/w/f"), ("CREATE", "/tmp/w/g"), ("REMOVE", "/tmp/w/g"),
            ("CREATE", "/tmp/w/new"), ("CREATE", "/tmp/w/new/deeper"),
            ("CREATE", "/tmp/w/new/deeper/inner"), ("CREATE", "/tmp/w/old/older/y"),
        }  # fmt: skip
        seen = events_until(w, wanted)
        assert wanted <= seen, wanted - seen
    assert not w.active
    sb.exec(["touch", "/tmp/w/after"])
    assert w.events() == []  # stopped

    got: list = []
    flat = sb.files.watch("/tmp/w", on_event=got.append)  # not recursive
    assert flat.directories == 1
    sb.exec(["sh", "-c", "touch /tmp/w/old/z /tmp/w/top"])
    assert wait_for(lambda: got)
    time.sleep(0.5)  # anything else would have come by now
    assert [(e.kind.name, e.path) for e in got] == [("CREATE", "/tmp/w/top")]
    assert flat.events() == []  # they went to the callback
    sb.exec(["rm", "-rf", "/tmp/w"])  # the watched directory goes: so does the watch
    assert wait_for(lambda: not flat.active)
    assert ("REMOVE", "/tmp/w") in {(e.kind.name, e.path) for e in got}
    flat.stop()  # already over: nothing to do

    sb.exec(["sh", "-c", "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m"])
    mounted = sb.files.watch("/tmp/m")
    assert sb.exec(["umount", "/tmp/m"]).exit_code == 0
    assert wait_for(lambda: not mounted.active)  # its file system went: so did the watch

    sb.exec(["touch", "/tmp/plain"])
    for path, err in [("/tmp/nope", errno.ENOENT), ("/tmp/plain", errno.ENOTDIR)]:
        with pytest.raises(GuestError, match=f"^{path}: ") as caught:
            sb.files.watch(path)
        assert caught.value.errno == err
    with pytest.raises(InputError, match="'tmp' is not an absolute path"):
        sb.files.watch("tmp")


def test_a_listing_of_many_entries_comes_in_parts_and_has_a_bound(sb):
    """A listing larger than one frame arrives whole; one over MAX_ENTRIES is refused."""
    name = "n" * 100
    script = (
        "mkdir /tmp/many && mount -t tmpfs -o nr_inodes=0 none /tmp/many && cd /tmp/many && "
        f"seq 3000 | sed s/^/{name}/ | xargs touch"
    )
    r = sb.exec(["sh", "-c", script])
    assert r.exit_code == 0, r.stderr
    listed = sb.files.list("/tmp/many")  # some 500 kB of entries
    assert len({e.name for e in listed}) == 3000
    r = sb.exec(["sh", "-c", f"cd /tmp/many && seq {p.MAX_ENTRIES} | xargs mkdir"])
    assert r.exit_code == 0, r.stderr
    refused = f"/tmp/many: more than {p.MAX_ENTRIES} entries (or 64 MiB of them)"
    with pytest.raises(GuestError, match=f"^{re.escape(refused)}$"):
        sb.files.list("/tmp/many")
    assert sb.exec(["sh", "-c", "rm /tmp/many/n*"]).exit_code == 0
    assert len(sb.files.list("/tmp/many")) == p.MAX_ENTRIES  # as many as it may hold
    assert sb.exec(["umount", "/tmp/many"]).exit_code == 0
    sb.files.remove("/tmp/many")


# --- shares and disks ---------------------------------------------------------------------------


def test_shares_read_only_read_write_and_literal_paths(kernel, tmp_path):
    ro = tmp_path / "ro"
    rw = tmp_path / "rw"
    evil = tmp_path / "a,readonly=off,b=c"
    for d in (ro, rw, evil):
        d.mkdir()
    (ro / "file").write_text("host data\n")
    (evil / "file").write_text("literal\n")
    session = Session(
        memory="256M",
        kernel=kernel,
        shares=[
            FSShare(str(ro), "/mnt/ro", "host_share", read_only=True),
            FSShare(str(rw), "/mnt/rw"),
            FSShare(str(evil), "/mnt/evil", read_only=True),
        ],
    )
    with Sandbox(session) as box:
        assert box.read_file("/mnt/ro/file") == b"host data\n"
        r = run(box, "echo changed > /mnt/ro/file")
        assert r.exit_code != 0 and b"Read-only file system" in r.stderr
        r = run(box, "touch /mnt/ro/new")
        assert r.exit_code != 0 and b"Read-only file system" in r.stderr
        assert run(box, "grep ' /mnt/ro ' /proc/mounts").stdout.split()[3].startswith(b"ro")
        box.write_file("/mnt/rw/from-guest", b"guest data\n")
        assert run(box, "mkdir -p /mnt/rw/d/e && echo x > /mnt/rw/d/e/f").exit_code == 0
        assert box.read_file("/mnt/evil/file") == b"literal\n"
        r = run(box, "echo injected > /mnt/evil/file")
        assert r.exit_code != 0 and b"Read-only file system" in r.stderr
    assert (ro / "file").read_text() == "host data\n"
    assert not (ro / "new").exists()
    assert (rw / "from-guest").read_text() == "guest data\n"
    assert (rw / "d" / "e" / "f").read_text() == "x\n"
    assert (evil / "file").read_text() == "literal\n"


def test_virtiofs_shares_read_write_and_read_only_even_after_a_remount(kernel, tmp_path):
    """virtiofs shares, through the CLI as a user types it: read, written, and a read-only
    one that a guest remounting it read-write still cannot change (virtiofsd serves it from
    a read-only bind mount); with a share over 9p beside them, and no virtiofsd left."""
    ro, rw, nine = tmp_path / "ro,x=y", tmp_path / "rw", tmp_path / "9p"
    for d in (ro, rw, nine):
        d.mkdir()
    (ro / "file").write_text("host data\n")
    (nine / "file").write_text("over 9p\n")
    script = (
        "cat /ro/file; echo guest > /rw/new; mkdir -p /rw/d/e; "
        "mount -o remount,rw /ro; echo changed > /ro/file || echo refused; "
        "grep -c ' virtiofs ' /proc/mounts"
    )
    r = qemubox(
        "run",
        "--kernel",
        kernel,
        "-m",
        "256M",
        "--share-fs",
        "virtiofs",
        "-v",
        f"{ro}:/ro:ro",
        "-v",
        f"{rw}:/rw",
        "--",
        "sh",
        "-c",
        script,
    )
    assert r.code == 0, r.err
    assert r.out.split("\n")[:3] == ["host data", "refused", "2"], r.out
    assert (ro / "file").read_text() == "host data\n"
    assert (rw / "new").read_text() == "guest\n" and (rw / "d" / "e").is_dir()
    session = Session(
        memory="256M",
        kernel=kernel,
        shares=[FSShare(str(rw), "/rw", fs="virtiofs"), FSShare(str(nine), "/nine")],
    )
    with Sandbox(session) as box:
        assert box.read_file("/rw/new") == b"guest\n"
        assert box.read_file("/nine/file") == b"over 9p\n"
    assert subprocess.run(["pgrep", "-f", "virtiofsd.*" + str(rw)]).returncode == 1


def test_persistent_disk_keeps_data_and_is_never_reformatted(kernel, tmp_path):
    image = tmp_path / "data.img"
    session = Session(
        memory="256M",
        kernel=kernel,
        disks=[Disk("64M", "/data", str(image)), Disk("32M", "/scratch")],
    )
    with Sandbox(session) as box:
        r = run(box, "echo kept > /data/file && echo gone > /scratch/file && df -k /data")
        assert r.exit_code == 0, r.stderr
    size = image.stat().st_size
    with Sandbox(session) as box:
        assert box.read_file("/data/file") == b"kept\n"
        assert run(box, "ls /scratch").stdout == b"lost+found\n"
    assert image.stat().st_size == size == 64 << 20
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"not ext4" * 1000)
    with pytest.raises(InputError, match="not an ext4 image"):
        Sandbox(Session(memory="256M", kernel=kernel, disks=[Disk("1M", "/j", str(junk))])).start()
    assert junk.read_bytes() == b"not ext4" * 1000


def test_a_guest_is_powered_off_only_when_its_writes_outlive_it(kernel, tmp_path):
    """Powering off syncs what the host keeps; with nothing kept, QEMU is killed at once."""
    image = tmp_path / "data.img"
    kept = Session(
        memory="256M", kernel=kernel, disks=[Disk("16M", "/data", str(image))],
        console_log=str(tmp_path / "kept.log"),
    )  # fmt: skip
    with Sandbox(kept) as box:
        run(box, "echo synced > /data/file")  # in the guest's page cache, until the poweroff
    assert "Power down" in (tmp_path / "kept.log").read_text()
    with Sandbox(kept) as box:
        assert box.read_file("/data/file") == b"synced\n"
    log = tmp_path / "nothing.log"
    nothing = Session(memory="256M", kernel=kernel, disks=[Disk("16M", "/scratch")])
    with Sandbox(replace(nothing, console_log=str(log))) as box:
        assert run(box, "echo lost > /scratch/file").exit_code == 0
        pid = box.pid
    assert "Power down" not in log.read_text()
    assert not Path(f"/proc/{pid}").exists()


# --- memory -------------------------------------------------------------------------------------


def meminfo(box) -> dict[str, int]:
    out = box.read_file("/proc/meminfo").decode()
    return {line.split(":")[0]: int(line.split()[1]) for line in out.splitlines()}


def test_balloon_shrinks_guest_memory(kernel):
    with Sandbox(Session(memory="512M", kernel=kernel, balloon=True)) as box:
        before = meminfo(box)
        assert box.memory() == 512 << 20
        box.set_memory("256M")
        assert box.wait_memory(260 << 20, timeout=30) <= 260 << 20  # BALLOON_CHANGE events
        assert box.memory() <= 260 << 20
        after = meminfo(box)
        # The guest sees the pages the balloon took: they leave its total memory.
        assert before["MemTotal"] - after["MemTotal"] >= 200 * 1024, (before, after)
        box.set_memory("512M")
        with pytest.raises(InputError, match="cannot grow memory beyond"):
            box.set_memory("1G")
    with (
        Sandbox(Session(memory="256M", kernel=kernel)) as box,
        pytest.raises(InputError, match="balloon=True"),
    ):
        box.set_memory("128M")


# --- network ------------------------------------------------------------------------------------


@pytest.fixture
def host_http():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"host secret\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_restricted_network_blocks_the_host_but_published_ports_work(kernel, host_http):
    session = Session(memory="256M", kernel=kernel, network="restricted", ports=[(0, 8080)])
    with Sandbox(session) as box:
        r = run(box, f"timeout 5 wget -q -O - http://10.0.2.2:{host_http}/")
        assert r.exit_code != 0 and b"host secret" not in r.stdout
        ((host_port, guest_port),) = box.ports
        assert guest_port == 8080 and host_port > 0
        setup = (
            "mkdir -p /tmp/www && echo guest page > /tmp/www/index.html && "
            "httpd -p 8080 -h /tmp/www"
        )
        assert run(box, setup).exit_code == 0
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/", timeout=5) as resp:
                    assert resp.read() == b"guest page\n"
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.3)


def test_user_network_reaches_the_host(kernel, host_http):
    with Sandbox(Session(memory="256M", kernel=kernel, network="user")) as box:
        r = run(box, f"timeout 10 wget -q -O - http://10.0.2.2:{host_http}/")
        assert r.stdout == b"host secret\n", r.stderr


def test_no_network_by_default(sb):
    names = run(sb, "ls /sys/class/net").stdout.split()
    assert b"lo" in names and not [n for n in names if n.startswith(b"eth")]


# --- several, distro kernels, failures ------------------------------------------------------------


def test_four_sandboxes_at_once(kernel):
    results, errors = {}, []

    def work(n):
        try:
            with Sandbox(Session(memory="128M", kernel=kernel)) as box:
                results[n] = box.exec(["sh", "-c", f"echo {n}"]).stdout
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == {n: f"{n}\n".encode() for n in range(4)}


def test_debian_distro_kernel_with_modules(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_text("via 9p module\n")
    session = Session(
        memory="512M",
        kernel="debian",
        network="user",
        shares=[FSShare(str(share), "/mnt/s", read_only=True)],
        disks=[Disk("32M", "/data")],
        balloon=True,
    )
    with Sandbox(session) as box:
        assert box.kernel.description.startswith("Debian's Linux 6.1")
        # its bzImage's own vmlinux, unpacked into the cache, booted through its PVH entry
        assert box.kernel.boot and box.kernel.boot.endswith("/vmlinux")
        assert box.exec(["uname", "-r"]).stdout.decode().strip() == box.kernel.version
        assert box.read_file("/mnt/s/f") == b"via 9p module\n"
        modules = box.read_file("/proc/modules").decode()
        for name in ("9p", "virtio_blk", "ext4", "virtio_net", "virtio_console"):
            assert f"{name} " in modules, name
        assert run(box, "echo ok > /data/x && cat /data/x").stdout == b"ok\n"


def _newest_package(pattern: str) -> str:
    proc = subprocess.run(
        ["apt-cache", "search", "--names-only", pattern], capture_output=True, text=True
    )
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names, f"no package matches {pattern}"
    return max(names, key=lambda n: [int(x) for x in re.findall(r"\d+", n)])


def _unpacked_package(package: str, into: Path) -> Path:
    """``package``'s .deb (downloaded once, kept in the cache) unpacked into ``into`` as a
    user would (``dpkg-deb -x``: no depmod runs)."""
    from qemubox.apt import apt_download
    from qemubox.paths import cache_dir, fill

    def download(tmp: Path) -> None:
        tmp.mkdir()
        apt_download(package, tmp)

    debs = fill(cache_dir() / "test-debs" / package, download)
    subprocess.run(["dpkg-deb", "-x", str(next(debs.glob("*.deb"))), str(into)], check=True)
    return into


@pytest.mark.parametrize(
    "pattern",
    [r"^linux-image-6\.1\.0-[0-9]+-amd64$", r"^linux-image-6\.12\.[0-9.]+\+deb12-amd64-unsigned$"],
)
def test_distro_kernel_packages_given_by_path(pattern, tmp_path):
    """Debian's own kernel packages of two versions, unpacked by hand and given by path:
    the image is recognised, the modules (compressed in 6.12) get an index made in the cache
    (the unpacked tree is left as it was), a share works through them, and a kernel missing a
    driver the session needs is refused before boot."""
    root = _unpacked_package(_newest_package(pattern), tmp_path / "pkg")
    (image,) = (root / "boot").glob("vmlinuz-*")
    version = image.name.removeprefix("vmlinuz-")
    modules = root / "lib" / "modules" / version
    before = sorted(p.name for p in modules.iterdir())
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_text("through 9p\n")
    script = "cat /mnt/f; uname -r; grep -o '^9p ' /proc/modules"
    r = qemubox(
        "run", "-m", "512M", "--kernel", image, "-v", f"{share}:/mnt:ro", "--", "sh", "-c", script
    )
    assert r.code == 0, r.err[-3000:]
    assert r.out == f"through 9p\n{version}\n9p \n"
    assert sorted(p.name for p in modules.iterdir()) == before  # nothing written there
    compressed = list(modules.rglob("9p.ko.*"))
    if version.startswith("6.12"):
        assert compressed, "6.12's modules are compressed: the case this test is for"
    for ko in modules.rglob("9p.ko*"):
        ko.unlink()
    os.utime(modules)  # a changed tree: its index is made again
    r = qemubox("run", "--kernel", image, "-v", f"{share}:/mnt:ro", "--", "true")
    assert r.code == 2 and r.err.count("\n") == 1, r.err
    assert "no 9p driver" in r.err


def test_guest_panic_raises_with_the_console_tail(kernel):
    with Sandbox(Session(memory="256M", kernel=kernel)) as box:
        with pytest.raises(KernelPanic) as err:
            run(box, "echo c > /proc/sysrq-trigger")
        assert "Kernel panic" in str(err.value)
        assert "sysrq" in err.value.console_tail.lower()
        assert len(err.value.console_tail.splitlines()) <= 30


def test_boot_timeout(kernel):
    with pytest.raises(SandboxError) as err:
        Sandbox(Session(memory="256M", kernel=kernel, boot_timeout=0.3, snapshot=False)).start()
    assert err.value.exit_code == 121


def _ignoring_hangups() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup


@pytest.mark.parametrize("start", [None, _ignoring_hangups], ids=["plain", "under-nohup"])
def test_sigkill_of_the_owner_leaves_no_qemu(kernel, tmp_path, start):
    """QEMU lives as long as the process that started it — not the thread: a sandbox
    started in a worker thread that then ends keeps working."""
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(f"""\
        import sys, threading, time, warnings
        warnings.simplefilter("ignore")
        from qemubox.sandbox.sandbox import Sandbox
        from qemubox.sandbox.spec import Session
        boxes = []
        worker = threading.Thread(
            target=lambda: boxes.append(Sandbox(Session(memory="128M", kernel={kernel!r})).start())
        )
        worker.start()
        worker.join()
        box = boxes[0]
        time.sleep(1)
        r = box.exec(["echo", "alive"])
        print(box.pid, box.dir, r.stdout.decode().strip(), flush=True)
        time.sleep(600)
    """)
    )
    owner = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, preexec_fn=start
    )
    pid_text, rundir, said = owner.stdout.readline().split()
    assert said == "alive"
    qemu_pid = int(pid_text)
    assert os.path.exists(f"/proc/{qemu_pid}")
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            status = Path(f"/proc/{qemu_pid}/status").read_text()
        except OSError:
            break  # gone
        if "State:\tZ" in status:
            break  # dead, waiting for its new parent to reap it
        assert time.monotonic() < deadline, "QEMU survived its owner"
        time.sleep(0.1)
    # The next sandbox sweeps the runtime directory the dead owner left behind.
    assert Path(rundir).exists()
    with Sandbox(Session(memory="128M", kernel=kernel)):
        pass
    assert not Path(rundir).exists()


# --- the command line -----------------------------------------------------------------------------


def test_cli_exit_codes_and_streams(kernel, tmp_path):
    r = qemubox("run", "--kernel", kernel, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.code, r.out) == (3, "out\n") and "err\n" in r.err
    assert qemubox("run", "--kernel", kernel, "--", "sh", "-c", "kill -9 $$").code == 137
    r = qemubox("run", "--kernel", kernel, "--timeout", "1", "--", "sleep", "20")
    assert r.code == 124 and "timed out after 1 s" in r.err
    assert qemubox("run", "--kernel", kernel, "--", "/no/such").code == 127
    r = qemubox(
        "run",
        "--kernel",
        kernel,
        "-i",
        "-e",
        "X=1",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        'cat; echo "$X $(pwd)"',
        stdin="piped\n",
    )
    assert r.out == "piped\n1 /tmp\n"


def test_cli_output_closed_by_the_reader_ends_like_sigpipe(kernel):
    """`qemubox run -- yes | head -1`: as soon as head has gone, qemubox ends as any
    writer to a closed pipe does (killed by SIGPIPE, status 141 in the shell)."""
    start = time.monotonic()
    pipe = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m qemubox run --kernel {kernel} -- yes 2>/dev/null"
         " | head -1; echo ${PIPESTATUS[0]}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert pipe.stdout == "y\n141\n", pipe.stdout + pipe.stderr
    assert time.monotonic() - start < 60


def test_cli_sandbox_failures(kernel, tmp_path):
    r = qemubox("run", "--kernel", kernel, "--", "sh", "-c", "echo c > /proc/sysrq-trigger")
    assert r.code == 122
    assert "--- guest console (last lines) ---" in r.err and "Kernel panic" in r.err
    r = qemubox("run", "--kernel", kernel, "--no-snapshot", "--boot-timeout", "0.3", "--", "true")
    assert r.code == 121
    r = qemubox("run", "--kernel", "/etc/passwd", "--", "true")
    assert r.code == 2 and "--kernel /etc/passwd: not a kernel image qemubox knows" in r.err
    log = tmp_path / "console.log"
    r = qemubox("run", "--kernel", kernel, "--console-log", log, "--", "true")
    assert r.code == 0 and log.exists()


def test_cli_unusable_disk_path_is_one_line(kernel):
    r = qemubox("run", "--kernel", kernel, "--disk", "16M:/d:/proc/qemubox.img", "--", "true")
    assert r.code == 2 and "/proc/qemubox.img: No such file or directory" in r.err
    assert r.err.count("\n") == 1, r.err


def test_cli_dry_run(kernel, tmp_path):
    """A dry run prints the command line and compiles, probes and creates nothing."""
    evil = tmp_path / "x,readonly=off"
    evil.mkdir()
    disk = tmp_path / "never-made.img"
    cache, runtime = tmp_path / "cache", tmp_path / "run"
    r = qemubox(
        "run",
        "--kernel",
        kernel,
        "--dry-run",
        "-v",
        f"{evil}:/mnt:ro",
        "--disk",
        f"16M:/d:{disk}",
        "--",
        "true",
        env={"QEMUBOX_CACHE_DIR": str(cache), "QEMUBOX_RUNTIME_DIR": str(runtime)},
    )
    assert r.code == 0, r.err
    assert r.out.startswith("qemu-system-x86_64 ")
    assert f"path={evil}".replace(",", ",,") in r.out and ",readonly=on" in r.out
    assert not disk.exists() and not runtime.exists()
    assert sorted(p.name for p in cache.iterdir()) == []  # no agent, initramfs or KVM verdict


def test_warns_exactly_when_falling_back_to_tcg(kernel):
    """With auto, TCG on a host with a usable-looking /dev/kvm comes with a warning saying
    why; KVM, or a host without /dev/kvm, comes without one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Sandbox(Session(memory="128M", kernel=kernel)) as box:
            accel, note = box.accel, box.plan.accel_note
    warned = [str(w.message) for w in caught if "using TCG" in str(w.message)]
    kvm_device = os.access("/dev/kvm", os.R_OK | os.W_OK)
    assert accel in ("kvm", "tcg")
    assert bool(warned) == (accel == "tcg" and kvm_device), (accel, warned)
    if warned:
        assert note and note in warned[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Sandbox(Session(memory="128M", kernel=kernel, accel="tcg")) as box:
            assert box.accel == "tcg"
    assert not [w for w in caught if "using TCG" in str(w.message)]


def test_readme_api_example(kernel, tmp_path):
    from qemubox import Disk, FSShare, Sandbox, Session

    src = tmp_path / "src"
    src.mkdir()
    s = Session(
        memory="512M",
        cpus=1,
        balloon=True,
        shares=[
            FSShare(
                host_path=str(src), mount_tag="host_share", mount_point="/mnt/host", read_only=True
            )
        ],
        disks=[Disk(size="1G", mount_point="/data")],
        network="none",
        kernel=kernel,
        timeout=60,
    )
    with Sandbox(s) as sb:
        r = sb.exec(["sh", "-c", "echo hi; exit 3"], env={"A": "1"}, cwd="/", stdin=b"", timeout=10)
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"hi\n", b"")
        assert r.pid > 1
        sb.write_file("/tmp/x", b"data")
        assert sb.read_file("/tmp/x") == b"data"
        assert sb.files.make_dir("/tmp/d/e", user="1000").uid == 1000
        listed = [(e.path, e.kind, e.size) for e in sb.files.list("/tmp", depth=2)]
        assert sorted(e[:2] for e in listed) == [
            ("/tmp/d", "dir"),
            ("/tmp/d/e", "dir"),
            ("/tmp/x", "file"),
        ]
        assert ("/tmp/x", "file", 4) in listed
        assert sb.files.stat("/tmp/x").mtime_ns > 0
        sb.files.rename("/tmp/x", "/tmp/d/x")
        sb.files.remove("/tmp/d")
        assert [e.name for e in sb.files.list("/tmp") if e.name in ("x", "d")] == []
        sb.set_memory("256M")
        size_kib = int(run(sb, "df -k /data | tail -1").stdout.split()[1])
        assert 900_000 < size_kib < 1_100_000, size_kib


def test_kernel_in_a_build_tree_is_recognised(kernel):
    from qemubox.kernel.artifacts import kernel_from_path

    manifest = json.loads((Path(kernel).parent / "manifest.json").read_text())
    image = Path(manifest["build_dir"]) / manifest["image"]
    k = kernel_from_path(image)
    assert k.config == str(Path(manifest["build_dir"]) / ".config")
    assert k.mmio
    assert k.version == manifest["version"]


def test_kernel_without_known_config_boots_on_q35(kernel, tmp_path):
    """A bare image (no config or modules beside it) gets the PCI machine, which any x86
    kernel with virtio-pci can use."""
    import shutil

    bare = tmp_path / "bzImage"
    shutil.copy(Path(kernel).resolve(), bare)
    with Sandbox(Session(memory="256M", kernel=str(bare))) as box:
        assert box.kernel.config is None and not box.kernel.mmio
        machine = box.qemu_args[box.qemu_args.index("-machine") + 1]
        assert machine.split(",")[0] == "q35"
        assert run(box, "echo on q35").stdout == b"on q35\n"
        assert run(box, "ls /sys/bus/pci/devices | wc -l").stdout.strip() != b"0"


# --- guests that outlive their starter -------------------------------------------------------

START_DETACHED = """
import sys
from qemubox import Sandbox, Session
sb = Sandbox(Session(memory="256M", kernel=sys.argv[1])).start(detach=True)
sb.exec(["sh", "-c", "echo from-the-starter > /tmp/mark"])
print(sb.detach())
"""


def test_a_detached_guest_is_attached_from_other_processes(kernel):
    from qemubox.errors import BusyError

    r = subprocess.run(
        [sys.executable, "-c", START_DETACHED, kernel], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    machine_id = r.stdout.split()[-1]
    first = Sandbox.attach(machine_id)
    try:
        assert first.read_file("/tmp/mark") == b"from-the-starter\n"
        assert first.state.value == "running"
        others = [Sandbox.attach(machine_id) for _ in range(3)]  # 4 client slots
        assert [o.exec(["echo", str(i)]).stdout for i, o in enumerate(others)] == [
            b"0\n",
            b"1\n",
            b"2\n",
        ]
        with pytest.raises(BusyError, match="in use by 4 clients"):
            Sandbox.attach(machine_id)
        for other in others:
            other.detach()
        first.detach()
        again = Sandbox.attach(machine_id)
        assert again.read_file("/tmp/mark") == b"from-the-starter\n"
        again.close()
        assert not Path(again.plan.runtime_dir).exists()
        assert not first.machine.alive()
    finally:
        if first.machine.alive():
            first.machine.kill()


KILLED_CLIENT = """
import sys
from qemubox import Sandbox
sb = Sandbox.attach(sys.argv[1])
print("attached", flush=True)
loud = "while :; do echo 0123456789abcdef0123456789abcdef; done"
sb.exec(["sh", "-c", loud] if sys.argv[2] == "loud" else ["sleep", "600"], max_output=1 << 40)
"""


def test_a_killed_client_leaves_the_guest_usable(kernel):
    """A client killed while idle, while its command streams output, or while stopped with
    the port full: the next client attaches at once and the guest answers."""
    sb = Sandbox(Session(memory="256M", kernel=kernel)).start(detach=True)
    machine_id = sb.detach()
    try:
        for round_, (mode, stop) in enumerate(
            [("quiet", False), ("loud", False), ("loud", True)] * 3
        ):
            client = subprocess.Popen(
                [sys.executable, "-c", KILLED_CLIENT, machine_id, mode],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert client.stdout.readline().strip() == "attached"
            time.sleep(0.3)
            if stop:
                client.send_signal(signal.SIGSTOP)
                time.sleep(0.5)
            client.kill()
            client.wait()
            again = Sandbox.attach(machine_id, timeout=15)
            try:
                left = "ps -o args | grep -e '[s]leep 600' -e '[0]123456789' || echo none"
                r = again.exec(["sh", "-c", f"echo round {round_}; {left}"])
                assert r.stdout == f"round {round_}\nnone\n".encode(), (mode, stop, r)
            finally:
                again.detach()
    finally:
        _stop_detached(machine_id)


def _stop_detached(machine_id: str) -> None:
    """Stop a detached machine; kill it when no client can attach any more."""
    from qemubox.vm.machine import Machine

    try:
        Sandbox.attach(machine_id, timeout=15).close()
    except SandboxError:
        Machine.open(machine_id).kill()


def _ended(proc: subprocess.Popen, deadline: float) -> tuple[str, str]:
    """A process's output once it ended by ``deadline``; else its stacks (and what runs
    under it) in the failure."""
    try:
        return proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        tree = subprocess.run(  # every process but the kernel's threads (kthreadd's)
            ["ps", "--forest", "-o", "pid,stat,etime,time,args", "-N", "--ppid", "2", "--pid", "2"],
            capture_output=True, text=True,
        ).stdout  # fmt: skip
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"{proc.args} hangs:\n{err[-12000:]}\n{tree[-6000:]}") from None


def test_eight_runs_at_once_on_an_empty_cache(kernel, tmp_path):
    """Every cache fill is safe under concurrency: 8 processes start together on an empty
    cache (agent, initramfs, KVM verdict), twice, and all are right."""
    # A run that hangs is made to say where: SIGABRT prints every thread's stack.
    env = {**os.environ, "QEMUBOX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONFAULTHANDLER": "1"}
    for round_ in range(2):
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "qemubox",
                    "run",
                    "-m",
                    "128M",
                    "--kernel",
                    kernel,
                    "--",
                    "sh",
                    "-c",
                    f"echo {round_}-{i}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for i in range(8)
        ]
        deadline = time.monotonic() + 600
        results = [(_ended(p, deadline), p.returncode) for p in procs]
        for i, ((out, err), code) in enumerate(results):
            assert (code, out) == (0, f"{round_}-{i}\n"), err[-2000:]
    agents = list((tmp_path / "cache" / "agent").glob("qemubox-agent-*"))
    initramfs = list((tmp_path / "cache" / "initramfs").glob("*.cpio"))
    assert len(agents) == 1 and len(initramfs) == 1, (agents, initramfs)
    leftovers = [p for p in (tmp_path / "cache").rglob("*.tmp")]
    assert not leftovers
