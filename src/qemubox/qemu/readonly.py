"""``python -m qemubox.qemu.readonly DIR VIEW COMMAND...``: run COMMAND (virtiofsd) in a
mount namespace of its own where VIEW shows DIR, and every mount under it, read-only.
virtiofsd has no read-only option; this way a guest that remounts its share read-write
still cannot write, mounts under DIR (a host root's /usr, /home...) stay visible, and the
rest of the host (virtiofsd's own /run) stays as it is."""

from __future__ import annotations

import ctypes
import os
import struct
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # one number on every architecture (added after the unification)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source else None
    _check(_libc.mount(src, target.encode(), None, ctypes.c_ulong(flags), None), f"mount {target}")


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are octal escapes."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def _mounts_under(top: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = _unescape(line.split()[4])
            if point == top or point.startswith(top.rstrip("/") + "/"):
                out.append(point)
    return out


def make_read_only(source: str, top: str) -> None:
    """A recursive read-only bind mount of ``source`` at ``top``, in this (private)
    namespace."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare")
    _mount(None, "/", MS_REC | MS_PRIVATE)
    os.makedirs(top, exist_ok=True)
    _mount(source, top, MS_BIND | MS_REC)
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", MOUNT_ATTR_RDONLY, 0, 0, 0))
    rc = _libc.syscall(
        SYS_MOUNT_SETATTR, AT_FDCWD, top.encode(), AT_RECURSIVE, attr, ctypes.sizeof(attr)
    )
    if rc == 0:
        return
    if ctypes.get_errno() != 38:  # ENOSYS: a kernel before 5.12 remounts one by one
        _check(rc, f"read-only {top}")
    for point in _mounts_under(top):
        _mount(None, point, MS_REMOUNT | MS_BIND | MS_RDONLY)


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit("usage: python -m qemubox.qemu.readonly DIR VIEW COMMAND...")
    try:
        make_read_only(argv[0], os.path.abspath(argv[1]))
        os.execvp(argv[2], argv[2:])
    except OSError as err:
        sys.exit(f"qemubox: cannot share {argv[0]} read-only: {err}")


if __name__ == "__main__":
    main(sys.argv[1:])
