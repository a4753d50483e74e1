"""The config fragment language: parsing files into an ordered list of assignments.

A fragment is a ``.config``-style file with three directives on top:

- ``include "path"`` inserts another file (relative to the including file's directory);
- ``silent`` / ``endsilent`` mark assignments that are not verified after ``olddefconfig``.

Every error names the file and line it comes from.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qemubox.errors import InputError

STDIN = "-"
STDIN_NAME = "<stdin>"

_NAME = r"[A-Za-z0-9_]+"
_ASSIGN_RE = re.compile(rf"CONFIG_({_NAME})\s*=\s*(.*)$")
_NOT_SET_RE = re.compile(rf"#\s*CONFIG_({_NAME}) is not set\s*$")
_DEC_RE = re.compile(r"-?[0-9]+")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]+")
_DIRECTIVE_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(.*)$")


@dataclass(frozen=True)
class Location:
    """A line of a file, for messages: ``file:line``."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class FragmentError(InputError):
    """A bad line in a fragment; the message starts with ``file:line:``."""

    def __init__(self, location: Location | None, message: str) -> None:
        super().__init__(f"{location}: {message}" if location else message)
        self.location = location


@dataclass(frozen=True)
class Assignment:
    """``CONFIG_<name>=<value>``; ``value`` is in canonical ``.config`` spelling."""

    name: str
    value: str
    location: Location
    silent: bool = False

    @property
    def symbol(self) -> str:
        return f"CONFIG_{self.name}"

    def config_line(self) -> str:
        if self.value == "n":
            return f"# CONFIG_{self.name} is not set"
        return f"CONFIG_{self.name}={self.value}"


# --- values -----------------------------------------------------------------------------------


def quote_string(text: str) -> str:
    """A string value as ``.config`` writes it."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unquote_string(value: str) -> str:
    """The text of a canonical quoted value."""
    out, i = [], 1
    while i < len(value) - 1:
        ch = value[i]
        if ch == "\\":
            i += 1
            ch = value[i]
        out.append(ch)
        i += 1
    return "".join(out)


def _scan_string(text: str, loc: Location) -> tuple[str, str]:
    """Split ``"..."rest`` into (canonical quoted value, rest)."""
    chars: list[str] = []
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text):
                break
            chars.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            return quote_string("".join(chars)), text[i + 1 :]
        chars.append(ch)
        i += 1
    raise FragmentError(loc, 'unterminated string value (missing closing ")')


def _check_trailer(rest: str, loc: Location, what: str) -> None:
    rest = rest.strip()
    if rest and not rest.startswith("#"):
        raise FragmentError(loc, f"unexpected text after {what}: {rest!r}")


def parse_value(raw: str, loc: Location, name: str) -> str:
    """Canonical value of the right-hand side of an assignment (inline comment stripped)."""
    raw = raw.strip()
    if raw.startswith('"'):
        value, rest = _scan_string(raw, loc)
        _check_trailer(rest, loc, f"the value of CONFIG_{name}")
        return value
    value = raw.partition("#")[0]
    parts = value.split()
    if not parts:
        raise FragmentError(loc, f"CONFIG_{name} has no value")
    if len(parts) > 1:
        _check_trailer(" ".join(parts[1:]), loc, f"the value of CONFIG_{name}")
    value = parts[0]
    if value in ("y", "m", "n") or _DEC_RE.fullmatch(value) or _HEX_RE.fullmatch(value):
        return value
    raise FragmentError(
        loc,
        f"invalid value {value!r} for CONFIG_{name} "
        '(expected y, m, n, a decimal or 0x hex number, or a "quoted string")',
    )


# --- files ------------------------------------------------------------------------------------


def _parse_include_target(rest: str, loc: Location) -> str:
    rest = rest.strip()
    if rest.startswith('"'):
        quoted, trailer = _scan_string(rest, loc)
        _check_trailer(trailer, loc, "the include path")
        target = unquote_string(quoted)
    else:
        target = rest.split("#", 1)[0].strip()
        if " " in target or "\t" in target:
            raise FragmentError(loc, 'include path with spaces must be quoted: include "path"')
    if not target:
        raise FragmentError(loc, 'include needs a file name: include "path"')
    return target


@dataclass
class _Frame:
    display: str
    key: str  # identity for cycle detection: a real path, or a pseudo-name
    includes: bool = True  # whether `include` is allowed here


class FragmentReader:
    """Reads fragment files, following includes, into one flat list of assignments."""

    def __init__(
        self,
        resolve: Callable[[str], Path] | None = None,
        stdin_text: Callable[[], str] | None = None,
    ) -> None:
        self._resolve = resolve or (lambda arg: Path(arg))
        self._stdin_text = stdin_text or (lambda: sys.stdin.read())
        self._stack: list[_Frame] = []

    def read(self, args: Sequence[str]) -> list[Assignment]:
        """Assignments of all files, in order; ``-`` is standard input."""
        out: list[Assignment] = []
        stdin_used = False
        for arg in args:
            if arg == STDIN:
                if stdin_used:
                    raise InputError("standard input ('-') can be given only once")
                stdin_used = True
                self._parse_text(
                    self._stdin_text(), _Frame(STDIN_NAME, STDIN, includes=False), None, out
                )
            else:
                path = self._resolve(arg)
                self._parse_file(path, str(path), None, out)
        return out

    def _parse_file(
        self, path: Path, display: str, at: Location | None, out: list[Assignment]
    ) -> None:
        key = os.path.realpath(path)
        for i, frame in enumerate(self._stack):
            if frame.key == key:
                chain = " → ".join([f.display for f in self._stack[i:]] + [display])
                raise FragmentError(at, f"include cycle: {chain}")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FragmentError(at, f"no such file: {display}") from None
        except IsADirectoryError:
            raise FragmentError(at, f"is a directory, not a fragment: {display}") from None
        except UnicodeDecodeError as err:
            raise FragmentError(at, f"{display} is not UTF-8 text ({err.reason})") from None
        except OSError as err:
            raise FragmentError(at, f"cannot read {display}: {err.strerror}") from None
        self._parse_text(text, _Frame(display, key), at, out)

    def _parse_text(
        self, text: str, frame: _Frame, at: Location | None, out: list[Assignment]
    ) -> None:
        self._stack.append(frame)
        try:
            silent = False
            for lineno, line in enumerate(text.split("\n"), start=1):
                loc = Location(frame.display, lineno)
                silent = self._parse_line(line.strip(), loc, frame, silent, out)
        finally:
            self._stack.pop()

    def _parse_line(
        self, line: str, loc: Location, frame: _Frame, silent: bool, out: list[Assignment]
    ) -> bool:
        """Parse one stripped line; returns the silence state after it."""
        if not line:
            return silent
        if line.startswith("#"):
            m = _NOT_SET_RE.fullmatch(line)
            if m:
                out.append(Assignment(m.group(1), "n", loc, silent))
            return silent
        m = _ASSIGN_RE.match(line)
        if m:
            name = m.group(1)
            out.append(Assignment(name, parse_value(m.group(2), loc, name), loc, silent))
            return silent
        if line.startswith("CONFIG_"):
            raise FragmentError(loc, f"expected CONFIG_NAME=value, got {line!r}")
        m = _DIRECTIVE_RE.match(line)
        word, rest = (m.group(1), m.group(2)) if m else (line.split()[0], "")
        if word == "silent":
            _check_trailer(rest, loc, "silent")
            if silent:
                raise FragmentError(loc, "nested 'silent' (already inside a silent block)")
            return True
        if word == "endsilent":
            _check_trailer(rest, loc, "endsilent")
            if not silent:
                raise FragmentError(loc, "'endsilent' without a matching 'silent'")
            return False
        if word == "include":
            self._include(rest, loc, frame, out)
            return silent
        if "=" in line:
            raise FragmentError(loc, f"expected CONFIG_NAME=value, got {line!r}")
        raise FragmentError(loc, f"unknown directive {word!r}")

    def _include(self, rest: str, loc: Location, frame: _Frame, out: list[Assignment]) -> None:
        target = _parse_include_target(rest, loc)
        if not frame.includes:
            where = "standard input" if frame.key == STDIN else "a .config file"
            raise FragmentError(loc, f"include is not allowed in {where}")
        if os.path.isabs(target):
            path, display = Path(target), target
        else:
            path = Path(frame.key).parent / target
            display = os.path.normpath(os.path.join(os.path.dirname(frame.display), target))
        self._parse_file(path, display, loc, out)


def read_fragments(
    args: Iterable[str],
    resolve: Callable[[str], Path] | None = None,
    stdin_text: Callable[[], str] | None = None,
) -> list[Assignment]:
    """Parse fragment files (or ``-``) into their assignments, includes expanded, in order."""
    return FragmentReader(resolve, stdin_text).read(list(args))


def parse_config_text(text: str, display: str) -> list[Assignment]:
    """Parse the text of a ``.config`` (or a fragment without includes)."""
    out: list[Assignment] = []
    reader = FragmentReader()
    reader._parse_text(text, _Frame(display, "<config>", includes=False), None, out)
    return out
