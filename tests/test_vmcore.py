"""Crash dumps: a panicking guest's memory saved as an ELF core with the kernel's VMCOREINFO
(``run``/``exec --vmcore``) and a running sandbox's memory saved on demand (``dump``), each
opened by drgn with the symbols of a kernel built with the debug profile."""

from __future__ import annotations

import stat
from pathlib import Path

import drgn
import pytest
from drgn.helpers.linux.printk import get_printk_records

from helpers import qemubox
from qemubox.errors import InputError
from qemubox.model.plan import LIMITS, Capability, KernelPlan, make_plan
from qemubox.qemu.cmdline import qemu_args
from qemubox.sandbox.spec import Session

PANIC = ["sh", "-c", "echo c > /proc/sysrq-trigger"]


def _plan(tmp_path, arch: str = "x86_64", **session):
    kernel = KernelPlan("/k/vmlinuz", "6.12.1", arch, None, None, "a kernel", mmio=False)
    valid = Session(memory="256M", **session).validate()
    return make_plan(valid, kernel, "tcg", "", str(tmp_path / "run"), "/c/initrd", None)


def test_every_guest_with_fw_cfg_has_the_vmcoreinfo_device_and_dumps_are_asked_for(tmp_path):
    plain = _plan(tmp_path)
    assert "vmcoreinfo" in qemu_args(plain) and "-action" not in qemu_args(plain)
    assert not plain.crash_dumps and plain.cannot(Capability.POOL) is None
    dumping = _plan(tmp_path, vmcore=str(tmp_path / "core"))
    args = qemu_args(dumping)
    assert dumping.crash_dumps and dumping.vmcore == str(tmp_path / "core")
    assert args[args.index("-action") + 1] == "shutdown=pause"  # the guest is held, not gone
    assert f"socket,id=crash,path={tmp_path}/run/crash.sock" in args  # QEMU connects to it
    assert dumping.cannot(Capability.POOL) == next(
        why for cap, _, why in LIMITS if cap is Capability.POOL and "crash" in why
    )
    assert dumping.compat_key() == plain.compat_key()  # snapshots are shared
    assert "vmcoreinfo" not in qemu_args(_plan(tmp_path, "s390x"))


def test_a_dump_where_it_cannot_be_written_or_opened_is_refused_before_anything_starts(
    tmp_path,
):
    with pytest.raises(InputError, match=r"s390x's machines have no vmcoreinfo device.*x86_64"):
        _plan(tmp_path, "s390x", vmcore=str(tmp_path / "core"))
    r = qemubox("run", "--vmcore", "/no/such/dir/core", "--", "true")
    assert (r.code, r.err) == (
        2,
        "qemubox: error: vmcore '/no/such/dir/core': directory /no/such/dir does not exist\n",
    )
    r = qemubox("run", "--vmcore", tmp_path, "--", "true")
    assert (r.code, r.err.count("\n")) == (2, 1) and "is a directory" in r.err


def test_dumping_a_sandbox_that_does_not_exist_is_one_line(state, tmp_path):
    r = qemubox("dump", "nope", tmp_path / "core")
    assert r.code == 2 and r.err.count("\n") == 1 and "nope" in r.err, r.err
    assert not (tmp_path / "core").exists()


def _program(core: Path, vmlinux: Path) -> drgn.Program:
    """The kernel in ``core``, with ``vmlinux``'s symbols, as drgn sees it."""
    assert core.read_bytes()[:4] == b"\x7fELF"
    prog = drgn.Program()
    prog.set_core_dump(str(core))
    prog.load_debug_info([str(vmlinux)])
    return prog


def _log(prog: drgn.Program) -> bytes:
    return b"\n".join(record.text for record in get_printk_records(prog))


@pytest.mark.qemu
def test_a_panic_leaves_a_vmcore_that_drgn_opens_with_the_debug_kernels_symbols(
    debug_kernel, tmp_path
):
    core = tmp_path / "vmcore"
    r = qemubox(
        "run", "--kernel", debug_kernel / "vmlinuz", "-m", "256M", "--vmcore", core, "--",
        *PANIC, timeout=300,
    )  # fmt: skip
    assert r.code == 122, r.err[-2000:]
    last = r.err.strip().splitlines()[-1]
    assert last.startswith("qemubox: error: Kernel panic - not syncing: sysrq triggered crash; ")
    assert f"its memory is saved in {core} (256 MiB, " in last
    assert stat.S_IMODE(core.stat().st_mode) == 0o600  # guest memory is nobody else's
    assert [p.name for p in tmp_path.iterdir()] == ["vmcore"]  # no partial file left
    prog = _program(core, debug_kernel / "vmlinux")
    assert prog["init_task"].comm.string_() == b"swapper/0"
    assert b"sysrq: Trigger a crash" in _log(prog)


@pytest.mark.qemu
def test_a_named_sandbox_is_dumped_as_it_runs_and_when_it_panics(debug_kernel, state, tmp_path):
    r = qemubox("create", "--kernel", debug_kernel / "vmlinuz", "-m", "256M", "box", timeout=300)
    assert r.code == 0, r.err[-2000:]
    assert qemubox("exec", "box", "--", "sh", "-c", "echo from-a-test > /dev/kmsg").code == 0
    live = tmp_path / "live"
    r = qemubox("dump", "box", live)
    assert r.code == 0 and r.out.startswith(f"box: 256 MiB saved in {live} ("), r.err
    prog = _program(live, debug_kernel / "vmlinux")
    assert prog["init_task"].comm.string_() == b"swapper/0"
    assert b"from-a-test" in _log(prog)
    assert qemubox("exec", "box", "--", "echo", "runs on").out == "runs on\n"

    crashed = tmp_path / "crashed"
    r = qemubox("exec", "--vmcore", crashed, "box", "--", *PANIC, timeout=300)
    assert r.code == 122 and f"its memory is saved in {crashed} (" in r.err, r.err[-2000:]
    assert b"sysrq: Trigger a crash" in _log(_program(crashed, debug_kernel / "vmlinux"))
    r = qemubox("dump", "box", tmp_path / "after")
    assert r.code == 2 and r.err.count("\n") == 1 and "box" in r.err, r.err
    assert not (tmp_path / "after").exists()

    # Started again, a panic without --vmcore leaves no dump and ends as it always did.
    assert qemubox("start", "box", timeout=300).code == 0
    r = qemubox("exec", "box", "--", *PANIC, timeout=300)
    assert r.code == 122 and "memory" not in r.err, r.err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashed", "live", "state"]
