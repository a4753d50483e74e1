"""``Pool``: sandboxes started from QEMUs spawned ahead (see vm/pool.py)."""

from __future__ import annotations

from dataclasses import replace

from qemubox.errors import InputError, SandboxError
from qemubox.model.plan import MachinePlan
from qemubox.sandbox.api import Sandbox
from qemubox.sandbox.spec import Session
from qemubox.vm import pool, snapshot


class Pool:
    """Keeps ``size`` machines restored from the session's snapshot ahead, waiting
    stopped; a :meth:`sandbox` then starts in the time it takes to continue one. Any
    process's start of the same session takes from it too. Use as a context manager, or
    call start() and close() (which stops the machines still waiting)."""

    def __init__(
        self, session: Session | None = None, size: int = 2, ttl: int = pool.DEFAULT_TTL, **kw
    ) -> None:
        if size < 1 or ttl < 1:
            raise InputError(f"a pool needs a size and a ttl of at least 1, got {size}, {ttl}")
        self.session = session or Session(**kw)
        self.size, self.ttl = size, ttl
        self.plan: MachinePlan | None = None

    def __enter__(self) -> Pool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> Pool:
        """Make sure the session's snapshot exists (one start, recording it if need be),
        then fill the pool."""
        self.plan = restore_plan(self.session)
        pool.fill(self.plan, self.size, self.ttl)
        return self

    def sandbox(self) -> Sandbox:
        """A started sandbox of the session (from the pool while it has machines)."""
        return Sandbox(self.session).start()

    def waiting(self) -> int:
        return len(pool.waiting(self.plan.snapshot.key)) if self.plan else 0

    def close(self) -> None:
        if self.plan is not None:
            pool.drain(self.plan.snapshot.key)
            self.plan = None


def restore_plan(session: Session) -> MachinePlan:
    """The plan a start of ``session`` restores its snapshot with (recorded now by one
    start when there is none)."""
    if not session.snapshot:
        raise InputError("a pool is of sessions started from a snapshot (snapshot=True)")
    planned = Sandbox(session).make_plan(dry_run=True)  # what it is, before anything runs
    why = snapshot.unfit(planned) or pool.unpoolable(planned)
    if why:
        raise InputError(f"this session cannot be pooled: {why}")
    with Sandbox(session) as box:
        plan = box.plan
    found = snapshot.find(plan)
    if found is None:
        raise SandboxError("the session's snapshot could not be recorded (see the warning)")
    return replace(plan, snapshot=found)
