"""``cp`` between the host and a named sandbox: files and directory trees travel as a tar
stream through a command in the guest (busybox ``tar``), modes kept.

What comes out of a guest is untrusted: members that would land outside the destination
(absolute paths, ``..``, links pointing out), device nodes and FIFOs are refused, set-id
bits are dropped, and files belong to the user who copies. What goes in is created as the
guest's root, with the modes it had on the host.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import sys
import tarfile
import threading
from pathlib import Path

from qemubox.errors import InputError, SandboxError
from qemubox.guest.protocol import own_shell


def cp(src: tuple[str | None, str], dst: tuple[str | None, str]) -> None:
    """``qemubox cp SRC DST``, each side a (sandbox name or None, path) pair: one side is a
    sandbox's path, the other a host path or ``-``."""
    from qemubox.sandbox import named

    (src_box, src_path), (dst_box, dst_path) = src, dst
    if (src_box is None) == (dst_box is None):
        raise InputError("cp: exactly one of SRC and DST must be NAME:/path (a sandbox's path)")
    box = named.attach(src_box or dst_box)
    try:
        if src_box is not None:
            from_guest(box, src_path, dst_path)
        else:
            to_guest(box, src_path, dst_path)
    finally:
        box.detach()


def _guest_kind(box, path: str) -> str:
    """``dir``, ``file`` (anything else that exists) or ``none``."""
    script = (
        'if [ -d "$1" ]; then echo dir; elif [ -e "$1" ] || [ -L "$1" ]; then echo file; '
        "else echo none; fi"
    )
    r = box.exec(own_shell(script, path), timeout=30)
    return r.stdout.decode().strip() or "none"


def _fail(what: str, r) -> SandboxError:
    why = r.stderr.decode(errors="replace").strip().splitlines()
    return SandboxError(f"{what}: {why[-1] if why else f'exit status {r.exit_code}'}")


# --- into the guest -------------------------------------------------------------------------


def to_guest(box, host: str, guest: str) -> None:
    """Copy host path ``host`` (or a tar stream on stdin, ``-``) to ``guest``: into it when
    it is a directory, else as it."""
    label = f"{box.name}:{guest}"
    kind = _guest_kind(box, guest)
    if host == "-":
        if kind != "dir":
            raise InputError(
                f"cp: {label} is not a directory in the sandbox (a tar stream goes into one)"
            )
        _untar_in_guest(box, guest, sys.stdin.buffer, label)
        return
    source = Path(host)
    if not source.exists() and not source.is_symlink():
        raise InputError(f"cp: {host}: no such file or directory")
    if kind == "dir":
        into, name = guest, source.resolve().name if host in (".", "..") else source.name
    else:
        into, name = posixpath.dirname(guest) or "/", posixpath.basename(guest)
        if _guest_kind(box, into) != "dir":
            raise InputError(f"cp: {box.name}:{into} is not a directory in the sandbox")
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as out, tarfile.open(fileobj=out, mode="w|") as tar:
                tar.add(host, arcname=name)
        except BrokenPipeError:
            pass
        except OSError as err:
            failure.append(err)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    with os.fdopen(read_fd, "rb") as stream:
        _untar_in_guest(box, into, stream, label)
    producer.join()
    if failure:
        err = failure[0]
        raise InputError(f"cp: {getattr(err, 'filename', None) or host}: {err.strerror or err}")


def _untar_in_guest(box, into: str, stream, label: str) -> None:
    script = 'umask 0; cd "$1" && tar -x -o -f -'
    r = box.exec(own_shell(script, into), stdin_stream=stream, timeout=None)
    if r.exit_code != 0:
        raise _fail(f"cp: cannot copy to {label}", r)


# --- out of the guest -----------------------------------------------------------------------


def _safe(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """The data filter's refusals (paths and links leaving ``dest``, special files), with the
    member's permission bits kept (set-id and sticky bits dropped)."""
    checked = tarfile.data_filter(member, dest)
    return checked.replace(mode=member.mode & 0o777, deep=False)


def from_guest(box, guest: str, host: str) -> None:
    """Copy ``guest`` to host path ``host`` (or as a tar stream to stdout, ``-``): into it
    when it is a directory, else as it."""
    label = f"{box.name}:{guest}"
    if _guest_kind(box, guest) == "none":
        raise InputError(f"cp: {label}: no such file or directory in the sandbox")
    top = posixpath.basename(guest.rstrip("/")) or "."
    parent = posixpath.dirname(guest.rstrip("/")) or "/"
    script = 'cd "$1" && tar -c -f - "$2"'
    argv = own_shell(script, parent, top)
    if host == "-":
        out = sys.stdout.buffer
        r = box.exec(argv, on_stdout=out.write, timeout=None)
        out.flush()
        if r.exit_code != 0:
            raise _fail(f"cp: cannot copy from {label}", r)
        return
    target = Path(host)
    if target.is_dir():
        into, rename = target, None
    else:
        into, rename = target.parent if str(target.parent) else Path("."), target.name
        if not into.is_dir():
            raise InputError(f"cp: {into}: no such directory")
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def consume() -> None:
        with os.fdopen(read_fd, "rb") as stream:
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        ours = member.name == top or member.name.startswith(top + "/")
                        if rename is not None and top != "." and ours:
                            member.name = rename + member.name[len(top) :]
                        tar.extract(member, into, filter=_safe)
            except (tarfile.TarError, OSError) as err:
                failure.append(err)
            while stream.read(1 << 16):  # the rest, so that the guest's tar ends
                pass

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    writer = os.fdopen(write_fd, "wb")
    try:
        r = box.exec(argv, on_stdout=writer.write, timeout=None)
    finally:
        with contextlib.suppress(OSError):
            writer.close()
        consumer.join()
    if r.exit_code != 0:
        raise _fail(f"cp: cannot copy from {label}", r)
    if failure:
        raise SandboxError(f"cp: refused what {label} sent: {failure[0]}")
