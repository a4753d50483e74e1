"""Where an image comes from, as ``skopeo`` names it: ``oci-archive:PATH``,
``docker-archive:PATH``, ``oci:DIR[:TAG]``, ``containers-storage:NAME``,
``docker-daemon:NAME``. No registry: every transport reads what is on this machine.
Pure but for looking at the paths named."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qemubox.errors import InputError

# transport -> what follows its colon
TRANSPORTS = {
    "oci-archive": "an OCI image layout in a tar file",
    "docker-archive": "a `docker save` tar file",
    "oci": "an OCI image layout directory, and a tag (DIR:TAG)",
    "containers-storage": "an image of podman's or buildah's local storage",
    "docker-daemon": "an image of the local Docker daemon",
}
REGISTRIES = ("docker", "registry", "atomic")
UNSUPPORTED = ("dir", "ostree", "sif", "tarball")  # skopeo's, meant as transports here too
DOCKER_SOCKET = Path("/var/run/docker.sock")
_PREFIX = re.compile(r"([a-z][a-z0-9-]*):(.*)", re.S)
MAX_REFERENCE = 4096


@dataclass(frozen=True)
class Reference:
    transport: str
    target: str  # an absolute path, or an image name for the storage transports
    tag: str = ""  # oci:'s

    def skopeo(self) -> str:
        """The name skopeo reads it by."""
        return f"{self.transport}:{self.target}" + (f":{self.tag}" if self.tag else "")

    def __str__(self) -> str:
        return self.skopeo()


def looks_like(text: str) -> bool:
    """Whether ``text`` is meant as a transport reference (rather than an image name or
    an image file's path)."""
    m = _PREFIX.fullmatch(text)
    return bool(m) and m.group(1) in (*TRANSPORTS, *REGISTRIES, *UNSUPPORTED)


def parse(text: str, cwd: Path | None = None) -> Reference:
    """``text`` as a reference; a one-line error names what is wrong with it."""
    if len(text) > MAX_REFERENCE:
        raise InputError(f"image reference of {len(text)} characters (at most {MAX_REFERENCE})")
    m = _PREFIX.fullmatch(text)
    if not m or m.group(1) not in TRANSPORTS:
        word = m.group(1) if m else text
        extra = " (qemubox reads no registry)" if word in REGISTRIES else ""
        raise InputError(
            f"image {text!r}: unknown transport {word!r}{extra}; "
            f"known: {', '.join(t + ':' for t in TRANSPORTS)}"
        )
    transport, rest = m.groups()
    if not rest or "\0" in rest or "\n" in rest:
        raise InputError(f"image {text!r}: nothing after {transport}:")
    base = cwd or Path.cwd()
    if transport in ("oci-archive", "docker-archive"):
        path = (base / Path(rest).expanduser()).resolve()
        if not path.is_file():
            raise InputError(f"image {text!r}: {path}: no such file")
        return Reference(transport, str(path))
    if transport == "oci":
        directory, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
        path = (base / Path(directory).expanduser()).resolve()
        if not (path / "oci-layout").is_file():
            raise InputError(f"image {text!r}: {path} is not an OCI image layout (no oci-layout)")
        return Reference(transport, str(path), tag)
    if transport == "docker-daemon" and not DOCKER_SOCKET.exists():
        raise InputError(f"image {text!r}: no Docker daemon here ({DOCKER_SOCKET} is missing)")
    return Reference(transport, rest)
