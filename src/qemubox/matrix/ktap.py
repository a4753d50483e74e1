"""KTAP, the kernel's test output format (kunit, kselftest; TAP 13 as older kunit wrote it):
results as a tree of subtests. Only what a summary needs is read: each test's number,
name, result (ok / not ok / SKIP / TODO), its subtests, nested by indentation, and a leaf
test's log (what it printed before its result: a failed expectation's lines). Also: the KTAP
document in a kernel log (KUnit's results, as the boot printed them)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HEADER = re.compile(r"^\s*(KTAP|TAP) version \d+\s*$")
_PLAN = re.compile(r"^\s*1\.\.(\d+)")
_RESULT = re.compile(r"^(\s*)(not ok|ok)\s+(\d+)\s*(?:-\s*)?([^#]*?)\s*(?:#\s*(.*))?$")
_STRUCTURE = re.compile(r"^\s*(?:(?:K?TAP version \d+)|1\.\.\d+|# Subtest:.*)\s*$")
_VERSION = re.compile(r"K?TAP version \d+")
LOG_KEEP = 64  # lines of a test's log kept


@dataclass
class Subtest:
    name: str
    status: str  # pass, fail, skip
    number: int
    subtests: list[Subtest] = field(default_factory=list)
    directive: str = ""
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {
            "name": self.name,
            "status": self.status,
            "subtests": [s.to_dict() for s in self.subtests],
        }
        if self.log:
            out["log"] = self.log
        return out

    def flat(self, prefix: str = "") -> list[tuple[str, str]]:
        """(path, status) of this test and every subtest below it, paths joined by '.'."""
        path = f"{prefix}.{self.name}" if prefix else self.name
        out = [(path, self.status)]
        for s in self.subtests:
            out += s.flat(path)
        return out


def is_ktap(text: str) -> bool:
    """Whether output is KTAP/TAP: its first non-blank line is a version header."""
    for line in text.splitlines():
        if line.strip():
            return bool(_HEADER.match(line))
    return False


def _status(word: str, directive: str) -> str:
    d = directive.strip().upper()
    if d.startswith("SKIP"):
        return "skip"
    if d.startswith("TODO") or word == "ok":
        return "pass"
    return "fail"


def parse(text: str) -> list[Subtest]:
    """The top-level tests of a KTAP document, each with its subtests. A result line closes
    the tests collected at deeper indentation since the previous result at its level."""
    pending: dict[int, list[Subtest]] = {}  # indentation -> results seen, not yet adopted
    top: list[Subtest] = []
    said: list[str] = []  # lines since the last result line
    for raw in text.splitlines():
        line = raw.replace("\t", "    ").rstrip()
        m = _RESULT.match(line)
        if not m:
            if _STRUCTURE.match(line):
                said = []
            elif line.strip():
                said.append(line.strip())
            continue
        indent = len(m.group(1))
        directive = m.group(5) or ""
        name = m.group(4).strip() or f"test {m.group(3)}"
        test = Subtest(name, _status(m.group(2), directive), int(m.group(3)), [], directive)
        deeper = sorted(i for i in pending if i > indent)
        if not deeper:
            test.log = said[-LOG_KEEP:]
        said = []
        if deeper:
            test.subtests = pending.pop(deeper[0])
            for i in deeper[1:]:  # orphans of a broken nesting: keep them under this one
                test.subtests += pending.pop(i)
        pending.setdefault(indent, []).append(test)
    if pending:
        top = pending.pop(min(pending))
        for rest in pending.values():
            top += rest
    return top


def of_kernel_log(log: str) -> str:
    """The KTAP document in a kernel log (dmesg, a console): from its first version line on,
    each line without what came before that version line on its own (a timestamp), as
    kunit.py reads it; "" when there is none."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = _VERSION.search(line)
        if m:
            cut = m.start()
            return "\n".join(ln[cut:] for ln in lines[i:]) + "\n"
    return ""


def failed(tests: list[Subtest]) -> bool:
    return any(t.status == "fail" or failed(t.subtests) for t in tests)
