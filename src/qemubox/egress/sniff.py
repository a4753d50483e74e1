"""The name a connection's first bytes ask for: a TLS ClientHello's server name (SNI) or an
HTTP request's Host. Pure; the proxy holds the client's bytes until this says enough."""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD = 16 * 1024 + 5  # one TLS record; an HTTP head longer than this is not looked into
_METHOD = re.compile(rb"[A-Z]{3,10} \S+ HTTP/1\.[01]\r\n")


@dataclass(frozen=True)
class Head:
    complete: bool  # enough bytes were seen to decide (or none will ever say more)
    protocol: str  # tls, http or other
    name: str | None = None  # what it asks for (lower case, no port)


def sniff(data: bytes) -> Head:
    """What ``data``, the first bytes a client sent, ask for."""
    if not data:
        return Head(False, "other")
    if data[0] == 0x16:
        return _tls(data)
    if data[:1].isupper():
        return _http(data)
    return Head(True, "other")


def _http(data: bytes) -> Head:
    line_end = data.find(b"\r\n")
    if line_end < 0:
        complete = len(data) >= MAX_HEAD or not _could_be_method(data)
        return Head(complete, "other" if complete else "http")
    if not _METHOD.match(data[: line_end + 2]):
        return Head(True, "other")
    end = data.find(b"\r\n\r\n")
    if end < 0 and len(data) < MAX_HEAD:
        return Head(False, "http")
    for line in data[line_end + 2 : end if end >= 0 else len(data)].split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == b"host":
            host = value.strip().decode("latin-1").lower()
            if host.startswith("["):
                return Head(True, "http", host[1:].split("]")[0])
            return Head(True, "http", host.rsplit(":", 1)[0].rstrip("."))
    return Head(True, "http", None)


def _could_be_method(data: bytes) -> bool:
    word = data.split(b" ", 1)[0]
    return word.isalpha() and word.isupper() and len(word) <= 10


def _tls(data: bytes) -> Head:
    """A ClientHello's server_name extension (RFC 8446 4.1.2, RFC 6066 3)."""
    if len(data) < 5:
        return Head(False, "tls")
    length = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + length:
        return Head(len(data) >= MAX_HEAD, "tls")
    body = data[5 : 5 + length]
    try:
        return Head(True, "tls", _server_name(body))
    except (IndexError, ValueError):
        return Head(True, "tls", None)


def _server_name(hs: bytes) -> str | None:
    if hs[0] != 1:  # not a ClientHello
        return None
    p = 4 + 2 + 32  # handshake header, version, random
    p += 1 + hs[p]  # session id
    p += 2 + int.from_bytes(hs[p : p + 2], "big")  # cipher suites
    p += 1 + hs[p]  # compression methods
    if p + 2 > len(hs):
        return None
    end = p + 2 + int.from_bytes(hs[p : p + 2], "big")
    p += 2
    while p + 4 <= end:
        kind = int.from_bytes(hs[p : p + 2], "big")
        size = int.from_bytes(hs[p + 2 : p + 4], "big")
        ext = hs[p + 4 : p + 4 + size]
        if kind == 0:  # server_name: a list of (type, name); type 0 is a host name
            q = 2
            while q + 3 <= len(ext):
                name_type, n = ext[q], int.from_bytes(ext[q + 1 : q + 3], "big")
                if name_type == 0:
                    return ext[q + 3 : q + 3 + n].decode("ascii").lower().rstrip(".")
                q += 3 + n
            return None
        p += 4 + size
    return None
