"""Where a sandbox's time goes, as typed events: every phase of a start, a command and a
teardown has one name here, which ``run --timings``, the matrix's per-cell timings and any
other reader share (a reader can rely on the set; a new phase is added here or nowhere)."""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class Phase(StrEnum):
    PREPARE = "prepare"  # plan, kernel, initramfs, disks: made or found in the cache
    QEMU_START = "QEMU start"
    POOL = "taken from the pool"  # a QEMU started ahead, restored already
    RESTORE = "restore"  # a snapshot's state loaded
    AGENT_READY = "agent ready"  # after a restore: the agent's first answer
    BOOT = "kernel boot to agent ready"
    RECORD = "record the snapshot"
    SETUP = "session setup"  # mounts and the network
    COMMAND = "command"
    TEARDOWN = "teardown"


class Timing(NamedTuple):
    """One phase, and the seconds it took."""

    phase: Phase
    seconds: float


def totals(timings: list[Timing]) -> dict[Phase, float]:
    """Seconds per phase; a phase met twice (a snapshot that could not be restored, then a
    boot) counts once with both times."""
    out: dict[Phase, float] = {}
    for phase, seconds in timings:
        out[phase] = out.get(phase, 0.0) + seconds
    return out
