"""Comparing the wanted values of a merged fragment with a resulting ``.config``."""

from __future__ import annotations

from dataclasses import dataclass

from qemubox.kconfig.fragment import Assignment
from qemubox.kconfig.merge import MergedConfig


@dataclass(frozen=True)
class Mismatch:
    assignment: Assignment
    got: str | None  # None: the symbol is absent from the .config

    @property
    def name(self) -> str:
        return self.assignment.name

    @property
    def wanted(self) -> str:
        return self.assignment.value

    def got_text(self) -> str:
        if self.got is not None:
            return self.got
        return "n" if self.wanted in ("y", "m", "n") else "(not set)"

    def __str__(self) -> str:
        return f"CONFIG_{self.name}: wanted {self.wanted}, got {self.got_text()}"


def _number(value: str) -> int | None:
    try:
        return int(value, 0) if value.lower().startswith(("0x", "-0x")) else int(value, 10)
    except ValueError:
        return None


def values_equal(wanted: str, got: str | None) -> bool:
    """Whether a wanted value holds; an absent symbol counts as ``n``."""
    if got is None:
        return wanted == "n"
    if wanted == got:
        return True
    a, b = _number(wanted), _number(got)
    return a is not None and a == b


def verify(merged: MergedConfig, actual: dict[str, str]) -> list[Mismatch]:
    """Every non-silent assignment whose value did not stick, in fragment order."""
    return [
        Mismatch(a, actual.get(a.name))
        for a in merged.verified()
        if not values_equal(a.value, actual.get(a.name))
    ]
