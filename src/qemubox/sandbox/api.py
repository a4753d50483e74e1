"""``qemubox.Sandbox``: the sandbox of ``sandbox.py`` with the named sandboxes of
``named.py`` on the same face — ``Sandbox.create("web")``, ``Sandbox.list()``,
``Sandbox.attach("web")``, ``sb.stop()``, ``sb.remove()``."""

from __future__ import annotations

from qemubox.errors import SandboxError
from qemubox.sandbox import named
from qemubox.sandbox import sandbox as core
from qemubox.sandbox.spec import Session


class Sandbox(core.Sandbox):
    __doc__ = core.Sandbox.__doc__

    @classmethod
    def create(cls, name: str, session: Session | None = None, ttl: float | None = None):
        """Make the named sandbox ``name`` and start it; it lives on after this process
        (:meth:`detach` to leave it, :meth:`stop` to power it off, :meth:`remove` to
        delete it). ``ttl``: stop it after that many seconds with no client."""
        return named.create(name, session or Session(), ttl, cls)

    @staticmethod
    def list() -> list[named.Status]:
        """The named sandboxes, as :class:`qemubox.sandbox.named.Status` records."""
        return named.list_all()

    @classmethod
    def attach(cls, name: str, timeout: float = 10):
        """A sandbox left running: a named sandbox's name, or the id :meth:`detach`
        returned."""
        if named.exists(name):
            return named.attach(name, timeout, cls)
        return cls.attach_machine(name, timeout)

    def stop(self, timeout: float = named.STOP_TIMEOUT) -> None:
        """Power a named sandbox off (it can be started again); any other sandbox is
        closed."""
        if self.name is None:
            self.close()
            return
        self.leave()
        named.stop(self.name, timeout)

    def remove(self, force: bool = False) -> None:
        """Delete a named sandbox: stopped first, or killed with ``force``."""
        if self.name is None:
            raise SandboxError("only a named sandbox can be removed")
        self.leave()
        if not force:
            named.stop(self.name)
        named.remove(self.name, force)
