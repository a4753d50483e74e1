"""Writing initramfs archives (cpio "newc" format) without external tools."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Appends entries to a newc cpio archive; parent directories are added as needed."""

    def __init__(self, fh: BinaryIO, mtime: int = 0) -> None:
        self._fh = fh
        self._ino = 1
        self._mtime = mtime  # fixed by default: the same content gives the same bytes
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.strip("/") or "."
        encoded = name.encode() + b"\0"
        fields = [
            self._ino,
            mode,
            0,
            0,
            2 if stat.S_ISDIR(mode) else 1,
            self._mtime,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        ]
        self._ino += 1
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._fh.write(header + encoded)
        self._pad(len(header) + len(encoded))
        self._fh.write(data)
        self._pad(len(data))

    def _pad(self, length: int) -> None:
        self._fh.write(b"\0" * (-length % 4))

    def _parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.add_dir("/".join(parts[:i]))

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if path in self._dirs:
            return
        self._parents(path)
        self._dirs.add(path)
        self._entry(path, stat.S_IFDIR | mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(path)
        self._entry(path, stat.S_IFREG | mode, data)

    def add_host_file(self, path: str, host_path: Path, mode: int | None = None) -> None:
        data = Path(host_path).read_bytes()
        self.add_file(path, data, mode if mode is not None else host_path.stat().st_mode & 0o7777)

    def add_symlink(self, path: str, target: str) -> None:
        self._parents(path)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(path)
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry(_TRAILER, 0)
