"""An image's run-time configuration (the OCI image config's ``config``), and how it applies
to a command as ``docker run`` applies it: ``Env`` under the command's own variables,
``WorkingDir`` unless one is given, ``User`` (a name looked up in the root's
``/etc/passwd`` and ``/etc/group``, or ``uid[:gid]``), ``Entrypoint`` + ``Cmd``. Pure."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qemubox.errors import InputError

MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to the kernel


@dataclass(frozen=True)
class ImageConfig:
    env: tuple[str, ...] = ()  # KEY=VALUE
    workdir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    architecture: str = ""
    variant: str = ""
    os: str = "linux"

    @classmethod
    def from_oci(cls, blob: dict) -> ImageConfig:
        """From an OCI (or Docker) image config blob; a malformed one is one line."""
        if not isinstance(blob, dict):
            raise InputError("the image config is not a JSON object")
        c = blob.get("config") or {}
        if not isinstance(c, dict):
            raise InputError("the image config's 'config' is not a JSON object")

        def strings(key: str) -> tuple[str, ...] | None:
            value = c.get(key)
            if value is None:
                return None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InputError(f"the image config's {key} is not a list of strings")
            return tuple(value)

        def text(value: object, key: str) -> str:
            if value is None:
                return ""
            if not isinstance(value, str):
                raise InputError(f"the image config's {key} is not a string")
            return value

        return cls(
            env=strings("Env") or (),
            workdir=text(c.get("WorkingDir"), "WorkingDir"),
            user=text(c.get("User"), "User"),
            entrypoint=strings("Entrypoint"),
            cmd=strings("Cmd"),
            architecture=text(blob.get("architecture"), "architecture"),
            variant=text(blob.get("variant"), "variant"),
            os=text(blob.get("os"), "os") or "linux",
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ImageConfig:
        def seq(v):
            return None if v is None else tuple(v)

        return cls(
            env=tuple(data.get("env", ())),
            workdir=data.get("workdir", ""),
            user=data.get("user", ""),
            entrypoint=seq(data.get("entrypoint")),
            cmd=seq(data.get("cmd")),
            architecture=data.get("architecture", ""),
            variant=data.get("variant", ""),
            os=data.get("os", "linux"),
        )

    def environment(self) -> dict[str, str]:
        out = {}
        for item in self.env:
            key, _, value = item.partition("=")
            if key:
                out[key] = value
        return out


def command(
    config: ImageConfig | None, args: tuple[str, ...], entrypoint: str | None = None
) -> tuple[str, ...]:
    """The argv ``docker run [--entrypoint E] IMAGE [ARGS]`` runs: ARGS replace ``Cmd``;
    ``Entrypoint`` stays before them unless overridden (an override also drops ``Cmd``,
    and ``""`` clears the entrypoint)."""
    config = config or ImageConfig()
    if entrypoint is not None:
        head: tuple[str, ...] = (entrypoint,) if entrypoint else ()
        tail = args
    else:
        head = config.entrypoint or ()
        tail = args or config.cmd or ()
    argv = head + tail
    if not argv:
        raise InputError("no command given, and the image has no Entrypoint or Cmd to run")
    return argv


@dataclass(frozen=True)
class Identity:
    """Whom a command runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    home: str = "/"

    def to_tuple(self) -> tuple[int, int, tuple[int, ...]]:
        return self.uid, self.gid, self.groups


def _records(text: str, fields: int) -> list[list[str]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) >= fields:
            out.append(parts)
    return out


def _number(text: str, what: str) -> int:
    if not text.isdigit() or int(text) > MAX_ID:
        raise InputError(f"user {what!r}: expected a name or a number up to {MAX_ID}")
    return int(text)


def resolve_user(spec: str, passwd: str, group: str) -> Identity:
    """``spec`` (``NAME``, ``UID``, ``NAME:GROUP``, ``UID:GID``; ``""`` is root) as ids, from
    the root's ``passwd`` and ``group`` files' text; a name not there is one line."""
    user, _, grp = spec.partition(":")
    if not user and not grp:
        user = "0"
    users = _records(passwd, 7)
    if user.isdigit():
        uid = _number(user, spec)
        entry = next((u for u in users if u[2] == user), None)
    else:
        entry = next((u for u in users if u[0] == user), None)
        if entry is None and user == "root":  # a root with no /etc/passwd still has root
            entry = ["root", "x", "0", "0", "", "/root", ""]
        if entry is None:
            raise InputError(f"user {user!r} is not in the image's /etc/passwd")
        uid = _number(entry[2], entry[0])
    gid = _number(entry[3], entry[0]) if entry and entry[3].isdigit() else 0
    home = entry[5] if entry and entry[5] else "/"
    groups_file = _records(group, 4)
    if grp:
        if grp.isdigit():
            gid = _number(grp, spec)
        else:
            found = next((g for g in groups_file if g[0] == grp), None)
            if found is None:
                raise InputError(f"group {grp!r} is not in the image's /etc/group")
            gid = _number(found[2], grp)
        extra: tuple[int, ...] = ()
    else:
        name = entry[0] if entry else None
        extra = tuple(
            sorted(
                {
                    int(g[2])
                    for g in groups_file
                    if name and g[2].isdigit() and name in g[3].split(",") and int(g[2]) != gid
                }
            )
        )
    return Identity(uid, gid, (gid, *extra), home)
