"""Kernel builder plumbing: profiles, sources, make runs, installs, check and doctor.

These use no compiler; the real build and boot are in test_kernel_build.py.
"""

from __future__ import annotations

import json
import os
import stat
import textwrap

import pytest

from helpers import as_at_a_terminal, qemubox
from qemubox.errors import InputError
from qemubox.kernel.build import BuildRequest, config_items, request_fragments, resolve_source
from qemubox.kernel.doctor import diagnose
from qemubox.kernel.install import install_build
from qemubox.kernel.menuconfig import config_changes
from qemubox.kernel.progress import BuildFailed, run_make
from qemubox.kernel.requirements import REQUIRED, check_requirements


def fake(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize(
    ("profile", "arch", "base", "names"),
    [
        ("minimal", "x86_64", "tinyconfig", ["sandbox", "x86_64", "vmcore"]),
        ("default", "x86_64", "defconfig", ["sandbox", "x86_64", "vmcore"]),
        ("small", "x86_64", "tinyconfig", ["sandbox", "small", "x86_64", "vmcore"]),
        ("fastboot", "x86_64", "tinyconfig", ["sandbox", "fastboot", "x86_64", "vmcore"]),
        ("debug", "x86_64", "tinyconfig", ["sandbox", "debug", "x86_64", "vmcore"]),
        ("minimal", "arm64", "tinyconfig", ["sandbox", "arm64", "vmcore"]),
    ],
)
def test_profiles(profile, arch, base, names):
    got_base, merged, got_names = request_fragments(BuildRequest(profile=profile), arch)
    assert got_base == base
    assert got_names == names
    assert merged["VIRTIO_BLK"].value == "y"


def test_fragments_and_items_go_on_top(tmp_path):
    frag = tmp_path / "mine.config"
    frag.write_text("# CONFIG_IPV6 is not set\n")
    req = BuildRequest(
        profile="small",
        fragments=[str(frag)],
        config_items=["CONFIG_LOG_BUF_SHIFT=16", "CONFIG_IPV6=y"],
    )
    _, merged, names = request_fragments(req, "x86_64")
    assert merged["MODULES"].value == "n"  # from small
    assert merged["LOG_BUF_SHIFT"].value == "16"  # the item beats the profile
    assert merged["IPV6"].value == "y"  # the item beats the user's fragment
    assert names[-2:] == ["CONFIG_LOG_BUF_SHIFT=16", "CONFIG_IPV6=y"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("CONFIG_X=maybe", "--config-item 1:1: invalid value 'maybe'"),
        ("X=y", "--config-item 1:1: expected CONFIG_NAME=value"),
        ("# just a comment", "expected one CONFIG_NAME=value"),
    ],
)
def test_bad_config_items(item, message):
    with pytest.raises(InputError, match=message):
        config_items([item])


def test_unknown_profile():
    with pytest.raises(InputError, match="unknown profile 'huge'"):
        request_fragments(BuildRequest(profile="huge"), "x86_64")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"kernel_version": "6.12", "source": "/x"}, "not both"),
        ({"kernel_version": "six"}, "must look like 6.12 or 6.6.30"),
        ({"kernel_version": "6.12.1.4"}, "must look like"),
        ({"source": "/nonexistent/linux"}, "no such directory or tarball"),
    ],
)
def test_bad_sources(kw, message):
    with pytest.raises(InputError, match=message):
        resolve_source(kw.get("kernel_version"), kw.get("source"))


def test_download_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("QEMUBOX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QEMUBOX_KERNEL_MIRROR", "http://127.0.0.1:9/pub")
    with pytest.raises(
        InputError,
        match=r"cannot download http://127.0.0.1:9/pub/v6.x/"
        r"linux-6.6.30.tar.xz .*offline\? Give a local",
    ):
        resolve_source("6.6.30", None)
    assert not list((tmp_path / "downloads").iterdir())


def test_tarball_sha256_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("QEMUBOX_CACHE_DIR", str(tmp_path / "cache"))
    tarball = tmp_path / "linux-9.9.9.tar.xz"
    tarball.write_bytes(b"not really a tarball")
    with pytest.raises(InputError, match=r"sha256 is .*, expected 00ff"):
        resolve_source(None, str(tarball), sha256="00ff")


def test_cli_build_errors_are_one_line(tmp_path):
    r = qemubox("kernel", "build", "--source", tmp_path / "none", "-o", tmp_path / "out")
    assert r.code == 2 and r.err.count("\n") == 1
    r = qemubox("kernel", "build", "--profile", "huge")
    assert r.code == 2
    r = qemubox("kernel", "build", "--config-item", "CONFIG_A=what", "-o", tmp_path / "o")
    assert r.code == 2 and "--config-item 1:1: invalid value 'what'" in r.err
    assert not (tmp_path / "o").exists()


def test_run_make_counts_objects_and_logs(tmp_path):
    make = fake(
        tmp_path,
        "make",
        """\
        echo "  CC      init/main.o"
        echo "  CC [M]  fs/9p/vfs_super.o"
        echo "  AS      arch/x86/entry/entry_64.o"
        echo "  LD      vmlinux"
        echo "args: $*"
    """,
    )
    import io

    from rich.console import Console

    shown = io.StringIO()
    seconds = run_make(
        [str(make), "-j3", "bzImage"],
        tmp_path / "b" / "build.log",
        console=Console(file=shown, force_terminal=False, width=200),
    )
    log = (tmp_path / "b" / "build.log").read_text()
    assert "args: -j3 bzImage" in log and "CC [M]" in log
    assert "3 objects compiled" in shown.getvalue()  # CC, CC [M] and AS; LD is no object
    assert seconds >= 0


def test_run_make_failure_shows_the_last_40_lines(tmp_path):
    make = fake(
        tmp_path,
        "make",
        """\
        for i in $(seq 1 100); do echo "line $i"; done
        echo "fs/ext4/inode.c:12: error: expected ';'" ; exit 2
    """,
    )
    with pytest.raises(BuildFailed) as err:
        run_make([str(make)], tmp_path / "build.log")
    tail = err.value.log_tail.splitlines()
    assert len(tail) == 40
    assert tail[0] == "line 62" and tail[-1].endswith("error: expected ';'")
    assert f"full log: {tmp_path / 'build.log'}" in str(err.value)


def fake_build(tmp_path, release="6.12.0-test", modules=True):
    build = tmp_path / "builddir"
    (build / "arch/x86/boot").mkdir(parents=True)
    (build / "arch/x86/boot/bzImage").write_bytes(b"kernel image")
    (build / ".config").write_text("CONFIG_MODULES=y\n")
    (build / "System.map").write_text("ffffffff81000000 T _text\n")
    (build / "vmlinux").write_bytes(b"\x7fELF")
    mods = build / ".qemubox-modules/lib/modules" / release
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text("")
    manifest = {
        "version": release,
        "arch": "x86_64",
        "image": "arch/x86/boot/bzImage",
        "config_sha256": "abc",
        "modules": modules,
        "build_dir": str(build),
        "profile": "minimal",
    }
    return build, manifest


def test_install_layout(tmp_path):
    build, manifest = fake_build(tmp_path)
    out = tmp_path / "out"
    assert install_build(manifest, build, out) == []
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "System.map-6.12.0-test",
        "config",
        "config-6.12.0-test",
        "lib",
        "manifest.json",
        "vmlinux",
        "vmlinuz",
        "vmlinuz-6.12.0-test",
    ]
    assert os.readlink(out / "vmlinuz") == "vmlinuz-6.12.0-test"
    assert (out / "vmlinuz").read_bytes() == b"kernel image"
    assert (out / "lib/modules/6.12.0-test/modules.dep").exists()
    assert json.loads((out / "manifest.json").read_text())["installed_to"] == str(out)
    # Installing the same build again touches nothing.
    stamp = (out / "vmlinux").stat().st_mtime_ns
    assert install_build(manifest, build, out) == []
    assert (out / "vmlinux").stat().st_mtime_ns == stamp


def test_install_keeps_what_the_user_had(tmp_path):
    build, manifest = fake_build(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vmlinux").write_bytes(b"my own vmlinux")
    (out / "vmlinuz").write_bytes(b"my own kernel, not a link")
    notes = install_build(manifest, build, out)
    assert (out / "vmlinux.old").read_bytes() == b"my own vmlinux"
    assert (out / "vmlinuz.old").read_bytes() == b"my own kernel, not a link"
    assert len(notes) == 2 and all("kept the previous" in n for n in notes)


def test_install_into_a_file_is_refused(tmp_path):
    build, manifest = fake_build(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        install_build(manifest, build, tmp_path / "f")


def all_required(value="y"):
    return {name: value for names in REQUIRED.values() for name in names}


def test_check_requirements():
    values = all_required()
    assert all(r.ok for r in check_requirements(values))
    values.update(VIRTIO_NET="m", VIRTIO_BLK="m", TMPFS="n")
    del values["9P_FS"]
    bad = {r.name: r.line() for r in check_requirements(values) if not r.ok}
    assert set(bad) == {"VIRTIO_BLK", "TMPFS", "9P_FS"}
    assert bad["TMPFS"] == "✗ CONFIG_TMPFS is NOT enabled"
    assert bad["VIRTIO_BLK"].startswith(
        "✗ CONFIG_VIRTIO_BLK is NOT enabled (=m, but must be built in: the root disk"
    )


def test_check_command(tmp_path):
    config = tmp_path / ".config"
    config.write_text("".join(f"CONFIG_{n}=y\n" for n in all_required()))
    r = qemubox("kernel", "check", tmp_path)
    assert r.code == 0, r.out
    assert "  ✓ CONFIG_VIRTIO_BALLOON is enabled" in r.out.splitlines()
    config.write_text(config.read_text().replace("CONFIG_VIRTIO_BLK=y", "CONFIG_VIRTIO_BLK=m"))
    r = qemubox("kernel", "check", config)
    assert r.code == 1
    assert "✗ CONFIG_VIRTIO_BLK is NOT enabled (=m, but must be built in" in r.out
    assert "1 required option(s) missing" in r.err
    r = qemubox("kernel", "check", tmp_path / "nope")
    assert r.code == 2


SEED_ISSUES = [
    '"modprobe: FATAL: Module not found"',
    '"Cannot mount 9p filesystem"',
    '"No virtio block device detected"',
    '"Kernel doesn\'t boot"',
]


def test_doctor_from_config():
    assert diagnose(all_required(), None) == []
    values = all_required()
    values.update({"9P_FS": "n", "NET_9P_VIRTIO": "n"})
    (finding,) = diagnose(values, None)
    assert finding.title == SEED_ISSUES[1]
    assert "CONFIG_NET_9P_VIRTIO=y" in finding.fix and "CONFIG_9P_FS=y" in finding.fix
    values = all_required()
    values.update(VIRTIO_BLK="n", DEVTMPFS="n")
    titles = [f.title for f in diagnose(values, None)]
    assert titles == [SEED_ISSUES[2], SEED_ISSUES[3]]


def test_doctor_from_logs():
    log = (
        "Linux version 6.12.0\nRun /init as init process\n"
        "modprobe: FATAL: Module 9pnet_virtio not found in directory /lib/modules/6.12.0\n"
        "mount: mounting host on /mnt failed: No such device (unknown filesystem type '9p')\n"
    )
    findings = {f.title: f for f in diagnose(None, log)}
    assert set(findings) == {SEED_ISSUES[0], SEED_ISSUES[1]}
    assert findings[SEED_ISSUES[0]].fix == ["CONFIG_NET_9P_VIRTIO=m"]
    silent = diagnose(None, "")
    assert [f.title for f in silent] == [SEED_ISSUES[3]]
    assert "no 'Linux version' line" in silent[0].evidence[0]


def test_doctor_command(tmp_path):
    config = tmp_path / "config"
    config.write_text("".join(f"CONFIG_{n}=y\n" for n in all_required()))
    assert qemubox("kernel", "doctor", config).code == 0
    log = tmp_path / "boot.log"
    log.write_text(
        "Linux version 6.12\nKernel panic - not syncing: VFS: Unable to mount root fs "
        "on unknown-block(0,0)\n"
    )
    r = qemubox("kernel", "doctor", "--boot-log", log)
    assert r.code == 1
    assert SEED_ISSUES[2] in r.out and "fix (add to a fragment):" in r.out
    assert qemubox("kernel", "doctor", "--boot-log", tmp_path / "none").code == 2


def test_config_changes():
    assert config_changes({"A": "y", "B": "m", "C": "y"}, {"A": "y", "B": "y", "D": "y"}) == {
        "B": "y",
        "D": "y",
        "C": "n",
    }


FAKE_COMPILE = """\
#!/bin/bash
# Configuration goes to the real make; the compile step is faked.
for a in "$@"; do [[ $a == O=* ]] && out=${a#O=}; done
case " $* " in
  *" vmlinux "*)
    echo "$*" >> "$LOG"
    [ -n "$STALL" ] && { trap 'echo got-sigint >> "$LOG"; exit 130' INT; touch "$STALL"; sleep 60; }
    mkdir -p "$out/arch/x86/boot" "$out/include/config"
    echo image > "$out/arch/x86/boot/bzImage"; echo elf > "$out/vmlinux"
    echo map > "$out/System.map"; echo 6.12.0-fake > "$out/include/config/kernel.release"
    echo "  CC      init/main.o"; exit 0;;
  *" modules_install "*)
    mkdir -p "$INSTALL_MOD_PATH/lib/modules/6.12.0-fake"; exit 0;;
esac
exec make "$@"
"""


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A scratch cache that borrows the extracted 6.12 source from the user cache."""
    from helpers import borrowed_source_cache

    src, cache = borrowed_source_cache(tmp_path)
    monkeypatch.setenv("QEMUBOX_CACHE_DIR", str(cache))
    make = fake(tmp_path, "make", FAKE_COMPILE)
    monkeypatch.setenv("QEMUBOX_MAKE", str(make))
    monkeypatch.setenv("LOG", str(tmp_path / "make.log"))
    return src


@pytest.mark.kernel
def test_directory_source_is_built_out_of_tree(private_cache, tmp_path):
    src = private_cache
    before = sorted(p.name for p in src.iterdir())
    r = qemubox("kernel", "build", "--source", src, "-j", "3", "-o", tmp_path / "out")
    assert r.code == 0, r.err
    assert sorted(p.name for p in src.iterdir()) == before  # nothing written into the source
    calls = (tmp_path / "make.log").read_text().splitlines()
    assert len(calls) == 1
    assert "-j3" in calls[0].split() and "ARCH=x86_64" in calls[0].split()
    assert calls[0].split()[-2:] == ["vmlinux", "modules"]  # no bzImage: PVH boots vmlinux
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"] == str(src.resolve())
    assert manifest["source_key"].startswith("dir-")
    assert manifest["version"] == "6.12.0-fake"
    # Nothing changed in the tree, the configuration or make's environment: no make at all.
    r = qemubox("kernel", "build", "--source", src, "-o", tmp_path / "out")
    assert r.code == 0 and "up to date, nothing to build" in r.err
    assert len((tmp_path / "make.log").read_text().splitlines()) == 1
    # Another environment for make (flags it would read): make runs (incrementally).
    r = qemubox("kernel", "build", "--source", src, "-o", tmp_path / "out", env={"KCFLAGS": "-g"})
    assert r.code == 0 and "built:" in r.err
    assert len((tmp_path / "make.log").read_text().splitlines()) == 2


@pytest.mark.kernel
def test_ctrl_c_stops_make_and_keeps_the_build_dir(private_cache, tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys
    import time

    stall = tmp_path / "compiling"
    monkeypatch.setenv("STALL", str(stall))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qemubox", "kernel", "build", "-o", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=as_at_a_terminal,
    )
    deadline = time.monotonic() + 300
    while not stall.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "build interrupted" in err and "Traceback" not in err
    assert "got-sigint" in (tmp_path / "make.log").read_text()
    build_dirs = [
        d
        for d in (tmp_path / "cache" / "kernel-build").iterdir()
        if d.is_dir() and not d.name.endswith("-kconfig")
    ]
    assert len(build_dirs) == 1
    assert (build_dirs[0] / ".config").is_file()
    assert not (build_dirs[0] / ".qemubox-build.json").exists()
    assert not (tmp_path / "out").exists()
    # The next build continues in the same directory.
    monkeypatch.delenv("STALL")
    r = qemubox("kernel", "build", "-o", tmp_path / "out")
    assert r.code == 0, r.err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["work_dir"] == str(build_dirs[0])
    assert build_dirs[0].name.endswith("-x86_64-minimal")


def test_git_fingerprint_follows_changes(tmp_path):
    import subprocess

    from qemubox.kernel.build import _git_fingerprint

    assert _git_fingerprint(tmp_path) is None
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.c").write_text("int a;\n")
    subprocess.run([*git, "add", "a.c"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    first = _git_fingerprint(tmp_path)
    assert first and _git_fingerprint(tmp_path) == first
    (tmp_path / "a.c").write_text("int b;\n")
    changed = _git_fingerprint(tmp_path)
    assert changed != first
    # An untracked file counts by its content; an ignored one not at all.
    (tmp_path / ".gitignore").write_text("*.o\n")
    (tmp_path / "new.c").write_text("int c;\n")
    untracked = _git_fingerprint(tmp_path)
    assert untracked not in (first, changed)
    (tmp_path / "new.c").write_text("int d;\n")
    assert _git_fingerprint(tmp_path) != untracked
    (tmp_path / "new.o").write_text("object")
    again = _git_fingerprint(tmp_path)
    assert again == _git_fingerprint(tmp_path)
    (tmp_path / "new.o").write_text("another object")
    assert _git_fingerprint(tmp_path) == again
    # A content committed, reverted and committed again is the content it was.
    (tmp_path / "a.c").write_text("int a;\n")
    for name in ("new.c", "new.o", ".gitignore"):
        (tmp_path / name).unlink()
    assert _git_fingerprint(tmp_path) == first
    subprocess.run([*git, "commit", "-qam", "same again", "--allow-empty"], check=True)
    assert _git_fingerprint(tmp_path) == first


def test_a_git_trees_builds_are_kept_per_content_and_the_oldest_pruned(tmp_path):
    from qemubox.kernel.build import KEEP_VERSIONS, _prune_versions

    stem = "dir-abc-x86_64-0123456789abcdef-"
    for i in range(KEEP_VERSIONS + 3):
        d = tmp_path / f"{stem}{i:012x}"
        d.mkdir()
        os.utime(d, (1000 + i, 1000 + i))
    other = tmp_path / "dir-abc-x86_64-fedcba9876543210-000000000000"
    other.mkdir()
    newest = tmp_path / f"{stem}{KEEP_VERSIONS + 2:012x}"
    _prune_versions(tmp_path, stem, newest)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert len(kept) == KEEP_VERSIONS + 1 and other.name in kept and newest.name in kept
    assert f"{stem}{0:012x}" not in kept


def test_the_kconfig_digest_follows_kconfig_files_and_base_configs_only(tmp_path):
    import os

    from qemubox.kernel.build import scan_tree

    for rel, text in {
        "Kconfig": 'source "drivers/Kconfig"\n',
        "drivers/Kconfig": "config A\n\tbool\n",
        "drivers/a.c": "int a;\n",
        "arch/x86/configs/tiny.config": "CONFIG_X=y\n",
        "scripts/kconfig/conf.c": "int main;\n",
        ".git/Kconfig": "ignored\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    before = scan_tree(tmp_path).kconfig
    (tmp_path / "drivers/a.c").write_text("int a = 1;\n")  # source: not configuration
    (tmp_path / ".git/Kconfig").write_text("still ignored\n")
    assert scan_tree(tmp_path).kconfig == before
    for rel in ("drivers/Kconfig", "arch/x86/configs/tiny.config", "scripts/kconfig/conf.c"):
        path = tmp_path / rel
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        assert scan_tree(tmp_path).kconfig != before, rel
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    (tmp_path / "drivers/Kconfig.debug").write_text("config B\n\tbool\n")  # a new one
    assert scan_tree(tmp_path).kconfig != before


def test_the_tree_state_follows_every_change(tmp_path):
    import os
    import time

    from qemubox.kernel.build import scan_tree

    for rel in ("Makefile", "init/main.c", "drivers/a/a.c"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.c"
    outside.write_text("x\n")
    before = scan_tree(tmp_path).state
    assert scan_tree(tmp_path).state == before
    old = time.time() - 86400
    changes = (
        lambda: (tmp_path / "init/main.c").write_text("y\n"),  # an edit
        lambda: os.utime(tmp_path / "init/main.c", (old, old)),  # made to look old
        lambda: (tmp_path / "drivers/a/b.c").write_text("new\n"),  # a new file
        lambda: (tmp_path / "drivers/a/a.c").unlink(),  # a removed one
        lambda: (tmp_path / "init/main.c").rename(tmp_path / "init/init.c"),  # renamed
        lambda: (tmp_path / "init/link.c").symlink_to(outside),  # a link to a file elsewhere
        lambda: outside.write_text("edited\n"),  # ... edited there
    )
    for change in changes:
        time.sleep(0.01)  # change times are the clock's, at its resolution
        change()
        after = scan_tree(tmp_path).state
        assert after != before
        before = after
