"""The API keys ``qemubox serve`` takes: made by ``serve key add NAME``, shown once, kept
only as their SHA-256 (a key is 160 random bits: no dictionary reaches it, so a slow hash
would buy nothing) in ``<state>/serve/keys.json``, a file only its owner may read.

A request's key is compared with every stored hash in constant time; the key's name is who
the request is (each sandbox belongs to the key that made it)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from qemubox import paths
from qemubox.errors import InputError
from qemubox.store import NAME_RE  # a key is named as a record is

PREFIX = "e2b_"  # what the SDKs' keys look like
KEY_RE = re.compile(r"e2b_[0-9a-f]{40}")


@dataclass(frozen=True)
class KeyInfo:
    name: str
    created: float
    shown: str  # the key's first characters, to tell keys apart


def keys_file() -> Path:
    return paths.state_dir() / "serve" / "keys.json"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InputError(
            f"invalid key name {name!r}: 1 to 63 letters, digits, '_', '.' or '-', "
            "beginning with a letter or digit"
        )
    return name


def _private(path: Path) -> None:
    paths.make_private_dir(path.parent)


def add(name: str) -> str:
    """A new key named ``name`` (a name in use is refused): returned, never kept."""
    _check_name(name)
    path = keys_file()
    _private(path)
    key = PREFIX + secrets.token_hex(20)
    with paths.updating_json(path) as keys:
        if name in keys:
            raise InputError(f"a key named {name!r} already exists (remove it first)")
        keys[name] = {"sha256": _digest(key), "created": time.time(), "shown": key[:8]}
    path.chmod(0o600)
    return key


def remove(name: str) -> None:
    path = keys_file()
    with paths.updating_json(path) as keys:
        if keys.pop(_check_name(name), None) is None:
            raise InputError(f"no key named {name!r}")


def list_all() -> list[KeyInfo]:
    keys = paths.read_json(keys_file())
    return [
        KeyInfo(name, float(k.get("created", 0)), str(k.get("shown", "")))
        for name, k in sorted(keys.items())
    ]


class KeyRing:
    """The stored keys as a server checks them; :meth:`reload` rereads the file (keys added
    or removed while it serves count from the next request on)."""

    def __init__(self) -> None:
        self._digests: list[tuple[bytes, str]] = []
        self._stamp: tuple[int, int] | None = None
        self.reload()

    def reload(self) -> None:
        path = keys_file()
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
        except OSError:
            stamp = None
        if stamp == self._stamp and self._stamp is not None:
            return
        keys = paths.read_json(path)
        self._digests = [
            (bytes.fromhex(k["sha256"]), name)
            for name, k in keys.items()
            if isinstance(k, dict) and isinstance(k.get("sha256"), str)
        ]
        self._stamp = stamp

    def __len__(self) -> int:
        return len(self._digests)

    def owner(self, key: str | None) -> str | None:
        """The name of ``key``, or None when it is no stored key."""
        self.reload()
        if not key or len(key) > 256:
            return None
        digest = hashlib.sha256(key.encode(errors="replace")).digest()
        found = None
        for stored, name in self._digests:  # every one compared: no early exit to time
            if hmac.compare_digest(stored, digest):
                found = name
        return found
