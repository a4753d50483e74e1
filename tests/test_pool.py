"""Warm pools, for real: machines restored ahead and waiting stopped, taken by starts of the
same session, replaced, independent of each other, ended by their ttl or by ``stop``."""

from __future__ import annotations

import json
import time
import warnings

import pytest

from helpers import assert_clock_is_now, qemubox, wait_for
from qemubox import Pool, Sandbox, Session
from qemubox.vm import pool

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]


def running(machine_ids: set[str]) -> set[str]:
    """Those of the machines that still run."""
    from qemubox.errors import InputError
    from qemubox.model.state import State
    from qemubox.vm.machine import Machine

    up = set()
    for machine_id in machine_ids:
        try:
            if Machine.open(machine_id).state is State.RUNNING:
                up.add(machine_id)
        except InputError:  # its directory is gone with it
            pass
    return up


CLONE = "cat /proc/sys/kernel/random/uuid; date +%s"


def test_a_pool_serves_starts_and_refills(kernel):
    warnings.simplefilter("ignore")
    session = Session(memory="192M", kernel=kernel)  # a size of its own: a pool of its own
    seen: set[str] = set()
    with Pool(session, size=2) as warm:
        assert warm.waiting() == 2
        seen |= set(pool.waiting(warm.plan.snapshot.key))
        time.sleep(2)  # the members' clocks stand still while they wait
        first = warm.sandbox()
        try:
            phases = [name for name, _ in first.timings]
            assert "taken from the pool" in phases and "restore" not in phases  # done ahead
            first.exec(["sh", "-c", "echo mine > /tmp/x"])
            mine = assert_clock_is_now(first, CLONE)
            second = warm.sandbox()  # the other member
            with second:
                assert "taken from the pool" in [name for name, _ in second.timings]
                r = second.exec(["sh", "-c", "test -e /tmp/x && echo seen; echo ok"])
                assert r.stdout == b"ok\n"
                theirs = assert_clock_is_now(second, CLONE)
            # Members wait stopped, warmed up, for as long as it takes: each taker renews
            # its clock and randomness before anything of its own runs.
            assert mine[0] != theirs[0]
        finally:
            first.close()
        assert wait_for(lambda: warm.waiting() == 2)  # each start put another in its place
        seen |= set(pool.waiting(warm.plan.snapshot.key))
        with Sandbox(session) as third:  # any start of the session takes from it
            assert "taken from the pool" in [name for name, _ in third.timings]
            assert third.exec(["echo", "hi"]).stdout == b"hi\n"
        key = warm.plan.snapshot.key
    assert warm.waiting() == 0
    seen |= set(pool.waiting(key))  # the third's replacement, had it come late
    names = {"first": first.id, "second": second.id, "third": third.id}
    assert wait_for(lambda: not running(seen)), (running(seen), names)  # nothing left


def test_the_command_line(kernel):
    args = ("--kernel", kernel, "-m", "160M")
    r = qemubox("pool", "start", *args, "--size", "1", "--ttl", "3s")
    assert r.code == 0, r.err
    key = r.out.strip()
    (found,) = [p for p in json.loads(qemubox("pool", "ls", "--json").out) if p["key"] == key]
    assert found["size"] == 1 and len(found["waiting"]) == 1
    r = qemubox("run", *args, "--timings", "--", "echo", "hi")
    assert r.code == 0 and r.out == "hi\n" and "taken from the pool" in r.err, r.err
    # Its replacement, unused, ends after its ttl.
    assert wait_for(lambda: len(pool.waiting(key)) == 1)
    assert wait_for(lambda: len(pool.waiting(key)) == 0, timeout=30)
    r = qemubox("pool", "start", *args, "--size", "1")
    assert r.code == 0 and r.out.strip() == key
    table = qemubox("pool", "ls").out.splitlines()
    assert table[0].split() == ["KEY", "SIZE", "WAITING"] and f"{key}  1     1" in table
    r = qemubox("pool", "stop", key)
    assert r.code == 0 and "stopped 1 waiting machine" in r.err
    assert key not in pool.pools()
    assert qemubox("pool", "start", *args, "--size", "1").code == 0
    r = qemubox("pool", "stop", "--all")
    assert r.code == 0 and "stopped 1 waiting machine" in r.err and not pool.pools()


@pytest.mark.parametrize(
    "args, words",
    [
        (("--size", "0"), "--size: at least 1"),
        (("--ttl", "soon"), "--ttl"),
        (("--no-snapshot",), "started from a snapshot"),
        (("--balloon",), "cannot be pooled: a balloon"),
        (("-v", "/tmp:/mnt"), "cannot be pooled: it has shares"),
    ],
)
def test_bad_pools_are_one_line(kernel, args, words):
    r = qemubox("pool", "start", "--kernel", kernel, "-m", "160M", *args)
    errors = [line for line in r.err.splitlines() if "warning: using TCG" not in line]
    assert r.code == 2 and len(errors) == 1 and words in errors[0], r.err


def test_stopping_an_unknown_pool(kernel):
    r = qemubox("pool", "stop", "nope")
    assert r.code == 2 and "no pool 'nope'" in r.err
    r = qemubox("pool", "stop")
    assert r.code == 2 and "give KEYs or --all" in r.err


def test_a_pool_of_nothing_is_refused():
    from qemubox.errors import InputError

    with pytest.raises(InputError, match="size and a ttl of at least 1"):
        Pool(Session(), size=0)
    with pytest.raises(InputError, match="started from a snapshot"):
        Pool(Session(snapshot=False)).start()


def test_a_member_that_cannot_be_restored_is_one_error_and_ends(kernel):
    """A member whose snapshot no longer loads (its state damaged since the pool started)
    is one SandboxError saying why; its QEMU ends with it and the pool stays empty."""
    from qemubox.errors import SandboxError
    from qemubox.vm import snapshot

    warnings.simplefilter("ignore")
    with Pool(Session(memory="176M", kernel=kernel), size=1) as warm:  # a pool of its own
        plan = warm.plan
        key = plan.snapshot.key
        pool.drain(key)
    try:
        with open(plan.snapshot.state, "r+b") as fh:
            fh.truncate(100)
        before = set(running_machines())
        with pytest.raises(SandboxError, match=r"^a pool member did not start: restoring snapshot"):
            pool.fill(plan, 1)
        assert pool.waiting(key) == []
        assert wait_for(lambda: not running(set(running_machines()) - before))
    finally:
        pool.drain(key)
        snapshot.remove(key)


def running_machines() -> list[str]:
    """The ids of every machine running here."""
    from qemubox import paths

    root = paths.runtime_root()
    return [d.name for d in root.iterdir() if paths.is_machine_id(d.name)] if root.is_dir() else []
