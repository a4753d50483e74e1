"""The options every door takes for a sandbox, as a user writes them (``512M``,
``HOST:GUEST:ro``, ``8080:80``), into a :class:`Session`. Pure: bad input is one line."""

from __future__ import annotations

from dataclasses import dataclass, replace

from qemubox.errors import InputError
from qemubox.model import session as defaults
from qemubox.sandbox import notation
from qemubox.sandbox.spec import Session


@dataclass(frozen=True)
class SessionRequest:
    memory: str = defaults.DEFAULT_MEMORY
    cpus: str = str(defaults.DEFAULT_CPUS)
    balloon: bool = False
    volumes: tuple[str, ...] = ()  # HOST:GUEST[:ro], or DIR[:ro]
    share_fs: str = defaults.SHARE_FS[0]
    shares: tuple[str, ...] = ()  # HOST:TAG:GUEST[:ro]
    disks: tuple[str, ...] = ()  # SIZE:GUEST[:PATH]
    net: str = defaults.NETWORKS[0]  # or allow=LIST, deny=LIST (egress rules)
    add_hosts: tuple[str, ...] = ()  # NAME:IP
    egress_log: str | None = None
    vmcore: str | None = None  # where a panicked guest's memory is saved
    append: str = ""  # the guest kernel's command line's further words
    publish: tuple[str, ...] = ()  # HOST:GUEST
    kernel: str | None = None
    modules: str | None = None
    boot_timeout: str = f"{defaults.DEFAULT_BOOT_TIMEOUT:g}"
    accel: str = defaults.ACCELS[0]
    snapshot: bool = True
    image: str = defaults.DEFAULT_IMAGE
    arch: str | None = None

    def session(self, timeout: float | None = None, console_log: str | None = None) -> Session:
        """The Session asked for; its commands' default ``timeout``."""
        shares = [*map(notation.volume, self.volumes), *map(notation.share, self.shares)]
        return Session(
            memory=self.memory,
            cpus=cpus(self.cpus),
            balloon=self.balloon,
            shares=[replace(share, fs=self.share_fs) for share in shares],
            disks=[notation.disk(d) for d in self.disks],
            network=self.net,
            add_hosts=list(self.add_hosts),
            egress_log=self.egress_log,
            vmcore=self.vmcore,
            kernel_args=self.append,
            ports=[notation.publish(p) for p in self.publish],
            kernel=self.kernel,
            modules=self.modules,
            timeout=timeout,
            boot_timeout=notation.seconds(self.boot_timeout, "--boot-timeout"),
            accel=self.accel,
            console_log=console_log,
            image=self.image,
            snapshot=self.snapshot,
            arch=self.arch,
        )

    @classmethod
    def take(cls, options: dict) -> SessionRequest:
        """The request made of the options in ``options`` that are its fields (they are
        taken out of it)."""
        names = [name for name in cls.__dataclass_fields__ if name in options]
        return cls(**{name: _frozen(options.pop(name)) for name in names})


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def cpus(text: str | int) -> int:
    value = str(text)
    if not value.isdigit() or not 1 <= int(value) <= defaults.MAX_CPUS:
        raise InputError(f"--cpus {text!r}: expected a whole number from 1 to {defaults.MAX_CPUS}")
    return int(value)
