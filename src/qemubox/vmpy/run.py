"""``vm run``: the request as the user gave it, checked and turned into a RunPlan; then
QEMU in the foreground (this process becomes it, console and monitor on the terminal) or
detached (console on a socket ``vm console`` attaches to)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from qemubox import arch as arches
from qemubox.errors import InputError
from qemubox.vm.prepare import free_port
from qemubox.vmpy import config as vmconfig
from qemubox.vmpy import control
from qemubox.vmpy.command import RunPlan, qemu_command
from qemubox.vmpy.conf import VmPaths
from qemubox.vmpy.kernel import find_build, host_kernel
from qemubox.vmpy.layout import VmDir


@dataclass(frozen=True)
class RunRequest:
    name: str
    kernel: str | None = None  # -k BUILD
    initrd: str | None = None
    append: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    gdb: bool = False
    detach: bool = False
    accel: str = "auto"


def plan(where: VmPaths, req: RunRequest, cwd: Path, probe: bool) -> tuple[VmDir, RunPlan]:
    """Everything checked, nothing started. ``probe``: KVM may be tried with a real boot
    (not for a dry run)."""
    vm = VmDir.of(where.vms, req.name).must_exist()
    cfg = vmconfig.load(vm.config)
    if (req.append or req.initrd) and req.kernel is None:
        given = "-a/--append" if req.append else "-i/--initrd"
        raise InputError(f"{given} needs -k BUILD (a kernel to pass it to)")
    kernel = host_kernel(find_build(req.kernel, where.builds, cwd)) if req.kernel else None
    if kernel and kernel.arch and kernel.arch != cfg.arch.name:
        raise InputError(
            f"-k {req.kernel}: a {kernel.arch} kernel, but VM {req.name!r} is "
            f"{cfg.arch.uname} (qemu_arch in {vm.config})"
        )
    initrd = None
    if req.initrd:
        initrd = (cwd / req.initrd).resolve()
        if not initrd.is_file():
            raise InputError(f"-i {req.initrd}: no such file")
    host = arches.host()

    def probe_kernel() -> Path | str:
        if kernel is not None:
            return kernel.image
        from qemubox.kernel.artifacts import choose_kernel

        return choose_kernel(None).image

    from qemubox.qemu.accel import choose_accel

    accel = choose_accel(
        req.accel, cfg.arch.qemu_binary, probe_kernel, cfg.arch.name, host.name, probe
    )
    firmware = None
    if kernel is None and cfg.arch.firmware and os.path.exists(cfg.arch.firmware):
        firmware = Path(cfg.arch.firmware)
    run_plan = RunPlan(
        config=cfg,
        kernel=kernel,
        initrd=initrd,
        append=req.append,
        extra=req.extra,
        accel=accel.accel,
        accel_note=accel.reason,
        qmp=vm.qmp,
        pidfile=vm.pidfile,
        gdb_port=free_port() if req.gdb else None,
        name=req.name,
        firmware=firmware,
        ssh_key=vm.ssh_public_key if vm.ssh_public_key.is_file() else None,
        agent=vm.agent,
    )
    if req.detach:
        run_plan = replace(run_plan, console=vm.console, console_log=vm.console_log)
    return vm, run_plan


def gdb_hint(run_plan: RunPlan) -> str | None:
    if run_plan.gdb_port is None:
        return None
    target = f"target remote 127.0.0.1:{run_plan.gdb_port}"
    vmlinux = run_plan.kernel.vmlinux if run_plan.kernel else None
    if vmlinux is None:
        return f"gdb stub on 127.0.0.1:{run_plan.gdb_port}: gdb -ex {shlex.quote(target)}"
    return f"attach with: gdb {shlex.quote(str(vmlinux))} -ex {shlex.quote(target)}"


def _facts(run_plan: RunPlan, mode: str) -> dict:
    return {
        "mode": mode,
        "kernel": str(run_plan.kernel.image) if run_plan.kernel else None,
        "ssh_port": run_plan.config.ssh_port,
        "gdb_port": run_plan.gdb_port,
        "accel": run_plan.accel,
    }


def start(vm: VmDir, run_plan: RunPlan) -> int:
    """Detached: returns QEMU's pid once its monitor is up."""
    control.prepare_runtime(vm)
    args = qemu_command(run_plan)
    pid = control.start_detached(vm, args)
    control.record(vm, pid, **_facts(run_plan, "detached"))
    return pid


def exec_foreground(vm: VmDir, run_plan: RunPlan) -> None:
    """This process becomes QEMU (its pid stays, so the record names the VM)."""
    control.prepare_runtime(vm)
    args = qemu_command(run_plan)
    control.record(vm, os.getpid(), **_facts(run_plan, "foreground"))
    os.execvp(args[0], args)  # in the caller's directory: relative paths are the caller's
