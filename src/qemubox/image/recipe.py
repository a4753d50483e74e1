"""An image recipe: everything that decides a built Debian root, as plain data. Its key
names the built image in the cache: same inputs, same image, built once."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

from qemubox.errors import InputError

# Bumped whenever the build steps change what comes out.
BUILD_VERSION = 1
DEFAULT_SUITE = "bookworm"
BASE_PACKAGES = ("ca-certificates", "python3")
# The ``base`` image: what E2B's base template offers a command (the SDKs run commands with
# ``/bin/bash -l -c`` as ``user``, who may sudo).
E2B_BASE_PACKAGES = ("bash", "ca-certificates", "curl", "python3", "sudo")
E2B_USER = "user"
# Debian policy: lower case letters, digits, '+', '-', '.'; at least two; a letter or digit
# first.
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")


@dataclass(frozen=True)
class Recipe:
    suite: str
    arch: str  # Debian's name: amd64, arm64
    packages: tuple[str, ...]  # sorted, each once; besides debootstrap's minbase
    distribution: str = "debian"
    users: tuple[str, ...] = ()  # accounts made with a home and passwordless sudo

    def key(self) -> str:
        data = {**asdict(self), "build": BUILD_VERSION}
        if not self.users:  # recipes from before users were a field keep their keys
            del data["users"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def with_packages(self, more: tuple[str, ...]) -> Recipe:
        packages = tuple(sorted({*self.packages, *more}))
        return Recipe(self.suite, self.arch, packages, self.distribution, self.users)

    def to_dict(self) -> dict:
        data = {**asdict(self), "packages": list(self.packages), "users": list(self.users)}
        if not self.users:
            del data["users"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        try:
            return cls(
                suite=data["suite"],
                arch=data["arch"],
                packages=tuple(data["packages"]),
                distribution=data.get("distribution", "debian"),
                users=tuple(data.get("users", ())),
            )
        except (KeyError, TypeError) as err:
            raise InputError(f"a malformed image recipe: {err}") from None


def debian(arch: str, suite: str = DEFAULT_SUITE) -> Recipe:
    """The ``debian`` image: minbase with Python and CA certificates."""
    return Recipe(suite, arch, tuple(sorted(BASE_PACKAGES)))


def e2b_base(arch: str, suite: str = DEFAULT_SUITE) -> Recipe:
    """The ``base`` image: bash, curl, python3 and a user ``user`` (home ``/home/user``,
    passwordless sudo), as E2B's base template is."""
    return Recipe(suite, arch, tuple(sorted(E2B_BASE_PACKAGES)), users=(E2B_USER,))


def parse_packages(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``a,b c`` (or a list) as Debian package names; a bad name is an error naming it."""
    items = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    for name in items:
        if not isinstance(name, str) or not _PACKAGE_RE.fullmatch(name):
            raise InputError(
                f"invalid package name {name!r}: lower-case letters, digits, '+', '-', '.'"
            )
    return tuple(sorted(set(items)))
