"""Root images without a VM: apt sources, recipes, image names, the plans and command lines
of disk and host roots, the read-only view virtiofsd serves, and the build's refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import qemubox
from qemubox.errors import InputError
from qemubox.image import catalog, debian, recipe, sources
from qemubox.model.plan import ROOT_ID, MachinePlan, RootPlan, make_plan
from qemubox.qemu import cmdline as qemu
from qemubox.qemu import virtiofs
from qemubox.sandbox.spec import Session

DEB822 = """\
Types: deb deb-src
# a comment
URIs: http://mirror.example/debian
 http://second.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://off.example/debian
Suites: trixie
Components: main
"""


def test_deb822_sources():
    found = sources.parse_deb822(DEB822)
    assert [s.uri for s in found] == [
        "http://mirror.example/debian",
        "http://second.example/debian",
        "http://security.example/debian-security",
    ]
    assert sources.choose(found, "bookworm") == "http://mirror.example/debian"
    assert sources.choose(found, "trixie") is None  # its only source is disabled


def test_one_line_sources():
    text = (
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://opts.example/debian bookworm main\n"
        "deb http://plain.example/debian bullseye main non-free\n"
    )
    found = sources.parse_list(text)
    assert sources.choose(found, "bookworm") == "http://opts.example/debian"
    assert sources.choose(found, "bullseye") == "http://plain.example/debian"


def test_the_mirror_comes_from_the_apt_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    with pytest.raises(InputError, match=r"no Debian mirror for bookworm.*--mirror URL"):
        sources.mirror("bookworm", tmp_path)
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert sources.mirror("bookworm", tmp_path) == "http://mirror.example/debian"


def test_recipes_are_keyed_by_what_they_hold():
    base = recipe.debian("amd64")
    assert base.packages == ("ca-certificates", "python3")
    more = base.with_packages(("jq", "make", "jq"))
    assert more.packages == ("ca-certificates", "jq", "make", "python3")
    assert more.key() != base.key() and len(base.key()) == 16
    assert base.with_packages(("python3",)).key() == base.key()  # same inputs, same image
    assert recipe.Recipe.from_dict(more.to_dict()) == more
    assert recipe.debian("arm64").key() != base.key()


def test_package_names():
    assert recipe.parse_packages("make, jq  g++") == ("g++", "jq", "make")
    for bad in ("Make", "a", "jq;rm", "-x"):
        with pytest.raises(InputError, match="invalid package name"):
            recipe.parse_packages(bad)


def test_image_names_and_files(tmp_path, monkeypatch):
    monkeypatch.setenv("QEMUBOX_STATE_DIR", str(tmp_path / "state"))
    assert catalog.check("minimal") == ("minimal", "initramfs")
    assert catalog.check("host") == ("host", "share")
    assert catalog.check("debian") == ("debian", "disk")
    with pytest.raises(InputError, match="unknown image 'nope': minimal, host, debian"):
        catalog.check("nope")
    with pytest.raises(InputError, match="invalid image name"):
        catalog.check("-x")
    with pytest.raises(InputError, match="no such file"):
        catalog.check(str(tmp_path / "missing.img"))
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(InputError, match="neither an ext4 image nor a qcow2 file"):
        catalog.check(str(junk))
    ext4 = tmp_path / "root.img"
    subprocess.run(["mkfs.ext4", "-q", str(ext4), "8M"], check=True)
    assert catalog.check(str(ext4)) == (str(ext4), "disk")
    qcow = tmp_path / "root.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(ext4), str(qcow)], check=True)
    assert catalog.file_format(qcow) == "qcow2"
    monkeypatch.chdir(tmp_path)
    assert Session(image="./root.img").validate().image == str(ext4)


def plan_with(root: RootPlan, tmp_path) -> MachinePlan:
    from qemubox.model.plan import KernelPlan

    kernel = KernelPlan("/k", "6.12", "x86_64", None, None, "test", True)
    spec = Session().validate()
    return make_plan(spec, kernel, "tcg", "", str(tmp_path), "/i", None, None, root)


def option(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_a_disk_root_boots_its_overlay(tmp_path):
    root = RootPlan("disk", "debian", "/cache/root.img", "raw")
    plan = plan_with(root, tmp_path)
    assert plan.root.overlay == f"{tmp_path}/root.qcow2"  # with the machine, by default
    assert plan.append.endswith(f"qemubox.root=disk:{ROOT_ID}")
    args = qemu.qemu_args(plan)
    drives = option(args, "-drive")
    assert drives[0].startswith(f"file={tmp_path}/root.qcow2,if=none,id=root,format=qcow2,")
    assert f"virtio-blk-device,drive=root,serial={ROOT_ID}" in option(args, "-device")
    assert "/cache/root.img" not in " ".join(args)  # QEMU reads the base through the overlay
    assert MachinePlan.from_json(plan.to_json()) == plan
    kept = plan_with(RootPlan("disk", "x", "/b.img", "qcow2", "/state/box/root.qcow2"), tmp_path)
    assert kept.root.overlay == "/state/box/root.qcow2"


def test_a_host_root_is_a_read_only_export(tmp_path):
    plan = plan_with(RootPlan("share", "host", "/", fs="virtiofs"), tmp_path)
    assert plan.append.endswith(f"qemubox.root=virtiofs:{ROOT_ID}")
    assert plan.shared_memory  # virtiofsd maps guest RAM
    args = qemu.qemu_args(plan)
    assert f"vhost-user-fs-device,chardev=fs0,tag={ROOT_ID}" in option(args, "-device")
    ((command, _),) = virtiofs.virtiofsd_commands(plan)
    assert command[1:5] == ["-m", "qemubox.qemu.readonly", "/", f"{tmp_path}/ro0"]
    assert "announce_submounts" not in command  # overlayfs would not look into them
    ninep = plan_with(RootPlan("share", "host", "/", fs="9p"), tmp_path)
    assert ninep.append.endswith(f"qemubox.root=9p:{ROOT_ID}")
    (fsdev,) = option(qemu.qemu_args(ninep), "-fsdev")
    assert fsdev.endswith("path=/,security_model=none,readonly=on,multidevs=remap")


def test_root_features_and_who_qemu_runs_as(monkeypatch):
    from qemubox.vm import prepare

    assert "disks" in Session(image="debian").validate().features()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    host = Session(image="host").validate()
    assert {"virtiofs", "overlay"} <= set(host.features())
    assert prepare._qemu_user(host) == "nobody"
    monkeypatch.setattr(os, "access", lambda *a: False)  # no virtiofsd: 9p, served by QEMU
    host = Session(image="host").validate()
    assert host.root_fs == "9p" and {"shares", "overlay"} <= set(host.features())
    assert prepare._qemu_user(host) is None  # reads the host's files as they are


def test_an_overlay_that_is_not_qcow2_is_refused(tmp_path):
    bad = tmp_path / "root.qcow2"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(InputError, match="exists and is not a qcow2 file"):
        Session(image="debian", overlay=str(bad)).validate()


def test_building_needs_root_and_this_architecture(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(InputError, match=r"needs root .* run this qemubox command as root"):
        debian.check_can_build(recipe.debian("amd64"))
    foreign = "arm64" if recipe.debian("amd64").arch == "amd64" else "amd64"
    with pytest.raises(InputError, match=f"cannot build a {foreign} image"):
        debian.check_can_build(recipe.debian(foreign))


def test_debootstrap_progress_words():
    describe = debian.debootstrap_progress()
    assert describe("I: Retrieving libc6 2.36-9\n") == "downloading libc6 (1 packages fetched)"
    assert describe("I: Configuring ca-certificates...\n") == (
        "configuring ca-certificates (1 packages fetched)"
    )
    assert describe("W: something else\n") is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--image", "nope", "--", "true"], "unknown image 'nope'"),
        (["run", "--image", "/no/such.img", "--", "true"], "image /no/such.img: no such file"),
        (["image", "build", "debian"], "'debian' is a built-in image"),
        (["image", "build", "x", "--packages", "Bad!"], "invalid package name 'Bad!'"),
        (["image", "build", "x", "--from", "host"], "--from host: images are built from debian"),
        (["image", "rm", "minimal"], "'minimal' is built in"),
        (["image", "rm", "nope"], "no image named 'nope'"),
    ],
)
def test_bad_image_input_is_one_line(args, message, tmp_path):
    r = qemubox(*args, env={"QEMUBOX_STATE_DIR": str(tmp_path)})
    assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err


def test_the_read_only_view_covers_mounts_under_it(tmp_path):
    """What virtiofsd serves for a read-only share: the directory and every mount under it,
    read-only, in a namespace of its own; the host's own view is untouched."""
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "t", str(top / "sub")], check=True)
    try:
        (top / "sub" / "x").write_text("seen\n")
        view = tmp_path / "view"
        script = 'cat "$1/sub/x"; touch "$1/a" 2>/dev/null || echo ro-top; '
        script += 'touch "$1/sub/b" 2>/dev/null || echo ro-sub'
        helper = [sys.executable, "-m", "qemubox.qemu.readonly", str(top), str(view)]
        out = subprocess.run(
            [*helper, "sh", "-c", script, "sh", str(view)], capture_output=True, text=True
        )
        assert out.stdout.split() == ["seen", "ro-top", "ro-sub"], out.stderr
        (top / "sub" / "still-writable").write_text("")  # here, it is as it was
        assert not os.path.ismount(view)
    finally:
        subprocess.run(["umount", str(top / "sub")], check=True)
    assert Path(view).is_dir()
