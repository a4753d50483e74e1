"""Root images, for real: Debian from debootstrap (commands, exit codes, shares, disks and
the network as on minimal; writes never reach the image), named sandboxes keeping their
root, images built with more packages, the host's root read-only, image files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import data_digest, qemubox
from qemubox import arch as arches
from qemubox.image import debian, recipe, sources

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]


@pytest.fixture(scope="session")
def debian_image() -> Path:
    """The debian image, built once per recipe (cached by content across runs)."""
    r = recipe.debian(arches.host().debian_arch)
    return debian.build(r, sources.mirror(r.suite), "building image debian")


def test_debian_runs_commands_as_minimal_does_and_its_image_never_changes(
    kernel, debian_image, tmp_path
):
    before = (data_digest(debian_image), debian_image.stat().st_mtime_ns)
    (tmp_path / "in.txt").write_text("from the host\n")
    r = qemubox(
        "run", "--kernel", kernel, "--image", "debian", "-v", f"{tmp_path}:/mnt/h",
        "--disk", "16M:/data", "--net", "restricted", "--",
        "sh", "-c",
        "python3 -c 'print(6 * 7)'; cat /mnt/h/in.txt; echo out > /mnt/h/out.txt; "
        "echo d > /data/d && cat /data/d; . /etc/os-release; echo $VERSION_CODENAME; "
        "python3 -c 'import socket; print(socket.gethostbyname(socket.gethostname()))'; "
        "echo written > /etc/marker; rm -rf /usr/share/doc; sync; exit 3",
    )  # fmt: skip
    assert r.code == 3, r.err
    assert r.out.split() == ["42", "from", "the", "host", "d", "bookworm", "127.0.0.1"]
    assert (tmp_path / "out.txt").read_text() == "out\n"
    r = qemubox(
        "run", "--kernel", kernel, "--image", "debian", "--", "sh", "-c",
        "test -e /etc/marker && echo marker; test -d /usr/share/doc && echo doc; "
        "ip -4 addr 2>/dev/null; /run/qemubox/busybox ip -4 addr show eth0 | grep -c inet",
    )  # fmt: skip
    assert r.out.split() == ["doc", "0"], r.err  # a fresh root; no network asked, none set
    assert (data_digest(debian_image), debian_image.stat().st_mtime_ns) == before


def test_a_named_debian_sandbox_keeps_its_root(kernel, debian_image, state, tmp_path):
    r = qemubox("create", "--kernel", kernel, "--image", "debian", "box")
    assert r.code == 0, r.err
    assert qemubox("exec", "box", "--", "sh", "-c", "echo kept > /root/f").code == 0
    (tmp_path / "up").write_text("sent\n")
    assert qemubox("cp", tmp_path / "up", "box:/root/up").code == 0
    assert qemubox("cp", "box:/root/f", tmp_path / "down").code == 0
    assert (tmp_path / "down").read_text() == "kept\n"
    (status,) = json.loads(qemubox("ls", "--json").out)
    assert status["image"] == "debian"
    assert qemubox("stop", "box").code == 0
    overlay = state / "sandboxes" / "box" / "root.qcow2"
    assert overlay.is_file()
    r = qemubox("image", "rm", "debian")
    assert r.code == 2 and "used by sandbox box" in r.err
    assert qemubox("start", "box").code == 0
    r = qemubox("exec", "box", "--", "cat", "/root/f", "/root/up")
    assert r.out == "kept\nsent\n", r.err
    assert qemubox("rm", "-f", "box").code == 0
    assert not overlay.exists() and debian_image.exists()


def test_an_image_built_with_more_packages(kernel, debian_image, state):
    r = qemubox("image", "build", "tools", "--packages", "jq")
    assert r.code == 0 and r.out == "tools: ca-certificates jq python3\n", r.err
    r = qemubox("run", "--kernel", kernel, "--image", "tools", "--", "jq", "-n", "1+1")
    assert (r.code, r.out) == (0, "2\n"), r.err
    (tools,) = [i for i in json.loads(qemubox("image", "ls", "--json").out) if i["name"] == "tools"]
    assert tools["built"] and "jq" in tools["packages"] and tools["bytes"] > 100 << 20
    # the same packages again, under another name: the build is found, not redone
    r = qemubox("image", "build", "tools2", "--from", "tools", "--packages", "jq")
    assert r.code == 0 and "building" not in r.err, r.err
    images = {i["name"]: i for i in json.loads(qemubox("image", "ls", "--json").out)}
    assert images["tools2"]["base"] == tools["base"] and images["tools2"]["built"] == tools["built"]
    assert qemubox("image", "rm", "tools").code == 0
    assert Path(tools["base"]).exists()  # tools2 still names it
    assert qemubox("image", "rm", "tools2").code == 0
    assert not Path(tools["base"]).exists()
    assert "tools" not in qemubox("image", "ls").out


def test_the_host_root_is_read_only_and_the_workdir_is_ours(kernel, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "hello.txt").write_text("from host\n")
    script = (
        "pwd; cat hello.txt; echo changed > hello.txt; cat hello.txt; "
        "touch /usr/qemubox-probe && echo wrote; python3 -c 'print(7)'"
    )
    r = qemubox("run", "--kernel", kernel, "--image", "host", "--", "sh", "-c", script, cwd=work)
    assert r.code == 0, r.err
    assert r.out.split() == [str(work), "from", "host", "changed", "wrote", "7"]
    assert (work / "hello.txt").read_text() == "from host\n"  # the guest wrote to memory
    assert not Path("/usr/qemubox-probe").exists()
    # -v DIR: the directory itself, writable, at the same path
    # -v DIR: the directory itself, writable, at the same path; the guest's own resolver
    r = qemubox(
        "run", "--kernel", kernel, "--image", "host", "-v", work, "--net", "restricted", "--",
        "sh", "-c", "echo kept > out.txt; cat /etc/resolv.conf", cwd=work,
    )  # fmt: skip
    assert (r.code, r.out) == (0, "nameserver 10.0.2.3\n"), r.err
    assert (work / "out.txt").read_text() == "kept\n"


def test_the_host_root_over_9p(kernel, tmp_path, monkeypatch):
    """Where virtiofsd cannot run (not root), the host root is shared over 9p."""
    from qemubox.sandbox import spec
    from qemubox.sandbox.sandbox import Sandbox

    monkeypatch.setattr(spec, "_root_fs", lambda: "9p")
    (tmp_path / "f").write_text("nine\n")
    with Sandbox(kernel=kernel, image="host") as box:
        assert box.plan.root.fs == "9p"
        r = box.exec(["sh", "-c", f"cat {tmp_path}/f; echo x > {tmp_path}/f; cat {tmp_path}/f"])
        assert r.stdout == b"nine\nx\n", r.stderr
    assert (tmp_path / "f").read_text() == "nine\n"


def test_an_image_file_is_never_written(kernel, tmp_path):
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    shutil.copy("/bin/busybox", tree / "bin" / "busybox")
    os.symlink("busybox", tree / "bin" / "sh")
    os.symlink("busybox", tree / "bin" / "cat")
    image = tmp_path / "root.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image), "32M"], check=True)
    before = data_digest(image)
    r = qemubox(
        "run", "--kernel", kernel, "--image", image, "--",
        "sh", "-c", "echo made > /etc/x; cat /etc/x",
    )  # fmt: skip
    assert (r.code, r.out) == (0, "made\n"), r.err
    assert data_digest(image) == before
    qcow = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", image, qcow], check=True)
    r = qemubox("run", "--kernel", kernel, "--image", qcow, "--", "sh", "-c", "cat /etc/x || :")
    assert r.code == 0 and "No such file" in r.err, r.err


def test_an_image_the_guest_cannot_mount_fails_the_boot_saying_why(kernel, tmp_path):
    bad = tmp_path / "bad.img"
    with open(bad, "wb") as fh:  # the ext4 magic, and nothing else of a file system
        fh.truncate(8 << 20)
        fh.seek(1024 + 0x38)
        fh.write(b"\x53\xef")
    r = qemubox("run", "--kernel", kernel, "--image", bad, "--", "true")
    assert r.code == 121, r.err
    assert "cannot set up the root" in r.err
