"""Snapshot-restored starts, for real: clones that share nothing they write, with their own
clock and randomness; a share slot pointed at other host directories; a changed kernel
never restored; a damaged snapshot dropped for a boot, with a warning."""

from __future__ import annotations

import json
import os
import shutil
import time
import types
import warnings
from pathlib import Path

import pytest

from helpers import assert_clock_is_now, assert_sleeps
from qemubox import Disk, FSShare, Sandbox, Session
from qemubox.sandbox.sandbox import SnapshotWarning
from qemubox.vm import snapshot

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]


@pytest.fixture
def own_kernel(kernel, tmp_path):
    """A copy of the kernel: snapshots of this test's own, removed afterwards."""
    copy = tmp_path / "vmlinuz"
    shutil.copy(kernel, copy)
    keys: list[str] = []
    yield str(copy), keys
    for k in keys:
        snapshot.remove(k)


RANDOM = "head -c 16 /dev/urandom | od -An -tx1; cat /proc/sys/kernel/random/uuid"


def session(kernel: str, **kw) -> Session:
    return Session(memory="256M", kernel=kernel, snapshot=True, **kw)


def test_restored_sandboxes_are_independent_clones(own_kernel):
    kernel, keys = own_kernel
    with Sandbox(session(kernel)) as first:  # booted; records the snapshot, then runs on
        assert first.plan.snapshot is not None and first.plan.snapshot.role == "record"
        assert "record the snapshot" in dict(first.timings)
        keys.append(first.plan.snapshot.key)
        first.exec(["sh", "-c", "echo mine > /tmp/x"])
        one = first.exec(["sh", "-c", RANDOM])
    time.sleep(2)  # the template's clock is behind by now
    with Sandbox(session(kernel)) as second:
        assert second.plan.snapshot == snapshot.find(second.plan)  # restored
        assert second.plan.snapshot.key == keys[0]
        lines = assert_clock_is_now(second, "test -e /tmp/x && echo seen; date +%s")
        assert b"seen" not in lines  # not the template's files, nor its time
        assert_sleeps(second)  # and its timer goes on
        two = second.exec(["sh", "-c", RANDOM])
    a, b = one.stdout.decode().splitlines(), two.stdout.decode().splitlines()
    assert a[0] != b[0] and a[1] != b[1]  # other random bytes, another uuid


def test_clones_on_a_network_have_their_own_mac(own_kernel):
    kernel, keys = own_kernel
    macs = []
    for _ in range(2):
        with Sandbox(session(kernel, network="restricted")) as box:
            assert box.plan.snapshot is not None
            keys.append(box.plan.snapshot.key)
            r = box.exec(["sh", "-c", "cat /sys/class/net/eth0/address; ping -c1 -W5 10.0.2.2"])
            assert r.exit_code == 0, r.stdout + r.stderr  # the network works with it
            macs.append(r.stdout.split()[0])
    assert keys[0] == keys[1] and macs[0] != macs[1]


def test_one_share_slot_other_host_directories(own_kernel, tmp_path):
    kernel, keys = own_kernel
    seen = []
    for name in ("left", "right"):
        d = tmp_path / name
        d.mkdir()
        (d / "who").write_text(name)
        with Sandbox(session(kernel, shares=[FSShare(str(d), "/mnt/s", "data")])) as box:
            assert box.plan.snapshot is not None
            keys.append(box.plan.snapshot.key)
            seen.append(box.read_file("/mnt/s/who").decode())
            box.write_file("/mnt/s/back", name.encode())
    assert seen == ["left", "right"] and keys[0] == keys[1]
    assert (tmp_path / "left" / "back").read_text() == "left"


def test_a_changed_kernel_is_never_restored(own_kernel):
    kernel, keys = own_kernel
    with Sandbox(session(kernel)) as box:
        keys.append(box.plan.snapshot.key)
    with open(kernel, "ab") as fh:  # another kernel file (the same bytes boot still)
        fh.write(b"\0")
    with Sandbox(session(kernel)) as box:
        keys.append(box.plan.snapshot.key)
        assert box.exec(["true"]).exit_code == 0
    assert keys[0] != keys[1]


def test_a_damaged_snapshot_is_dropped_and_the_guest_boots(own_kernel):
    kernel, keys = own_kernel
    with Sandbox(session(kernel)) as box:
        keys.append(box.plan.snapshot.key)
        snap = snapshot.find(box.plan)
    with open(snap.state, "r+b") as fh:
        fh.truncate(100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Sandbox(session(kernel)) as box:
            assert box.plan.snapshot is None  # booted
            assert box.exec(["echo", "ok"]).stdout == b"ok\n"
    assert any(issubclass(w.category, SnapshotWarning) for w in caught)
    with Sandbox(session(kernel)) as box:  # recorded afresh
        assert box.plan.snapshot is not None and box.plan.snapshot.role == "record"
    with Sandbox(session(kernel)) as box:
        assert box.plan.snapshot.role == "restore" and box.exec(["true"]).exit_code == 0


def test_a_clone_console_log_goes_on_from_the_boot(own_kernel, tmp_path):
    kernel, keys = own_kernel
    with Sandbox(session(kernel)) as box:
        keys.append(box.plan.snapshot.key)
    boot = snapshot.store_dir() / keys[0] / "console"
    assert boot.is_file()  # what the template's boot printed (little: the kernel is quiet)
    boot.write_text("[    0.5] what the boot printed\n")
    log = tmp_path / "console.log"
    with Sandbox(session(kernel, console_log=str(log))) as box:
        box.exec(["sh", "-c", "echo after the restore > /dev/console"])
    text = log.read_text()
    assert text.startswith("[    0.5] what the boot printed\n") and "after the restore" in text


def test_sessions_a_snapshot_cannot_hold_boot(own_kernel):
    kernel, _ = own_kernel
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Sandbox(session(kernel, balloon=True)) as box:
            assert box.plan.snapshot is None and box.exec(["true"]).exit_code == 0
    assert not [w for w in caught if issubclass(w.category, SnapshotWarning)]


def test_a_session_with_a_disk_is_recorded_then_restored(own_kernel, tmp_path):
    """Also when qemubox is root and QEMU drops to an unprivileged user: the images stay
    open read-write across the save, so nothing must reopen them by path. Each start's
    writes reach the image on the host."""
    kernel, keys = own_kernel
    image = tmp_path / "d.img"
    roles, users = [], set()
    for i in range(3):
        with Sandbox(session(kernel, disks=[Disk("16M", "/d", str(image))])) as box:
            roles.append(box.plan.snapshot.role)
            keys.append(box.plan.snapshot.key)
            users.add(box.plan.run_as)
            r = box.exec(["sh", "-c", f"echo {i} >> /d/f && cat /d/f"])
            assert r.stdout.split() == [str(k).encode() for k in range(i + 1)], r
    assert roles == ["record", "restore", "restore"]
    assert users == {"nobody" if os.geteuid() == 0 else None}


def test_the_command_line(kernel, tmp_path):
    from helpers import qemubox

    env = {"QEMUBOX_CACHE_DIR": str(tmp_path / "cache")}  # snapshots of this test's own
    run = ("run", "--kernel", kernel, "-m", "256M", "--timings", "--", "true")
    first = qemubox(*run, env=env)
    assert first.code == 0 and "record the snapshot" in first.err, first.err
    second = qemubox(*run, env=env)
    phases = [line.split()[0] for line in second.err.splitlines() if line.endswith(" ms")]
    assert phases == [
        "prepare", "QEMU", "restore", "agent", "session", "command", "teardown", "total"
    ]  # fmt: skip
    (snap,) = json.loads(qemubox("snapshot", "ls", "--json", env=env).out)
    assert snap["whole"] and snap["memory_mib"] == 256 and snap["ram_bytes"] > 0
    r = qemubox("snapshot", "prune", "--max-size", "1K", env=env)
    assert r.code == 0 and "removed 1 snapshot" in r.err
    assert json.loads(qemubox("snapshot", "ls", "--json", env=env).out) == []
    assert not (Path(snapshot.ram_dir()) / f"{snap['key']}.ram").exists()
    assert "record the snapshot" in qemubox(*run, env=env).err  # recorded again
    (snap,) = json.loads(qemubox("snapshot", "ls", "--json", env=env).out)
    Path(snap["initrd"]).unlink()  # pruned from the initramfs cache: it cannot serve
    r = qemubox("snapshot", "prune", env=env)
    assert r.code == 0 and "removed 1 snapshot" in r.err
    r = qemubox("snapshot", "rm", "nope", env=env)
    assert r.code == 2 and "no snapshot 'nope'" in r.err


def test_pause_and_resume_three_times(kernel, state, tmp_path):
    from helpers import qemubox

    assert qemubox("create", "--kernel", kernel, "-m", "256M", "--no-snapshot", "pz").code == 0
    start = "setsid sh -c 'while :; do echo t >> /tmp/ticks; sleep 1; done' </dev/null "
    start += ">/dev/null 2>&1 & echo $! > /tmp/pid"
    assert qemubox("exec", "pz", "--", "sh", "-c", start).code == 0
    for round_ in range(3):
        r = qemubox("exec", "pz", "--", "sh", "-c", f"echo {round_} >> /root/rounds")
        assert r.code == 0, r.err
        r = qemubox("pause", "pz")
        assert r.code == 0, r.err
        (status,) = json.loads(qemubox("ls", "-a", "--json").out)
        assert status["state"] == "paused" and status["machine"] is None
        assert (state / "sandboxes" / "pz" / "paused.state").stat().st_size > 1 << 20
        time.sleep(2 if round_ == 0 else 0)  # the guest's clock stands still meanwhile
        assert qemubox("resume", "pz").code == 0
        before = time.time()
        r = qemubox(
            "exec", "pz", "--", "sh", "-c",
            "cat /root/rounds; kill -0 $(cat /tmp/pid) && echo alive; date +%s",
        )  # fmt: skip
        lines = r.out.split()
        assert lines[:-1] == [*map(str, range(round_ + 1)), "alive"], r.err
        assert before - 1 <= int(lines[-1]) <= time.time() + 1  # the clock caught up
    assert not (state / "sandboxes" / "pz" / "paused.state").exists()
    assert qemubox("pause", "pz").code == 0
    assert qemubox("stop", "pz").code == 0  # a paused one: its state dropped
    (status,) = json.loads(qemubox("ls", "-a", "--json").out)
    assert status["state"] == "stopped" and "paused state dropped" in status["note"]
    r = qemubox("resume", "pz")
    assert r.code == 2 and "only a paused one" in r.err
    share = tmp_path / "s"
    share.mkdir()
    assert qemubox("create", "--kernel", kernel, "-m", "256M", "-v", f"{share}:/s", "sh9").code == 0
    r = qemubox("pause", "sh9")
    assert r.code == 2 and "9p shares mounted" in r.err


def test_a_sandbox_with_a_disk_pauses_and_resumes(kernel, state):
    """Its disk image open read-write across the save, even by a QEMU that dropped root:
    what was written is there after the resume, and it takes more."""
    from helpers import qemubox

    r = qemubox("create", "--kernel", kernel, "-m", "256M", "--disk", "16M:/data", "pd")
    assert r.code == 0, r.err
    assert qemubox("exec", "pd", "--", "sh", "-c", "echo one > /data/f").code == 0
    for _ in range(2):
        r = qemubox("pause", "pd")
        assert r.code == 0, r.err
        assert qemubox("resume", "pd").code == 0
    r = qemubox("exec", "pd", "--", "sh", "-c", "echo two >> /data/f && sync && cat /data/f")
    assert r.out == "one\ntwo\n", r.err


def test_a_sandbox_restored_from_a_snapshot_pauses_and_resumes(kernel, state):
    from helpers import qemubox

    assert qemubox("create", "--kernel", kernel, "-m", "256M", "ps").code == 0
    assert qemubox("exec", "ps", "--", "sh", "-c", "echo kept > /tmp/f").code == 0
    assert qemubox("pause", "ps").code == 0
    where = state / "sandboxes" / "ps" / "record.json"
    record = json.loads(where.read_text())
    snapshot.remove(record["paused"]["plan"]["snapshot"]["key"])  # pruned meanwhile
    record["paused"]["plan"]["initrd"] = str(state / "pruned.cpio")  # its initramfs too
    where.write_text(json.dumps(record))
    r = qemubox("resume", "ps")
    assert r.code == 0, r.err
    assert qemubox("exec", "ps", "--", "cat", "/tmp/f").out == "kept\n"
    assert qemubox("pause", "ps").code == 0
    record = json.loads(where.read_text())
    record["paused"]["plan"]["kernel"]["image"] = str(state / "gone-vmlinux")
    where.write_text(json.dumps(record))
    r = qemubox("resume", "ps")  # QEMU cannot start: it says why, and nothing is lost
    assert r.code != 0 and r.err.count("\n") == 1, r.err
    assert "cannot resume 'ps'" in r.err and "gone-vmlinux" in r.err, r.err
    assert (state / "sandboxes" / "ps" / "paused.state").exists()


def test_a_sparse_copy_keeps_data_and_holes(tmp_path):
    from qemubox import paths

    src, dst = tmp_path / "ram", tmp_path / "copy"
    with open(src, "wb") as fh:
        fh.truncate(64 << 20)
        for at in (0, 8 << 20, (64 << 20) - 4096):  # pages a guest touched
            fh.seek(at)
            fh.write(bytes([at % 251 + 1]) * 4096)
    paths.copy_sparse(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 <= 3 * 4096 * 4  # holes stay holes


def test_a_sparse_copy_of_a_file_that_shrinks_ends(tmp_path, monkeypatch):
    """The source shrinks while it is copied (the kernel copies nothing more): the copy
    ends, as long as what was read (it looped on the same data before)."""
    from qemubox import paths

    src, dst = tmp_path / "ram", tmp_path / "copy"
    src.write_bytes(b"a" * 8192 + b"b" * 8192)
    real, calls = os.copy_file_range, []

    def shrinking(fd_in, fd_out, count, offset_src=None, offset_dst=None):
        calls.append(offset_src)
        if len(calls) > 1:
            return 0  # at the end of the file now
        return real(fd_in, fd_out, min(count, 8192), offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", shrinking)
    paths.copy_sparse(src, dst)
    assert dst.read_bytes() == b"a" * 8192 and calls == [0, 8192]


@pytest.fixture
def shm(tmp_path, monkeypatch):
    """A stand-in for /dev/shm: the real caches' RAM files are neither counted nor taken."""
    monkeypatch.setattr(snapshot, "SHM", tmp_path / "shm")
    (tmp_path / "shm").mkdir()
    monkeypatch.setenv("QEMUBOX_CACHE_DIR", str(tmp_path / "cache"))
    snapshot._ram_dir.cache_clear()
    yield snapshot._user_dir()
    snapshot._ram_dir.cache_clear()


def _cache(user: Path, name: str, store: Path) -> Path:
    d = user / name
    d.mkdir(parents=True)
    (d / snapshot.STORE_MARK).write_text(str(store))
    return d


def _recorded(ram_dir: Path, store: Path, k: str, used: float, size: int = 64 << 10) -> Path:
    ram = ram_dir / f"{k}.ram"
    ram.write_bytes(b"r" * size)
    os.utime(ram, (used, used))
    (store / k).mkdir(parents=True)
    (store / k / "state").write_bytes(b"s")
    (store / k / "meta.json").write_text("{}")
    return ram


def test_ram_files_of_a_cache_that_is_gone_are_dropped(shm, tmp_path):
    gone = _cache(shm, "gone", tmp_path / "gone" / "snapshots")
    kept = _cache(shm, "kept", tmp_path / "snapshots")
    for d in (gone, kept):
        (d / "k.ram").write_bytes(b"ram")
    (shm / "unmarked").mkdir()
    mine = snapshot.ram_dir()
    assert (mine / snapshot.STORE_MARK).read_text() == str(tmp_path / "cache" / "snapshots")
    assert not gone.exists() and not (shm / "unmarked").exists()
    assert (kept / "k.ram").read_bytes() == b"ram"


def test_ram_files_are_kept_within_one_budget_across_caches(shm, tmp_path, monkeypatch):
    from qemubox import paths

    mine, own_store = snapshot.ram_dir(), snapshot.store_dir()
    other_store = tmp_path / "other" / "snapshots"
    other = _cache(shm, "other", other_store)
    now = time.time()
    # An orphan (its record gone), a file its recorder holds between its files, a recording
    orphan = other / "orphan.ram"
    orphan.write_bytes(b"o" * 4096)
    between = other / "between.ram"
    between.write_bytes(b"b" * 4096)
    os.utime(between, (now - 500, now - 500))  # the oldest: the first taken, were it free
    other_store.mkdir(parents=True)
    held = paths.try_lock(other_store / ".between.lock")
    recording = mine / f".rec.{os.getpid()}.ram"
    recording.write_bytes(b"x" * (256 << 10))
    old_other = _recorded(other, other_store, "old", now - 300)
    old_mine = _recorded(mine, own_store, "mine", now - 200)
    new_other = _recorded(other, other_store, "new", now - 100)
    try:
        # Room for four of these files: a recording of 64 KiB needs one of the three to go
        monkeypatch.setattr(snapshot, "BUDGET_MAX", (3 << 16) + 8192 + 4096)
        snapshot.make_room(64 << 10)
        assert not orphan.exists() and between.exists() and recording.exists()
        assert not old_other.exists() and not (other_store / "old").exists()
        assert old_mine.exists() and new_other.exists()
        # A restore makes a file the most recently used: the other cache's goes first
        assert snapshot.find(None, "mine") is not None  # the key given: no plan read
        snapshot.make_room(128 << 10)
        assert not new_other.exists() and not (other_store / "new").exists()
        assert old_mine.exists()
        snapshot.make_room(192 << 10)  # the own cache's record goes with its file
        assert not old_mine.exists() and not (own_store / "mine").exists()
        assert between.exists()  # held all along
    finally:
        os.close(held)
    # No room on tmpfs for a recording: one OSError, which a start turns into its warning
    monkeypatch.setattr(snapshot, "SPARE", 1 << 60)
    plan = types.SimpleNamespace(memory_mib=1)
    with pytest.raises(OSError, match=r"has \d+ MiB free, recording needs \d+ MiB"):
        snapshot.claim(plan, "k")
    fd = paths.try_lock(own_store / ".k.lock")  # the key's lock was let go
    assert fd is not None
    os.close(fd)


def test_the_initramfs_cache_keeps_those_used_last(tmp_path, monkeypatch):
    from qemubox.guest import initramfs

    now = time.time()

    def archive(name: str, used_ago: float) -> Path:
        path = tmp_path / f"x86_64-{name}.cpio"
        path.write_bytes(b"cpio")
        (tmp_path / f".{path.name}.lock").touch()
        os.utime(path, (now - used_ago, now - 30 * 86400))
        return path

    monkeypatch.setattr(initramfs, "CACHE_KEEP", 3)
    fresh = [archive(f"fresh{i}", 7200 * (i + 1)) for i in range(3)]
    beyond = archive("beyond", 7200 * 4)  # the fourth used last
    stale = archive("stale", 15 * 86400)
    removed = initramfs.prune(tmp_path)
    assert sorted(removed) == sorted([beyond, stale])
    assert sorted(tmp_path.glob("*.cpio")) == sorted(fresh)
    assert not (tmp_path / f".{beyond.name}.lock").exists()
    assert (tmp_path / f".{fresh[0].name}.lock").exists()
    mtime = fresh[0].stat().st_mtime_ns  # part of a snapshot's key: a use keeps it
    initramfs._used(fresh[0])
    assert fresh[0].stat().st_mtime_ns == mtime and fresh[0].stat().st_atime > now - 5
    just_used = [archive(f"now{i}", 60) for i in range(4)]  # within the grace: all stay
    initramfs.prune(tmp_path)
    assert sorted(tmp_path.glob("*.cpio")) == sorted([fresh[0], *just_used])  # used now
