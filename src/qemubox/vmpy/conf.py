"""``vmpy.conf``: where VMs, installer files and kernel builds live.

An INI file at ``$XDG_CONFIG_HOME/vmpy.conf`` (``~/.config/vmpy.conf``) with one section,
``[Paths]``: ``VMs`` (default ``~/vms``), ``ISOs`` (default ``<VMs>/iso``) and ``Builds``
(no default). Read by a small parser of our own so that every mistake names its line."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from qemubox.errors import InputError

SECTION = "paths"
KEYS = {"vms": "VMs", "isos": "ISOs", "builds": "Builds"}


@dataclass(frozen=True)
class VmPaths:
    vms: Path
    isos: Path
    builds: Path | None
    source: Path | None  # the file these came from, when there was one


def config_file(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or os.path.join(_home(env), ".config")
    return Path(base) / "vmpy.conf"


def _home(env: Mapping[str, str]) -> str:
    return env.get("HOME") or os.path.expanduser("~")


def parse(text: str, source: Path, home: str) -> VmPaths:
    """The paths ``text`` (the contents of ``source``) sets, with the defaults for the rest."""
    found: dict[str, Path] = {}
    section = None
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{source}:{number}"
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise InputError(f"{where}: a section header must end with ']': {line!r}")
            section = line[1:-1].strip()
            if section.lower() != SECTION:
                raise InputError(f"{where}: unknown section [{section}] (vmpy.conf has [Paths])")
            continue
        key, sep, value = _split(line)
        if not sep:
            raise InputError(f"{where}: expected KEY=VALUE, got {line!r}")
        if section is None:
            raise InputError(f"{where}: {key} is outside any section (put it under [Paths])")
        name = key.lower()
        if name not in KEYS:
            known = ", ".join(KEYS.values())
            raise InputError(f"{where}: unknown key {key!r} in [Paths] (known: {known})")
        if not value:
            raise InputError(f"{where}: {KEYS[name]} is empty")
        path = _expand(value, home)
        if not path.is_absolute():
            raise InputError(
                f"{where}: {KEYS[name]}={value}: a relative path (start it with / or ~)"
            )
        found[name] = path
    vms = found.get("vms", Path(home) / "vms")
    return VmPaths(vms, found.get("isos", vms / "iso"), found.get("builds"), source)


def _split(line: str) -> tuple[str, str, str]:
    """``KEY=VALUE`` or ``KEY: VALUE``, whichever separator comes first."""
    cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
    if cut < 0:
        return line, "", ""
    return line[:cut].strip(), line[cut], line[cut + 1 :].strip()


def _expand(value: str, home: str) -> Path:
    if value == "~" or value.startswith("~/"):
        value = home + value[1:]
    return Path(value)


def load(env: Mapping[str, str] | None = None) -> VmPaths:
    """The paths from the user's vmpy.conf, or the defaults when there is none."""
    env = os.environ if env is None else env
    path = config_file(env)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return replace(parse("", path, _home(env)), source=None)
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file") from None
    return parse(text, path, _home(env))
