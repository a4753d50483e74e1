"""The kconfig engine against real kernel sources (Debian's linux-source-6.12 and 6.1)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from helpers import qemubox
from qemubox.kernel.source import debian_source

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="session")
def src612():
    return debian_source("6.12")


@pytest.fixture(scope="session")
def src61():
    return debian_source("6.1")


@pytest.fixture(params=["6.12", "6.1"])
def src(request):
    return request.getfixturevalue("src612" if request.param == "6.12" else "src61")


def merge(src, build, *args, cwd=None):
    return qemubox("kconfig", "merge", *args, "--kernel-dir", src, "-O", build, cwd=cwd)


def test_sandbox_on_tinyconfig_verifies_clean(src, tmp_path):
    build = tmp_path / "build"
    r = merge(src, build, "sandbox", "--base", "tinyconfig")
    assert r.code == 0, r.out + r.err
    assert r.out == ""
    config = (build / ".config").read_text()
    for line in (
        "CONFIG_64BIT=y",
        "CONFIG_VIRTIO_MMIO=y",
        "CONFIG_9P_FS=y",
        "CONFIG_SMP=y",
        "CONFIG_VIRTIO_BALLOON=y",
        "CONFIG_EXT4_FS=y",
        "CONFIG_VIRTIO_FS=y",
    ):
        assert line + "\n" in config
    # The same .config checks clean without touching it.
    before = (build / ".config").stat().st_mtime_ns
    r = qemubox("kconfig", "check", "--config", build / ".config", "sandbox")
    assert r.code == 0, r.out
    assert (build / ".config").stat().st_mtime_ns == before


def test_sandbox_on_defconfig_and_without_base(src612, tmp_path):
    assert merge(src612, tmp_path / "d", "sandbox", "--base", "defconfig").code == 0
    # kconfig.py semantics: only the fragment's values, then olddefconfig.
    r = merge(src612, tmp_path / "n", "sandbox")
    assert r.code == 0, r.out + r.err


# What --explain says of each kind of option that does not stick, by the base config it is
# merged on. The cases of one base do not touch each other's options, so each base's are
# merged and explained at once (one olddefconfig and one Kconfig parse per kernel and base).
EXPLAINED = {
    "tinyconfig": [
        (
            "# CONFIG_PCI is not set\nCONFIG_VIRTIO_MENU=y\nCONFIG_VIRTIO_PCI=y\n",
            [
                "CONFIG_VIRTIO_PCI: wanted y, got n",
                "unmet dependency: depends on PCI && VIRTIO_MENU [PCI=n, VIRTIO_MENU=y], "
                "which is n",
            ],
        ),
        (
            "# CONFIG_DEBUG_KERNEL is not set\n",
            [
                "CONFIG_DEBUG_KERNEL: wanted n, got y",
                "forced by select from: EXPERT [EXPERT=y] = y",
            ],
        ),
        (
            "CONFIG_VIRTIO_BLOK=y\n",
            [
                "CONFIG_VIRTIO_BLOK: wanted y, got n",
                "does not exist in this kernel",
                "did you mean CONFIG_VIRTIO_BLK",
            ],
        ),
        (
            "CONFIG_VIRTIO=y\n",
            ["CONFIG_VIRTIO: wanted y, got n", "has no prompt", "only through select"],
        ),
    ],
    "defconfig": [
        ("CONFIG_PCI=m\n", ["CONFIG_PCI: wanted m, got ", "is a bool option: it cannot be m"]),
        (
            "CONFIG_PREEMPT=y\nCONFIG_PREEMPT_VOLUNTARY=y\n",
            [
                "CONFIG_PREEMPT: wanted y, got n",
                "lost the choice",
                "CONFIG_PREEMPT_VOLUNTARY was chosen",
            ],
        ),
        (
            "CONFIG_LOG_BUF_SHIFT=40\n",
            ["CONFIG_LOG_BUF_SHIFT: wanted 40, got", "outside its range 12..25"],
        ),
    ],
}


@pytest.mark.parametrize("base", sorted(EXPLAINED))
def test_explain(src, tmp_path, base):
    """depends, select, typo, no-prompt (on tinyconfig); bool-m, choice, range (defconfig)."""
    frag = tmp_path / "want.config"
    frag.write_text("".join(fragment for fragment, _ in EXPLAINED[base]))
    r = merge(src, tmp_path / "build", frag, "--base", base, "--explain")
    assert r.code == 1, r.out + r.err
    for _, expected in EXPLAINED[base]:
        for text in expected:
            assert text in r.out, r.out
    assert "Traceback" not in r.err
    # check --explain says the same about the same .config.
    c = qemubox(
        "kconfig",
        "check",
        "--config",
        tmp_path / "build" / ".config",
        frag,
        "--kernel-dir",
        src,
        "--explain",
    )
    assert c.code == 1
    assert c.out == r.out


@pytest.mark.parametrize(
    "fragments",
    [
        ["kernel/configs/kvm_guest.config"],
        ["kernel/configs/debug.config"],
        ["kernel/configs/nopm.config", "kernel/configs/x86_debug.config"],
        ["kernel/configs/hardening.config", "arch/x86/configs/hardening.config"],
    ],
    ids=lambda f: "+".join(os.path.basename(p) for p in f),
)
def test_base_tinyconfig_matches_merge_config_sh(src612, tmp_path, fragments):
    """--base tinyconfig gives the .config that merge_config.sh -m + olddefconfig gives."""
    ref = tmp_path / "ref"
    make = ["make", "-s", "-C", str(src612), f"O={ref}", "ARCH=x86_64"]
    subprocess.run([*make, "tinyconfig"], check=True, capture_output=True)
    paths = [str(src612 / f) for f in fragments]
    subprocess.run(
        ["bash", str(src612 / "scripts/kconfig/merge_config.sh"), "-m", ".config", *paths],
        cwd=ref,
        check=True,
        capture_output=True,
    )
    subprocess.run([*make, "olddefconfig"], check=True, capture_output=True)

    ours = tmp_path / "ours"
    r = merge(src612, ours, *paths, "--base", "tinyconfig")
    assert r.code in (0, 1), r.err  # some of these fragments do not stick on tinyconfig
    assert (ours / ".config").read_bytes() == (ref / ".config").read_bytes()


def test_previous_config_is_kept_and_unchanged_config_is_not_rewritten(src612, tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    mine = "# my hand-made config\nCONFIG_MINE=y\n"
    (build / ".config").write_text(mine)
    r = merge(src612, build, "sandbox", "--base", "tinyconfig")
    assert r.code == 0, r.err
    assert (build / ".config.old").read_text() == mine
    assert "the previous one is" in r.err
    stamp = (build / ".config").stat().st_mtime_ns
    r = merge(src612, build, "sandbox", "--base", "tinyconfig")
    assert r.code == 0
    assert "already up to date" in r.err
    assert (build / ".config").stat().st_mtime_ns == stamp
    assert (build / ".config.old").read_text() == mine
    assert sorted(p.name for p in build.glob(".config*")) == [".config", ".config.old"]


def test_failing_make_is_one_line(src612, tmp_path):
    r = merge(src612, tmp_path / "b", "sandbox", "--base", "nosuch_defconfig")
    assert r.code == 2
    assert r.err.count("\n") == 1
    assert "'make nosuch_defconfig' failed" in r.err


def test_base_target_that_reads_a_config_is_refused(src612, tmp_path):
    r = merge(src612, tmp_path / "b", "sandbox", "--base", "oldconfig")
    assert r.code == 2
    assert "from scratch" in r.err
    assert not (tmp_path / "b").exists()


def test_base_from_a_file(src612, tmp_path):
    first = tmp_path / "first"
    assert merge(src612, first, "sandbox", "--base", "tinyconfig").code == 0
    base = tmp_path / "base.config"
    shutil.copy(first / ".config", base)
    frag = tmp_path / "more.config"
    frag.write_text("CONFIG_PREEMPT=y\n")
    r = merge(src612, tmp_path / "second", frag, "--base", base)
    assert r.code == 0, r.out + r.err
    text = (tmp_path / "second" / ".config").read_text()
    assert "CONFIG_PREEMPT=y\n" in text and "CONFIG_9P_FS=y\n" in text


def test_in_tree_source_with_config_refuses_out_of_tree_build(src612, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("Kconfig", "Makefile"):
        shutil.copy(src612 / name, tree / name)
    (tree / "arch" / "x86").mkdir(parents=True)
    (tree / ".config").write_text("CONFIG_A=y\n")
    r = merge(tree, tmp_path / "out", "sandbox")
    assert r.code == 2
    assert "cannot be built out of tree" in r.err
