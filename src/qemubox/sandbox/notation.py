"""The short text forms of a session's parts, as the command line and matrix files write
them: ``HOST:GUEST[:ro]`` shares, ``SIZE:GUEST[:PATH]`` disks, ``HOST:GUEST`` ports. Pure;
bad input is one line naming the option and the value."""

from __future__ import annotations

import os

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
