"""The short text forms of a session's parts, as the command line, matrix files and the
service write them: ``HOST:GUEST[:ro]`` shares, ``SIZE:GUEST[:PATH]`` disks, ``HOST:GUEST``
ports, ``KEY=VALUE`` environments, seconds, durations (``10m``), guest paths (``NAME:/p``).
Pure; bad input is one line naming the option and the value."""

from __future__ import annotations

import math
import os
import posixpath
import re
from collections.abc import Iterable, Mapping

from qemubox.errors import InputError
from qemubox.model.size import disk_size
from qemubox.sandbox.spec import Disk, FSShare


def _split_guest(spec: str, what: str) -> tuple[str, str]:
    """``HOST:/guest/path`` split at the last ':' that starts an absolute guest path."""
    at = spec.rfind(":/")
    if at <= 0:
        raise InputError(f"{what} {spec!r}: expected HOST:GUEST with an absolute GUEST path")
    return spec[:at], spec[at + 1 :]


def _ro_suffix(spec: str) -> tuple[str, bool]:
    for suffix, ro in ((":ro", True), (":rw", False)):
        if spec.endswith(suffix):
            return spec[: -len(suffix)], ro
    return spec, False


def volume(spec: str) -> FSShare:
    """``-v HOST:GUEST[:ro]``, or ``-v DIR[:ro]``: DIR at the same (absolute) path."""
    body, ro = _ro_suffix(spec)
    if ":" not in body and body:
        return FSShare(host_path=body, mount_point=os.path.abspath(body), read_only=ro)
    host, guest = _split_guest(body, "--volume")
    return FSShare(host_path=host, mount_point=guest, read_only=ro)


def share(spec: str) -> FSShare:
    """``--share HOST:TAG:GUEST[:ro]``"""
    body, ro = _ro_suffix(spec)
    rest, guest = _split_guest(body, "--share")
    host, sep, tag = rest.rpartition(":")
    if not sep or not host or not tag:
        raise InputError(f"--share {spec!r}: expected HOST:TAG:GUEST[:ro]")
    return FSShare(host_path=host, mount_point=guest, mount_tag=tag, read_only=ro)


def disk(spec: str) -> Disk:
    """``--disk SIZE:GUEST[:PATH]``"""
    size, sep, rest = spec.partition(":")
    if not sep or not rest.startswith("/"):
        raise InputError(f"--disk {spec!r}: expected SIZE:GUEST[:PATH]")
    guest, sep, path = rest.partition(":")
    disk_size(size)  # said now, not when a machine is planned
    return Disk(size=size, mount_point=guest, path=path or None)


def publish(spec: str) -> tuple[int, int]:
    """``-p HOST:GUEST``"""
    host, sep, guest = spec.partition(":")
    if not sep or not host.isdigit() or not guest.isdigit():
        raise InputError(f"--publish {spec!r}: expected HOST_PORT:GUEST_PORT (numbers)")
    return int(host), int(guest)


def env(specs: Iterable[str], host_env: Mapping[str, str]) -> dict[str, str]:
    """``-e KEY=VALUE``, or ``-e KEY`` for the host's value (skipped when unset)."""
    out = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not key or any(c in key for c in " \0"):
            raise InputError(f"--env {spec!r}: expected KEY=VALUE")
        if not sep:
            if key not in host_env:
                continue
            value = host_env[key]
        out[key] = value
    return out


def seconds(text: str | None, option: str) -> float | None:
    """A positive, finite number of seconds (``None`` stays ``None``)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{option} {text!r}: expected a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{option} {text!r}: expected a positive, finite number of seconds")
    return value


def workdir(text: str) -> str:
    if not text.startswith("/"):
        raise InputError(f"--workdir {text!r}: expected an absolute guest path")
    return posixpath.normpath(text)


_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?")


def user(text: str | None) -> str | None:
    """``--user``: NAME, UID, NAME:GROUP or UID:GID (None: not given)."""
    if text is None:
        return None
    if not _USER_RE.fullmatch(text):
        raise InputError(f"--user {text!r}: expected NAME, UID, NAME:GROUP or UID:GID")
    return text


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str | None, option: str) -> float | None:
    """``90``, ``90s``, ``10m``, ``2h``, ``1d``: a positive number of seconds."""
    if text is None:
        return None
    body, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    value = seconds(body, option) if body else None
    if value is None:
        raise InputError(f"{option} {text!r}: expected a duration such as 90s, 10m, 2h or 1d")
    return value * _UNITS[unit]


def guest_path(spec: str) -> tuple[str | None, str]:
    """``NAME:/path`` (a sandbox's path) or a host path (``-``: a tar stream)."""
    name, sep, path = spec.partition(":")
    if sep and "/" not in name and name:
        if not path.startswith("/"):
            raise InputError(f"{spec!r}: the path in a sandbox must be absolute")
        return name, posixpath.normpath(path)
    return None, spec


def count(text: str, option: str) -> int:
    """A whole number, 0 or more."""
    if not text.isdigit():
        raise InputError(f"{option} {text!r}: expected a whole number")
    return int(text)
