"""Choosing the accelerator: KVM only when a real boot under it works, TCG otherwise.

The mere presence of /dev/kvm proves nothing (on some hosts KVM guests hang, or QEMU aborts
setting up the CPU). The probe boots the sandbox's kernel under KVM with no init, bounded in
time: a working KVM prints the kernel banner and panics within a second or so. The verdict
is cached per host kernel and QEMU version.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qemubox import arch as arches
from qemubox.paths import cache_dir, read_json, updating_json
from qemubox.qemu.cmdline import bare_boot_args

PROBE_SECONDS = 4.0


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # kvm or tcg
    reason: str  # why TCG, when it is TCG on a host that has /dev/kvm


def tcg_warning(reason: str) -> str:
    """What the user is told when KVM is there but a guest runs under TCG anyway."""
    return f"using TCG (software emulation): {reason}"


def qemu_identity(binary: str) -> str:
    """Stands for the QEMU version without running QEMU: the binary's path, size and mtime
    (an upgrade changes them)."""
    import shutil

    path = shutil.which(binary)
    if path is None:
        return "missing"
    st = os.stat(path)
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _verdict_path() -> Path:
    return cache_dir() / "kvm-probe.json"


def _probe(arch: str, kernel: Path | str) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="qemubox-kvm-") as tmp:
        console = Path(tmp) / "console"
        args = bare_boot_args(
            arch,
            "kvm",
            kernel,
            f"console={arches.get(arch).console} panic=-1 rdinit=/qemubox-kvm-probe",
            f"file:{console}",
            memory_mib=128,
        )
        start = time.monotonic()
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _, err = proc.communicate(timeout=PROBE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)
            return False, f"a KVM guest did not boot within {PROBE_SECONDS:.0f} s (it hangs)"
        text = console.read_text(errors="replace") if console.exists() else ""
        if "Linux version" in text:
            return True, f"booted in {time.monotonic() - start:.2f} s"
        last = [line for line in err.splitlines() if "warning" not in line.lower()]
        why = last[-1].strip() if last else f"QEMU exited with status {proc.returncode}"
        # "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: ..."
        why = re.sub(r"^[\w.-]+: (?:[\w./-]+:\d+: )?", "", why)
        return False, f"QEMU cannot run a KVM guest here: {why}"


def choose_accel(
    requested: str,
    binary: str,
    kernel: Path | str | Callable[[], Path | str],
    guest_arch: str,
    host_arch: str,
    probe: bool = True,
) -> AccelChoice:
    """The accelerator to use for ``requested`` (auto, kvm or tcg). Without ``probe``, an
    unknown verdict counts as TCG and nothing is booted. ``kernel`` (what the probe boots)
    may be a function, called only when a probe runs."""
    foreign = guest_arch != host_arch and host_arch not in arches.get(guest_arch).kvm_hosts
    if requested == "tcg" or (requested == "auto" and foreign):
        return AccelChoice("tcg", "")
    if requested == "kvm":
        return AccelChoice("kvm", "")
    if not os.path.exists("/dev/kvm"):
        return AccelChoice("tcg", "")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("tcg", "no permission to use /dev/kvm (join the kvm group)")
    key = f"{platform.release()} {platform.version()} | {qemu_identity(binary)}"
    path = _verdict_path()
    verdict = read_json(path).get(key)
    if verdict is None:
        if not probe:
            return AccelChoice("tcg", "KVM not probed yet (a dry run boots nothing)")
        works, reason = _probe(guest_arch, kernel() if callable(kernel) else kernel)
        verdict = {"works": works, "reason": reason}
        with updating_json(path) as verdicts:
            verdicts[key] = verdict
    if verdict["works"]:
        return AccelChoice("kvm", "")
    return AccelChoice("tcg", verdict["reason"])
