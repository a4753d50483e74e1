"""A VM while it runs: its runtime record (pid, start time, ports), started detached or in
the foreground, asked over QMP to power off, killed when it will not."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from qemubox import paths
from qemubox.errors import InputError, KernelError, last_line
from qemubox.qemu import process
from qemubox.vmpy.layout import VmDir

START_SECONDS = 30.0  # for QEMU to open its monitor socket


@dataclass(frozen=True)
class Running:
    pid: int
    started: int | None
    record: dict


def running(vm: VmDir) -> Running | None:
    """The VM's QEMU, when it runs."""
    record = paths.read_json(vm.run_record)
    pid = record.get("pid")
    if isinstance(pid, int) and process.alive(pid, record.get("started")):
        return Running(pid, record.get("started"), record)
    return None


def must_run(vm: VmDir) -> Running:
    found = running(vm)
    if found is None:
        raise InputError(f"VM {vm.name!r} is not running (start it: qemubox vm run {vm.name} -d)")
    return found


def prepare_runtime(vm: VmDir) -> None:
    """A fresh runtime directory for a VM that does not run (whatever a dead QEMU left in
    it goes); an error when it runs."""
    found = running(vm)
    if found is not None:
        raise InputError(f"VM {vm.name!r} is already running (pid {found.pid})")
    shutil.rmtree(vm.runtime, ignore_errors=True)
    paths.make_private_dir(vm.runtime)


def record(vm: VmDir, pid: int, **facts: object) -> None:
    paths.write_json(vm.run_record, {"pid": pid, "started": process.start_time(pid), **facts})


def start_detached(vm: VmDir, args: list[str]) -> int:
    """Start QEMU in its own session, not tied to this terminal; returns once its monitor
    answers (or says why it could not start)."""
    log = vm.runtime / "qemu.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            why = last_line(log.read_text(errors="replace"), f"exit status {proc.returncode}")
            raise KernelError(f"QEMU could not start VM {vm.name!r}: {why}")
        if vm.qmp.exists():
            return proc.pid
        time.sleep(0.02)
    proc.kill()
    raise KernelError(f"QEMU did not open its monitor within {START_SECONDS:.0f} s")


def _monitor(vm: VmDir):
    from qemubox.qemu.qmp import Monitor

    return Monitor(str(vm.qmp))


def stop(vm: VmDir, timeout: float) -> str:
    """ACPI power-off, then a kill after ``timeout`` seconds; says which it took."""
    found = must_run(vm)
    asked = False
    with contextlib.suppress(Exception):  # no monitor (a foreign config): straight to kill
        mon = _monitor(vm)
        try:
            mon.command("system_powerdown")
            asked = True
        finally:
            mon.close()
    start = time.monotonic()
    if asked and process.wait_gone(found.pid, found.started, timeout):
        shutil.rmtree(vm.runtime, ignore_errors=True)
        return f"powered off in {time.monotonic() - start:.1f} s"
    kill(vm)
    return f"killed (no power-off within {timeout:g} s)" if asked else "killed"


def kill(vm: VmDir) -> None:
    found = running(vm)
    if found is not None:
        process.kill(found.pid, found.started)
        process.wait_gone(found.pid, found.started, 5)
    shutil.rmtree(vm.runtime, ignore_errors=True)


def _qemu_img(verb: str, disk: Path) -> object:
    """What ``qemu-img VERB --output=json`` says of a disk; None when it cannot say.
    ``-U``: a running VM holds a lock on its disk, and looking must not need it."""
    proc = subprocess.run(
        ["qemu-img", verb, "-U", "--output=json", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return None


def disk_info(disk: Path) -> dict:
    """``virtual-size`` and ``actual-size`` (bytes) of a disk image; empty when unreadable."""
    info = _qemu_img("info", disk)
    return info if isinstance(info, dict) else {}


def disk_has_data(disk: Path) -> bool:
    """Whether anything was ever written to the disk (a blank new qcow2 has no data); an
    unreadable disk counts as holding something."""
    extents = _qemu_img("map", disk)
    if not isinstance(extents, list):
        return True
    return any(e.get("data") for e in extents)
