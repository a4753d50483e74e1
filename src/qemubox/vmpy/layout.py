"""Where a VM's files are: its directory under ``VMs`` (disk, config.py, ssh key, install
script) and its runtime directory (QMP socket, pid, console), one home for both."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from qemubox import paths
from qemubox.errors import InputError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_name(name: str) -> str:
    """A VM name: a directory name and part of QEMU options, so letters, digits, ``.``,
    ``_`` and ``-`` only, starting with a letter or digit, at most 63 characters."""
    if not _NAME_RE.fullmatch(name):
        raise InputError(
            f"invalid VM name {name!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 63 characters)"
        )
    return name


@dataclass(frozen=True)
class VmDir:
    name: str
    root: Path  # <VMs>/NAME

    @classmethod
    def of(cls, vms: Path, name: str) -> VmDir:
        return cls(check_name(name), vms / name)

    @property
    def disk(self) -> Path:
        return self.root / f"{self.name}.qcow2"

    @property
    def config(self) -> Path:
        return self.root / "config.py"

    @property
    def ssh_key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def ssh_public_key(self) -> Path:
        return self.root / "id_ed25519.pub"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def install_script(self) -> Path:
        return self.root / "install.sh"

    @property
    def install_record(self) -> Path:
        return self.root / "installed.json"

    def exists(self) -> bool:
        return self.config.is_file()

    def must_exist(self) -> VmDir:
        if not self.exists():
            raise InputError(
                f"no VM {self.name!r} in {self.root.parent} "
                f"(create it with: qemubox vm create {self.name})"
            )
        return self

    # --- while running: sockets and a pid, in a short private directory --------------------

    @cached_property
    def runtime(self) -> Path:
        tag = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:8]
        return paths.runtime_root() / "vm" / f"{self.name[:40]}-{tag}"

    @property
    def qmp(self) -> Path:
        return self.runtime / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.runtime / "agent.sock"

    @property
    def pidfile(self) -> Path:
        return self.runtime / "qemu.pid"

    @property
    def console(self) -> Path:
        return self.runtime / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.runtime / "console.log"

    @property
    def run_record(self) -> Path:
        """How the running VM was started (ports, kernel, mode), for list and ssh."""
        return self.runtime / "run.json"
