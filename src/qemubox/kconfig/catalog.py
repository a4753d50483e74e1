"""Fragments shipped with qemubox, and how a command-line argument names a fragment."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from qemubox.errors import InputError


@dataclass(frozen=True)
class ShippedFragment:
    name: str
    path: Path
    summary: str


def _fragment_dir() -> Path:
    return Path(str(resources.files("qemubox.kconfig") / "fragments"))


def shipped_fragments() -> dict[str, ShippedFragment]:
    """The shipped fragments by name (file name without ``.config``)."""
    out = {}
    for path in sorted(_fragment_dir().glob("*.config")):
        summary = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("# ") and "CONFIG_" not in line:
                summary = line[2:].strip()
                break
        out[path.stem] = ShippedFragment(path.stem, path, summary)
    return out


def resolve_fragment(arg: str) -> Path:
    """A fragment argument: an existing path, else the name of a shipped fragment."""
    path = Path(arg)
    if path.exists():
        return path
    shipped = shipped_fragments()
    name = arg.removesuffix(".config")
    if "/" not in arg and name in shipped:
        return shipped[name].path
    raise InputError(
        f"no such fragment: {arg} (not a file, nor one of the shipped fragments: "
        f"{', '.join(shipped)})"
    )
