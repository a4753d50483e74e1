"""Merging assignments: the later assignment wins, first appearance fixes the order."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from qemubox.kconfig.fragment import Assignment


@dataclass(frozen=True)
class MergedConfig:
    """The result of merging fragments.

    ``entries`` maps a symbol name to its winning assignment, in the order in which the
    symbols first appeared; ``last_order`` lists the names by their last assignment, which
    is the order that ``merge_config.sh`` leaves in the file it hands to ``olddefconfig``
    (and that matters there: of two ``=y`` members of one choice, the later one wins).
    """

    entries: dict[str, Assignment]
    last_order: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> Assignment:
        return self.entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def values(self) -> dict[str, str]:
        return {name: a.value for name, a in self.entries.items()}

    def verified(self) -> list[Assignment]:
        """The assignments that must hold after ``olddefconfig`` (not silenced)."""
        return [a for a in self.entries.values() if not a.silent]

    def text(self) -> str:
        """Canonical ``.config`` text in first-appearance order."""
        return "".join(a.config_line() + "\n" for a in self.entries.values())

    def kernel_input_text(self) -> str:
        """``.config`` text in last-assignment order, as ``merge_config.sh -m`` leaves it."""
        return "".join(self.entries[n].config_line() + "\n" for n in self.last_order)


def merge(assignments: Iterable[Assignment]) -> MergedConfig:
    """Merge assignments in order; each symbol takes its last value (and silence flag)."""
    entries: dict[str, Assignment] = {}
    last: dict[str, None] = {}
    for a in assignments:
        entries[a.name] = a  # an existing key keeps its position: first appearance
        last.pop(a.name, None)
        last[a.name] = None  # re-inserted at the end: last assignment
    return MergedConfig(entries, tuple(last))
