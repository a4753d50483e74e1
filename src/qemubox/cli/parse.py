"""Option values into session parts: pure functions; bad input is one line naming the
option and the value."""

from __future__ import annotations

import math
import posixpath
from collections.abc import Iterable, Mapping

from qemubox.errors import InputError
from qemubox.sandbox.notation import disk, publish, share, volume  # noqa: F401 - the options' forms


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


def cpus(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise InputError(f"--cpus {text!r}: expected a whole number from 1 to 64")
    return int(text)


def workdir(text: str) -> str:
    if not text.startswith("/"):
        raise InputError(f"--workdir {text!r}: expected an absolute guest path")
    return posixpath.normpath(text)


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
