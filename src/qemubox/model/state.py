"""What a machine or a named sandbox is doing: one vocabulary for the runtime, the records,
``ls`` and every API. The values are the words records and JSON output hold."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    PAUSED = "paused"  # saved whole (RAM and devices) to a file, no QEMU

    @property
    def live(self) -> bool:
        """Whether a QEMU is (or is about to be) running it."""
        return self in (State.STARTING, State.RUNNING)
