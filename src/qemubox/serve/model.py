"""What the E2B API says of a sandbox, as plain data: the create request checked field by
field (a bad one is a :class:`BadRequest` naming it), the record kept with the sandbox, and
the JSON shapes of E2B's ``spec/openapi.yml`` made from it. Pure: no VM, no file."""

from __future__ import annotations

import secrets
import string
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

ENVD_VERSION = "0.5.7"  # the envd features offered (default user, close stdin, octet-stream)
ENVD_PORT = 49983
DEFAULT_TEMPLATE = "base"
DEFAULT_TIMEOUT = 15  # seconds, as E2B's
MAX_TIMEOUT = 24 * 3600
MAX_METADATA = 64  # entries; each key 256 and value 1024 characters at most
MAX_ENV = 256
ID_CHARS = string.ascii_lowercase + string.digits
ID_LENGTH = 20
CLIENT_ID = "qemubox"
DEFAULT_USER = "user"  # whom envd runs a command as when the request names nobody
STATES = ("running", "paused")


class BadRequest(ValueError):
    """A request that cannot be carried out as written: 400 and this message."""


def new_id() -> str:
    return "".join(secrets.choice(ID_CHARS) for _ in range(ID_LENGTH))


def new_token() -> str:
    return secrets.token_urlsafe(24)


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def parse_time(text: str, name: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise BadRequest(f"{name}: not an RFC 3339 time: {text[:64]!r}") from None


def timeout_of(value, name: str = "timeout", default: int | None = DEFAULT_TIMEOUT) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name}: expected a whole number of seconds, got {value!r}")
    if not 0 <= value <= MAX_TIMEOUT:
        raise BadRequest(f"{name}: {value} is out of range (0 to {MAX_TIMEOUT} seconds)")
    return value


def _strings(value, name: str, most: int) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{name}: expected an object of strings")
    if len(value) > most:
        raise BadRequest(f"{name}: {len(value)} entries, at most {most}")
    for k, v in value.items():
        if not isinstance(v, str) or not k or len(k) > 256 or len(v) > 1024:
            raise BadRequest(f"{name}.{k[:64]}: expected a string of at most 1024 characters")
    return dict(value)


def network_of(allow_internet, network) -> str:
    """qemubox's network for E2B's ``allow_internet_access`` and ``network`` (allowOut,
    denyOut): ``user``, ``none``, or egress rules."""
    if allow_internet is not None and not isinstance(allow_internet, bool):
        raise BadRequest("allow_internet_access: expected true or false")
    if network is None:
        return "none" if allow_internet is False else "user"
    if not isinstance(network, dict):
        raise BadRequest("network: expected an object")
    lists = {}
    for key in ("allowOut", "denyOut"):
        items = network.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
            raise BadRequest(f"network.{key}: expected a list of addresses or names")
        if any("," in i or "=" in i for i in items):
            raise BadRequest(f"network.{key}: an entry holds ',' or '='")
        lists[key] = items
    allow, deny = lists["allowOut"], lists["denyOut"]
    if allow_internet is False or "0.0.0.0/0" in deny:
        return "allow=" + ",".join(allow) if allow else "none"
    return "deny=" + ",".join(deny) if deny else "user"


@dataclass(frozen=True)
class CreateRequest:
    template: str
    timeout: int
    metadata: dict[str, str]
    env: dict[str, str]
    secure: bool
    network: str
    allow_internet: bool | None
    auto_pause: bool
    public_traffic: bool = True  # its ports open to anyone who knows its id (E2B's default)

    @classmethod
    def parse(cls, body, always_secure: bool = False) -> CreateRequest:
        """E2B's ``NewSandbox`` (``always_secure``: ``NewSandboxV2``, whose sandboxes all
        have an access token)."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        template = body.get("templateID")
        if not isinstance(template, str) or not template:
            raise BadRequest("templateID: expected a template's name")
        secure = body.get("secure", False)
        auto_pause = body.get("autoPause", False)
        for name, value in (("secure", secure), ("autoPause", auto_pause)):
            if not isinstance(value, bool):
                raise BadRequest(f"{name}: expected true or false")
        allow = body.get("allow_internet_access")
        network = body.get("network")
        public = network.get("allowPublicTraffic") if isinstance(network, dict) else None
        if public is not None and not isinstance(public, bool):
            raise BadRequest("network.allowPublicTraffic: expected true or false")
        return cls(
            template=template,
            timeout=timeout_of(body.get("timeout")),
            metadata=_strings(body.get("metadata"), "metadata", MAX_METADATA),
            env=_strings(body.get("envVars"), "envVars", MAX_ENV),
            secure=secure or always_secure,
            network=network_of(allow, network),
            allow_internet=allow,
            auto_pause=auto_pause,
            public_traffic=public is not False,
        )


@dataclass
class Served:
    """One sandbox as the API knows it; kept in its named record (``served``)."""

    id: str
    owner: str  # the name of the key that made it
    template: str
    started: float
    timeout: int
    metadata: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    token: str | None = None  # envd's access token, for a secure sandbox
    traffic_token: str | None = None  # its ports' token, when not open to anyone
    allow_internet: bool | None = None
    auto_pause: bool = False
    cpus: int = 1
    memory_mb: int = 512
    disk_mb: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Served:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def created(self, deadline: float | None = None) -> dict:
        """E2B's ``Sandbox`` (what create and connect answer)."""
        out = {
            "templateID": self.template,
            "sandboxID": self.id,
            "alias": self.template,
            "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION,
            "domain": None,
            "trafficAccessToken": self.traffic_token,
        }
        if self.token:
            out["envdAccessToken"] = self.token
        return out

    def listed(self, state: str, deadline: float | None) -> dict:
        """E2B's ``ListedSandbox``."""
        return {
            "templateID": self.template,
            "alias": self.template,
            "sandboxID": self.id,
            "clientID": CLIENT_ID,
            "startedAt": rfc3339(self.started),
            "endAt": rfc3339(deadline if deadline is not None else self.started),
            "cpuCount": self.cpus,
            "memoryMB": self.memory_mb,
            "diskSizeMB": self.disk_mb,
            "metadata": self.metadata,
            "state": state,
            "envdVersion": ENVD_VERSION,
        }

    def detail(self, state: str, deadline: float | None) -> dict:
        """E2B's ``SandboxDetail``."""
        out = self.listed(state, deadline)
        out["allowInternetAccess"] = self.allow_internet
        out["domain"] = None
        if self.token:
            out["envdAccessToken"] = self.token
        return out


def metadata_query(text: str | None) -> dict[str, str]:
    """``?metadata=k%3Dv%26k2%3Dv2`` (already URL-decoded once) as a dict."""
    from urllib.parse import parse_qsl

    if not text:
        return {}
    try:
        return dict(parse_qsl(text, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        raise BadRequest(f"metadata: key=value pairs joined by '&', not {text!r}") from None


def states_query(values: list[str]) -> set[str]:
    wanted = {s for v in values for s in v.split(",") if s}
    for s in wanted:
        if s not in STATES:
            raise BadRequest(f"state: {s!r} is not one of running, paused")
    return wanted or set(STATES)


def limit_query(text: str | None, default: int = 100, most: int = 100) -> int:
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= most:
        raise BadRequest(f"limit: expected 1 to {most}, got {text!r}")
    return int(text)
