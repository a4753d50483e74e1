"""The kconfig commands without a kernel tree: output, files kept, errors and exit codes."""

from __future__ import annotations

import pytest

from helpers import qemubox

SEED = {
    "file1.config": 'CONFIG_FOO=y\nCONFIG_BAR=m\n\ninclude "file3.config"\n\nCONFIG_BAZ=y\n',
    "file2.config": "CONFIG_QUX=m\n",
    "file3.config": "CONFIG_FOO=m\nCONFIG_BAZ=m\nCONFIG_QUX=y\n",
}


@pytest.fixture
def seed(tmp_path):
    for name, text in SEED.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_merge_to_stdout(seed):
    r = qemubox("kconfig", "merge", "file1.config", "file2.config", cwd=seed)
    assert r.code == 0, r.err
    assert r.out == "CONFIG_FOO=m\nCONFIG_BAR=m\nCONFIG_BAZ=y\nCONFIG_QUX=m\n"


def test_merge_from_stdin(seed):
    r = qemubox(
        "kconfig", "merge", "file2.config", "-", stdin="# CONFIG_QUX is not set\n", cwd=seed
    )
    assert r.code == 0
    assert r.out == "# CONFIG_QUX is not set\n"


def test_merge_output_file_keeps_the_previous_one(seed):
    out = seed / "out.config"
    out.write_text("CONFIG_MINE=y\n")
    r = qemubox("kconfig", "merge", "file2.config", "-o", "out.config", cwd=seed)
    assert r.code == 0
    assert out.read_text() == "CONFIG_QUX=m\n"
    assert (seed / "out.config.old").read_text() == "CONFIG_MINE=y\n"
    assert "out.config.old" in r.err
    # Writing the same text again changes nothing, and keeps the backup as it was.
    r = qemubox("kconfig", "merge", "file2.config", "-o", "out.config", cwd=seed)
    assert r.code == 0 and r.err == ""
    assert (seed / "out.config.old").read_text() == "CONFIG_MINE=y\n"


def test_merge_output_may_be_an_input(seed):
    r = qemubox("kconfig", "merge", "file2.config", "file3.config", "-o", "file2.config", cwd=seed)
    assert r.code == 0
    assert (seed / "file2.config").read_text() == "CONFIG_QUX=y\nCONFIG_FOO=m\nCONFIG_BAZ=m\n"
    assert (seed / "file2.config.old").read_text() == SEED["file2.config"]


def test_shipped_fragment_by_name():
    r = qemubox("kconfig", "merge", "sandbox")
    assert r.code == 0
    assert "CONFIG_9P_FS=y\n" in r.out
    assert "CONFIG_VIRTIO_BALLOON=y\n" in r.out
    assert "# CONFIG_DEBUG_INFO is not set\n" in r.out


def test_list_shows_the_shipped_fragments():
    r = qemubox("kconfig", "list")
    assert r.code == 0
    names = [line.split()[0] for line in r.out.splitlines()]
    arches = ["arm64", "armhf", "i386", "mips64el", "ppc64le", "riscv64", "s390x", "x86_64"]
    profiles = ["debug", "fastboot", "kunit", "sandbox", "small", "vm", "vmcore", "vmpy"]
    assert names == sorted([*arches, *profiles])
    assert all(len(line.split(None, 1)) == 2 for line in r.out.splitlines())


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["kconfig", "merge", "nope"], "", "no such fragment: nope"),
        (["kconfig", "merge", "-"], "CONFIG_A=maybe\n", "<stdin>:1: invalid value 'maybe'"),
        (["kconfig", "merge", "-"], 'include "x"\n', "<stdin>:1: include is not allowed"),
        (["kconfig", "merge", "bad.config"], "", "bad.config:2: unknown directive 'oops'"),
        (
            ["kconfig", "merge", "cyc.config"],
            "",
            "cyc.config:1: include cycle: cyc.config → cyc.config",
        ),
        (["kconfig", "merge", "file1.config", "--base", "tinyconfig"], "", "--base need(s)"),
        (
            ["kconfig", "merge", "file1.config", "--kernel-dir", "nowhere"],
            "",
            "kernel source directory does not exist: nowhere",
        ),
        (["kconfig", "merge", "file1.config", "--kernel-dir", "."], "", "not a kernel source tree"),
        (
            ["kconfig", "merge", "file1.config", "--kernel-version", "banana"],
            "",
            "kernel version must look like 6.12",
        ),
        (
            ["kconfig", "check", "--config", "file2.config", "file1.config", "--explain"],
            "",
            "--explain needs the kernel tree",
        ),
        (
            ["kconfig", "check", "--config", "missing", "file1.config"],
            "",
            "no such config file: missing",
        ),
        (["kconfig", "merge", "file1.config", "-o", "."], "", "is a directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(seed, args, stdin, message):
    (seed / "bad.config").write_text("CONFIG_A=y\noops\n")
    (seed / "cyc.config").write_text('include "cyc.config"\n')
    r = qemubox(*args, stdin=stdin, cwd=seed)
    assert r.code == 2
    assert r.err.count("\n") == 1, r.err
    assert message in r.err


def test_usage_errors_exit_2(seed):
    assert qemubox("kconfig", "merge", cwd=seed).code == 2
    assert qemubox("kconfig", "frob", cwd=seed).code == 2
    assert qemubox("kconfig", "check", "file1.config", cwd=seed).code == 2


def test_check_reports_mismatches_and_exits_1(seed):
    (seed / "dot.config").write_text("CONFIG_FOO=y\nCONFIG_BAR=m\n# CONFIG_BAZ is not set\n")
    frag = seed / "want.config"
    frag.write_text(
        "CONFIG_FOO=y\nCONFIG_BAR=y\nCONFIG_BAZ=n\nCONFIG_GONE=n\nCONFIG_NUM=5\n"
        "silent\nCONFIG_QUIET=y\n"
    )
    r = qemubox("kconfig", "check", "--config", "dot.config", "want.config", cwd=seed)
    assert r.code == 1
    assert r.out == "CONFIG_BAR: wanted y, got m\nCONFIG_NUM: wanted 5, got (not set)\n"
    assert "2 option(s) did not get their wanted values" in r.err
    assert (seed / "dot.config").read_text().startswith("CONFIG_FOO=y")


def test_check_clean(seed):
    (seed / "dot.config").write_text("CONFIG_QUX=m\nCONFIG_HEX=0x10\n")
    (seed / "want.config").write_text("CONFIG_QUX=m\nCONFIG_HEX=0x0010\n")
    r = qemubox("kconfig", "check", "--config", "dot.config", "want.config", cwd=seed)
    assert r.code == 0, r.out
    assert "all 2 verified options" in r.err


@pytest.mark.parametrize(
    "args",
    [[], ["kconfig"], ["kconfig", "merge"], ["kconfig", "check"], ["kconfig", "list"]],
)
def test_help_everywhere(args):
    r = qemubox(*args, "--help")
    assert r.code == 0
    assert "Usage: qemubox" in r.out


def test_version():
    r = qemubox("--version")
    assert r.code == 0
    assert r.out.startswith("qemubox, version ")
