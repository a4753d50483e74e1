"""Option parsing of `qemubox run`: pure functions, and the command line's one-line errors
(no kernel, no VM: validation comes before anything is looked up)."""

from __future__ import annotations

import pytest

from helpers import qemubox
from qemubox.errors import Exit, InputError, KernelPanic, printable
from qemubox.sandbox import notation as parse
from qemubox.sandbox.spec import Disk, FSShare
from qemubox.service.session import cpus


@pytest.mark.parametrize(
    ("spec", "share"),
    [
        ("/src:/mnt", FSShare("/src", "/mnt")),
        ("/src:/mnt:ro", FSShare("/src", "/mnt", read_only=True)),
        ("/a:b:/mnt:rw", FSShare("/a:b", "/mnt")),
        ("/srv/src", FSShare("/srv/src", "/srv/src")),  # at the same path
        ("/srv/src:ro", FSShare("/srv/src", "/srv/src", read_only=True)),
    ],
)
def test_volume(spec, share):
    assert parse.volume(spec) == share


def test_volume_alone_is_at_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse.volume("sub") == FSShare("sub", f"{tmp_path}/sub")


def test_share_and_disk_and_publish():
    assert parse.share("/h:tag:/g:ro") == FSShare("/h", "/g", "tag", True)
    assert parse.disk("1G:/data") == Disk("1G", "/data", None)
    assert parse.disk("1G:/data:/var/x.img") == Disk("1G", "/data", "/var/x.img")
    assert parse.publish("8080:80") == (8080, 80)


def test_env_takes_unset_keys_from_the_host():
    assert parse.env(["A=1", "B", "C", "D=x=y"], {"B": "2"}) == {"A": "1", "B": "2", "D": "x=y"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: parse.volume("/tmp:x"), "expected HOST:GUEST"),
        (lambda: parse.share("/tmp:/mnt"), "expected HOST:TAG:GUEST"),
        (lambda: parse.disk("1G"), "expected SIZE:GUEST"),
        (lambda: parse.publish("80"), "expected HOST_PORT:GUEST_PORT"),
        (lambda: parse.env(["=1"], {}), "expected KEY=VALUE"),
        (lambda: parse.seconds("inf", "--timeout"), "finite"),
        (lambda: parse.seconds("0", "--timeout"), "positive"),
        (lambda: parse.seconds("soon", "--timeout"), "a number of seconds"),
        (lambda: cpus("65"), "from 1 to 64"),
        (lambda: cpus("two"), "from 1 to 64"),
        (lambda: parse.workdir("tmp"), "absolute guest path"),
    ],
)
def test_bad_values(call, message):
    with pytest.raises(InputError, match=message):
        call()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-v", "relative:/mnt"], "share host path is not a directory: relative"),
        (["-v", "/tmp:rel"], "expected HOST:GUEST"),
        (["--share", "/tmp:/mnt"], "expected HOST:TAG:GUEST"),
        (["--disk", "lots:/d"], "invalid disk size"),
        (["--disk", "1B:/d"], "disk size '1B' is too small"),
        (["-p", "80"], "expected HOST_PORT:GUEST_PORT"),
        (["-p", "8080:80"], "need a network"),
        (["-m", "tiny"], "invalid memory"),
        (["-c", "0"], "--cpus '0': expected a whole number"),
        (["--timeout", "nan"], "positive, finite number"),
        (["--timeout", "inf"], "positive, finite number"),
        (["--timeout", "-1"], "positive, finite number"),
        (["-w", "tmp"], "absolute guest path"),
        (["--kernel", "/no/such/vmlinuz"], "--kernel /no/such/vmlinuz: no such file"),
    ],
)
def test_cli_bad_input_is_one_line(args, message):
    r = qemubox("run", "--kernel", "/no/such/vmlinuz", *args, "--", "true")
    assert r.code == 2 and message in r.err, r.err
    assert r.err.count("\n") == 1, r.err


def test_errors_carry_their_exit_status_and_details():
    err = KernelPanic("Kernel panic - not syncing: x", "the console's tail")
    assert err.exit_code == Exit.PANIC == 122
    assert err.details == {
        "error": "KernelPanic",
        "message": "Kernel panic - not syncing: x",
        "exit_code": 122,
        "console_tail": "the console's tail",
        "vmcore": None,
    }
    saved = {"path": "/tmp/core", "bytes": 1 << 28, "seconds": 1.5}
    assert KernelPanic("x", "", vmcore=saved).details["vmcore"] == saved
    assert InputError("bad").details["exit_code"] == Exit.INPUT


def test_printable_shows_control_characters():
    assert printable("a\x1b[31mb\tc\nd\x9b\x07") == "a\\x1b[31mb\tc\nd\\x9b\\x07"
    assert printable(printable("\x1b")) == "\\x1b"


def test_each_command_is_found_under_its_name_and_loaded_alone():
    import subprocess
    import sys

    from qemubox.cli import COMMANDS, cli

    for name in COMMANDS:
        assert cli.get_command(None, name).name == name
    # `run` imports no other command's module (each start pays for its own)
    code = "import sys; from qemubox.cli import cli; cli.get_command(None, 'run'); " + (
        "print(sorted(m for m in sys.modules if m.startswith('qemubox.cli.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.strip() == "['qemubox.cli.common', 'qemubox.cli.run', 'qemubox.cli.terminal']"
