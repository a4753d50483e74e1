"""The service layer as data: actions checked when made, one table carrying them out, the
session options every door shares, and what an error means to a user. Pure (no VM)."""

from __future__ import annotations

import dataclasses

import pytest

from helpers import qemubox
from qemubox.errors import Exit, InputError, KernelPanic, ToolError
from qemubox.model.phase import Phase, Timing, totals
from qemubox.model.size import whole_mib
from qemubox.model.state import State
from qemubox.service import actions
from qemubox.service.command import CommandRequest
from qemubox.service.outcome import of_error
from qemubox.service.session import SessionRequest

TRUE = CommandRequest(("true",))


def test_every_action_is_in_the_one_table():
    defined = {
        obj
        for obj in vars(actions).values()
        if isinstance(obj, type)
        and dataclasses.is_dataclass(obj)
        and obj.__module__ == actions.__name__
        and obj is not actions.RunResult
    }
    assert defined == set(actions.ACTIONS)
    assert all(dataclasses.fields(a) is not None for a in defined)


def test_an_unknown_action_is_refused_in_one_line():
    with pytest.raises(InputError, match="not an action qemubox offers: dict"):
        actions.perform({})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"detach": True}, "-d, --rm and --ttl go with --name"),
        ({"remove": True}, "-d, --rm and --ttl go with --name"),
        ({"ttl": 5.0}, "-d, --rm and --ttl go with --name"),
        ({"name": "a", "detach": True, "remove": True}, "-d goes with neither --rm nor -i"),
        ({"name": "a", "console_log": "/tmp/c"}, "--console-log goes without --name"),
    ],
)
def test_a_run_is_checked_when_it_is_made(kw, message):
    with pytest.raises(InputError, match=message):
        actions.Run(TRUE, **kw)


def test_a_matrix_run_takes_jobs_or_a_scheduler():
    with pytest.raises(InputError, match="--jobs goes without --scheduler"):
        actions.RunMatrix(object(), jobs=2, scheduler="tcp://127.0.0.1:1")


def test_session_options_are_taken_out_and_become_a_session(tmp_path):
    options = {
        "memory": "256M",
        "cpus": "2",
        "volumes": [f"{tmp_path}:/mnt:ro"],
        "share_fs": "9p",
        "publish": ["0:80"],
        "net": "restricted",
        "other": 1,
    }
    request = SessionRequest.take(options)
    assert options == {"other": 1}
    session = request.session(timeout=5)
    assert (session.memory, session.cpus, session.network, session.timeout) == (
        "256M",
        2,
        "restricted",
        5,
    )
    assert session.shares[0].read_only and session.shares[0].mount_point == "/mnt"
    assert session.ports == [(0, 80)]
    assert SessionRequest().session().validate().memory == 512 << 20


def test_bad_session_options_are_one_line():
    with pytest.raises(InputError, match="--cpus 'x': expected a whole number from 1 to 64"):
        SessionRequest(cpus="x").session()
    with pytest.raises(InputError, match="--boot-timeout '-1'"):
        SessionRequest(boot_timeout="-1").session()


def test_memory_must_be_whole_mib():
    assert whole_mib("65536K", "memory") == 64 << 20
    with pytest.raises(
        InputError, match=r"memory '65537K' is not a whole number of MiB \(try 65M\)"
    ):
        whole_mib("65537K", "memory")
    r = qemubox("run", "-m", "65537K", "--dry-run", "--", "true")
    assert r.code == Exit.INPUT and "65537K" in r.err and "Traceback" not in r.err


def test_what_an_error_means():
    panic = of_error(KernelPanic("the guest kernel panicked", "Kernel panic - not syncing"))
    assert panic.exit_code == Exit.PANIC and "Kernel panic" in panic.lines[0]
    assert of_error(InputError("bad")).exit_code == Exit.INPUT
    tool = ToolError("make failed", "error: x")
    tool.show_tail = True
    assert of_error(tool).lines == ("error: x",)
    missing = of_error(FileNotFoundError(2, "No such file or directory", "/nope"))
    assert (missing.exit_code, missing.message) == (Exit.INPUT, "/nope: No such file or directory")
    assert of_error(ValueError("a bug")) is None  # the door says it is an internal error


def test_one_state_vocabulary():
    assert State("running").live and State.STARTING.live
    assert not any(State(s).live for s in ("stopped", "failed", "paused", "stopping"))
    assert State.RUNNING == "running"  # what records and JSON hold


def test_phases_add_up():
    timings = [Timing(Phase.RESTORE, 0.1), Timing(Phase.BOOT, 1.0), Timing(Phase.RESTORE, 0.2)]
    assert totals(timings) == {Phase.RESTORE: pytest.approx(0.3), Phase.BOOT: 1.0}


@pytest.mark.parametrize("group", ["kernel", "vm", "image", "snapshot", "pool", "kconfig"])
def test_every_listing_verb_is_ls_and_list_is_its_alias(group):
    ls = qemubox(group, "ls", "--help")
    alias = qemubox(group, "list", "--help")
    assert ls.code == 0 and alias.code == 0 and ls.out == alias.out


def test_a_sandbox_guards_every_call_by_its_run_state():
    from qemubox.errors import SandboxError
    from qemubox.sandbox.runstate import Runstate
    from qemubox.sandbox.sandbox import Sandbox

    box = Sandbox(memory="256M")
    assert box.runstate is Runstate.IDLE
    for call in (lambda: box.exec(["true"]), box.memory, lambda: box.set_memory("128M")):
        with pytest.raises(SandboxError, match="the sandbox is not started: it is not running"):
            call()
    box.close()
    assert box.runstate is Runstate.CLOSED
    with pytest.raises(SandboxError, match="the sandbox is closed"):
        box.read_file("/etc/hostname")
    with pytest.raises(SandboxError, match="this sandbox is closed: make another"):
        box.start()
