"""The Debian mirror this machine's apt sources name (one-line and deb822 formats)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qemubox.errors import InputError

APT = Path("/etc/apt")


@dataclass(frozen=True)
class Source:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_deb822(text: str) -> list[Source]:
    """The ``deb`` entries of a ``.sources`` file."""
    out = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:  # a continuation
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = tuple(fields.get("suites", "").split())
        components = tuple(fields.get("components", "").split())
        out += [Source(uri, suites, components) for uri in fields.get("uris", "").split()]
    return out


def parse_list(text: str) -> list[Source]:
    """The ``deb`` lines of a one-line-style ``sources.list``."""
    out = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            out.append(Source(words[0], (words[1],), tuple(words[2:])))
    return out


def choose(sources: list[Source], suite: str) -> str | None:
    """The URI to bootstrap ``suite`` from: the first source carrying it with ``main``."""
    for s in sources:
        if suite in s.suites and "main" in s.components:
            return s.uri
    return None


def host_sources(apt: Path = APT) -> list[Source]:
    found = []
    if (apt / "sources.list").is_file():
        found += parse_list((apt / "sources.list").read_text(errors="replace"))
    parts = apt / "sources.list.d"
    if parts.is_dir():
        for f in sorted(parts.iterdir()):
            if f.suffix == ".list":
                found += parse_list(f.read_text(errors="replace"))
            elif f.suffix == ".sources":
                found += parse_deb822(f.read_text(errors="replace"))
    return found


def mirror(suite: str, apt: Path = APT) -> str:
    """The mirror for ``suite`` from the host's apt sources; an error says what to do."""
    uri = choose(host_sources(apt), suite)
    if uri is None:
        raise InputError(
            f"no Debian mirror for {suite} in {apt}/sources.list*: add one "
            f"(deb http://MIRROR/debian {suite} main) or pass --mirror URL"
        )
    return uri
