"""Records that must survive: one directory per named object under the state directory,
holding its JSON record (written whole, atomically), a lock, and whatever files the object
owns (disks, logs). This module is the only writer of records.

Layout: ``<state>/<kind>/<name>/record.json``, ``.../lock``. A record being made has its
directory but no record yet; one being removed loses its record first, so a reader sees an
object whole or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from qemubox import paths
from qemubox.errors import InputError

SCHEMA = 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
RECORD = "record.json"


class Store:
    """The records of one kind (``sandboxes``, ``images``...)."""

    def __init__(self, kind: str, what: str) -> None:
        self.kind = kind
        self.what = what  # how errors name one: "sandbox"

    @property
    def root(self) -> Path:
        return paths.state_dir() / self.kind

    def check_name(self, name: str) -> str:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise InputError(
                f"invalid {self.what} name {name!r}: 1 to 63 letters, digits, '_', '.' or '-', "
                "beginning with a letter or digit"
            )
        return name

    def dir(self, name: str) -> Path:
        return self.root / self.check_name(name)

    def make(self, name: str) -> Path:
        """The new object's directory; a name in use is refused."""
        d = self.dir(name)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            raise InputError(f"a {self.what} named {name!r} already exists") from None
        return d

    def exists(self, name: str) -> bool:
        return (self.dir(name) / RECORD).is_file()

    def read(self, name: str) -> dict:
        try:
            data = json.loads((self.dir(name) / RECORD).read_text())
        except FileNotFoundError:
            raise InputError(f"no {self.what} named {name!r}") from None
        except (OSError, ValueError) as err:
            raise InputError(f"the record of {self.what} {name!r} is unreadable: {err}") from None
        if data.get("schema") != SCHEMA:
            raise InputError(
                f"the record of {self.what} {name!r} has schema {data.get('schema')!r}; "
                f"this qemubox reads schema {SCHEMA}"
            )
        return data

    def write(self, name: str, record: dict) -> None:
        paths.write_json(self.dir(name) / RECORD, {**record, "schema": SCHEMA})

    @contextlib.contextmanager
    def locked(self, name: str, wait: bool = True) -> Iterator[bool]:
        """Hold the object's lock for the block; yields False when ``wait`` is off and
        another process holds it (the block then must not write)."""
        d = self.dir(name)
        if not d.is_dir():
            raise InputError(f"no {self.what} named {name!r}")
        with open(d / "lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            d.name
            for d in self.root.iterdir()
            if NAME_RE.fullmatch(d.name) and (d / RECORD).is_file()
        )

    def remove(self, name: str) -> None:
        """Remove the object and the files it owns: its record first."""
        d = self.dir(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d / RECORD)
        shutil.rmtree(d, ignore_errors=True)

    def abandon(self, name: str) -> None:
        """Remove a directory that never got its record (a make that failed)."""
        shutil.rmtree(self.dir(name), ignore_errors=True)
