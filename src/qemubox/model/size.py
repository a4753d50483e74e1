"""Sizes as users write them (``512M``, ``2G``, ``64MiB``), in bytes."""

from __future__ import annotations

import re

from qemubox.errors import InputError

MIB = 1 << 20
_SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.I)
_UNITS = {"": MIB, "K": 1 << 10, "M": MIB, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes in ``512M``, ``2G``, ``1024K``, ``64MiB``, ``4096B``; a bare number means MiB."""
    if isinstance(text, int):
        if isinstance(text, bool) or text <= 0:
            raise InputError(f"{what} must be positive, got {text}")
        return text
    m = _SIZE_RE.fullmatch(str(text).strip())
    if not m:
        raise InputError(f"invalid {what} {text!r} (expected a size such as 512M or 2G)")
    unit = m.group(2).upper()
    # A bare number means MiB; a bare B means bytes.
    value = int(m.group(1)) * (1 if not unit and m.group(3) else _UNITS[unit])
    if value <= 0:
        raise InputError(f"{what} must be positive, got {text!r}")
    return value


def whole_mib(text: str | int, what: str) -> int:
    """A size that QEMU takes in MiB (guest memory, a disk): refused unless it is a whole
    number of MiB, since rounding it either way would give something not asked for."""
    size = parse_size(text, what)
    if size % MIB:
        raise InputError(f"{what} {text!r} is not a whole number of MiB (try {-(-size // MIB)}M)")
    return size


def disk_size(text: str | int) -> int:
    """A disk's size in bytes: at least 1M."""
    size = parse_size(text, "disk size")
    if size < MIB:
        raise InputError(f"disk size {text!r} is too small (at least 1M)")
    return size
