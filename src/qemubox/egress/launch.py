"""What a machine's start needs for its egress: the shim QEMU preloads (compiled once per
source, cached), the environment that tells it what to do, the proxy as a keeper's helper,
and the rules file the proxy reads (which ``qemubox network`` rewrites)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from importlib import resources
from pathlib import Path

from qemubox.cc import compiled
from qemubox.egress import CONTROL, RULES
from qemubox.errors import InputError
from qemubox.model.egress import METADATA, Egress
from qemubox.model.plan import MachinePlan
from qemubox.paths import atomic_write, cache_dir


def _source() -> bytes:
    return (resources.files("qemubox.egress") / "shim.c").read_bytes()


def shim_path() -> Path:
    """Where the shim is cached: named by its source."""
    key = hashlib.sha256(_source()).hexdigest()[:16]
    return cache_dir() / "egress" / f"libqemubox-egress-{key}.so"


def shim() -> Path:
    """The shim, a shared library for the host's QEMU, built with the host's gcc."""
    if shutil.which("gcc") is None:
        raise InputError("gcc is needed to build qemubox's network shim (see setup.sh)")

    flags = ["gcc", "-shared", "-fPIC", "-O2", "-s", "-Wl,--no-as-needed", "-ldl"]
    return compiled(_source(), shim_path(), flags, "the network shim")


def qemu_environment(plan: MachinePlan, library: str) -> list[str]:
    """``env`` arguments to put before QEMU's command line: under egress rules, the shim
    hands everything to the proxy; under --net user it refuses the metadata addresses."""
    if plan.egress is not None:
        return ["env", f"LD_PRELOAD={library}", f"QEMUBOX_EGRESS={plan.runtime_dir}/{CONTROL}"]
    if plan.network == "user":
        return ["env", f"LD_PRELOAD={library}", f"QEMUBOX_EGRESS_REFUSE={','.join(METADATA)}"]
    return []


def qemu_prefix(plan: MachinePlan, build: bool = True) -> list[str]:
    """:func:`qemu_environment` with the shim, built first when the network needs it
    (unless not ``build``: a dry run's)."""
    if plan.egress is None and plan.network != "user":
        return []
    return qemu_environment(plan, str(shim() if build else shim_path()))


def proxy_helper(plan: MachinePlan) -> tuple[tuple[str, ...], str] | None:
    """The proxy, as a keeper's helper (command, the socket it makes), when there are
    rules."""
    if plan.egress is None:
        return None
    command = (sys.executable, "-m", "qemubox.egress", plan.runtime_dir, plan.egress_log_path)
    return command, f"{plan.runtime_dir}/{CONTROL}"


def write_rules(runtime_dir: str | Path, rules: Egress) -> None:
    """Put ``rules`` in force for the machine in ``runtime_dir`` (its proxy reads the file
    again as it changes)."""
    atomic_write(Path(runtime_dir) / RULES, json.dumps(rules.to_dict()) + "\n", 0o600)


def read_rules(runtime_dir: str | Path) -> Egress | None:
    path = Path(runtime_dir) / RULES
    try:
        return Egress.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        return None
