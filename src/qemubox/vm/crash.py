"""Saving a guest's memory as an ELF core that drgn and crash open (QEMU's
``dump-guest-memory``; the vmcoreinfo device puts the kernel's VMCOREINFO in it), and the
crash helper: started with a QEMU that holds a guest once it resets itself (a kernel panic:
``panic=-1`` and ``-no-reboot`` make it a shutdown, ``-action shutdown=pause`` holds it), it
saves the guest's memory where it is told, then ends QEMU.

Where the dump goes: the plan's ``vmcore`` (``run --vmcore``), or what a command wrote in the
machine's directory (``exec --vmcore``; :func:`set_target`). What happened is written there
too, for whoever reports the panic (:func:`outcome`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from qemubox.errors import SandboxError
from qemubox.model.plan import MachinePlan
from qemubox.paths import atomic_write

TARGET = "vmcore.target"  # the path a command wants a crash's dump at
OUTCOME = "vmcore.json"  # what the helper did: {"path", "bytes", "seconds"} or {"error"}
_FD_NAME = "vmcore"
FOREVER = 10.0**9  # seconds: the helper waits as long as its QEMU runs


def save(monitor, path: str | Path) -> dict:
    """Dump the guest's memory to ``path`` (an ELF core; the guest is stopped meanwhile, and
    runs on after unless it had stopped): written beside it first, put in place whole.
    Returns what was saved: ``path``, ``bytes``, ``seconds``."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    began = time.monotonic()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            monitor.send_fd(_FD_NAME, fd)
        finally:
            os.close(fd)
        monitor.command("dump-guest-memory", paging=False, protocol=f"fd:{_FD_NAME}")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    size = path.stat().st_size
    return {"path": str(path), "bytes": size, "seconds": round(time.monotonic() - began, 3)}


def set_target(runtime_dir: str | Path, path: str | Path | None) -> None:
    """Where a crash's dump goes from now on (None: where the plan says)."""
    target = Path(runtime_dir) / TARGET
    if path is None:
        target.unlink(missing_ok=True)
    else:
        atomic_write(target, str(Path(path).absolute()) + "\n", 0o600)


def _target(runtime_dir: Path, default: str) -> str:
    with contextlib.suppress(OSError):
        return (runtime_dir / TARGET).read_text().strip() or default
    return default


def outcome(runtime_dir: str | Path) -> dict | None:
    """What the crash helper did with a guest that reset itself, if it did anything."""
    with contextlib.suppress(OSError, ValueError):
        found = json.loads((Path(runtime_dir) / OUTCOME).read_text())
        return found if isinstance(found, dict) else None
    return None


def describe(found: dict | None) -> str:
    """A clause for an error message: where the memory went, or why it did not."""
    if not found:
        return ""
    if "error" in found:
        return f"; its memory could not be saved: {found['error']}"
    mib = found["bytes"] / (1 << 20)
    return f"; its memory is saved in {found['path']} ({mib:.0f} MiB, {found['seconds']:.1f} s)"


def helper(plan: MachinePlan) -> tuple[tuple[str, ...], str] | None:
    """The crash helper, as a keeper's helper (command, the socket it makes)."""
    if not plan.crash_dumps:
        return None
    socket = plan.crash_monitor
    command = (sys.executable, "-m", "qemubox.vm.crash", plan.runtime_dir, socket, plan.vmcore)
    return command, socket


def serve(runtime_dir: Path, socket_path: str, default: str) -> None:
    """Wait for QEMU; at its first shutdown, save a guest that reset itself where told,
    and end QEMU."""
    from qemubox.qemu.qmp import Monitor

    monitor = Monitor.listen(socket_path)
    try:
        monitor.accept(None)
    except Exception:  # QEMU ended as it started: nothing to save, nothing to say
        return
    event = monitor.wait_event({"SHUTDOWN"}, FOREVER)
    if event is None:  # QEMU ended otherwise
        return
    data = event.get("data", {})
    target = _target(runtime_dir, default)
    if data.get("guest") and data.get("reason") in ("guest-reset", "guest-panic") and target:
        try:
            found = save(monitor, target)
        except (SandboxError, OSError) as err:
            found = {"error": str(err)}
        atomic_write(runtime_dir / OUTCOME, json.dumps(found) + "\n", 0o600)
    with contextlib.suppress(Exception):
        monitor.command("quit")


if __name__ == "__main__":
    # python -m qemubox.vm.crash RUNTIME_DIR SOCKET [DEFAULT_TARGET]
    serve(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
