"""Where qemubox keeps its files, and the small file disciplines they share."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """The user cache directory (``QEMUBOX_CACHE_DIR`` overrides it)."""
    override = os.environ.get("QEMUBOX_CACHE_DIR")
    path = Path(override) if override else Path(platformdirs.user_cache_dir("qemubox"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; empty when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (readers see the old or the new file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_keeping_old(path: Path, text: str) -> Path | None:
    """Write ``text`` to ``path``; a different file already there is kept as ``<path>.old``.

    Returns the backup's path when one was made. An identical file is not touched.
    """
    import shutil

    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    backup = None
    if path.exists():
        if path.read_text(encoding="utf-8", errors="replace") == text:
            return None
        backup = path.with_name(path.name + ".old")
        shutil.copy2(path, backup)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return backup
