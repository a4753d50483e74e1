"""A sandbox's own run state, and the guard every call that needs a guest goes through
(in the manner of ``qemu.qmp``'s ``Runstate`` and ``@require``): a call in the wrong state
is one clear error, never an ``AttributeError`` on a machine that is not there."""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

from qemubox.errors import SandboxError

F = TypeVar("F", bound=Callable[..., Any])


class Runstate(Enum):
    IDLE = "not started"  # made, its machine not launched yet
    STARTING = "starting"  # its machine launched, the guest not set up yet
    RUNNING = "running"  # the guest is ready for commands
    LEFT = "left"  # detached: the VM runs on without this client
    CLOSED = "closed"  # powered off, or failed to start


def require(*states: Runstate) -> Callable[[F], F]:
    """Only in ``states``: otherwise a SandboxError saying what the sandbox is."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            if self.runstate not in states:
                raise SandboxError(f"the sandbox is {self.runstate.value}: it is not running")
            return method(self, *args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate
