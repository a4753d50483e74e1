"""Egress rules: which names and addresses a guest may reach, as plain data with pure
verdicts. The one home of the rules' notation (``allow=LIST``, ``deny=LIST``, ``NAME:IP``),
of which addresses need naming, and of what ``--net user`` refuses.

A LIST item is an exact name (``pypi.org``), a wildcard (``*.pythonhosted.org``: any name
below it, not the name itself), an IPv4 or IPv6 address, or a CIDR range. ``allow`` refuses
everything not listed; ``deny`` allows everything not listed. In both, an address that is not
global (loopback, private, link-local, the cloud metadata address, ...) is reached only when
the user named it: an allow item covering it, or a ``--add-host`` pin of the name.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from qemubox.errors import InputError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MODES = ("allow", "deny")
# The cloud metadata services: refused under --net user too, unless listed.
METADATA = ("169.254.169.254", "fd00:ec2::254")
MAX_ITEMS = 1000
MAX_HOSTS = 1000
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\Z")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str  # the item that decided, or why nothing did

    def __bool__(self) -> bool:
        return self.allowed


def address(text: str) -> Address:
    """An address as rules compare it: an IPv4-mapped IPv6 address is its IPv4 address."""
    addr = ipaddress.ip_address(text.strip("[]"))
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def needs_naming(addr: Address) -> bool:
    """Whether ``addr`` is reached only when the user named it: anything not global."""
    return not addr.is_global or addr.is_multicast


def _name(text: str, what: str) -> str:
    name = text.strip().lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise InputError(f"{what}: {text!r} is not a host name")
    return name


def _item(text: str) -> str:
    """One LIST item, checked and normalised (names lower case, ranges as networks)."""
    item = text.strip()
    if not item:
        raise InputError("egress rule: an empty item (two commas, or a trailing one?)")
    if item == "*":
        raise InputError("egress rule '*' lists every name: use --net user or deny=LIST")
    if item.startswith("*."):
        return "*." + _name(item[2:], f"egress rule {item!r}") if item[2:] else _bad(item)
    if "/" in item:
        try:
            return str(ipaddress.ip_network(item, strict=False))
        except ValueError:
            return _bad(item)
    try:
        return str(address(item))
    except ValueError:
        pass
    if item[:1].isdigit() and item.replace(".", "").isdigit():
        return _bad(item)  # 300.1.1.1: an address out of range, not a name
    return _name(item, "egress rule")


def _bad(item: str) -> str:
    raise InputError(
        f"egress rule {item!r}: expected a name, *.suffix, an IP address or a CIDR range"
    )


def host_pin(text: str) -> tuple[str, str]:
    """``NAME:IP`` (Docker's --add-host): a name the guest and the rules resolve to IP."""
    name, sep, ip = text.partition(":")
    if not sep or not ip:
        raise InputError(f"--add-host {text!r}: expected NAME:IP")
    try:
        return _name(name, f"--add-host {text!r}"), str(address(ip))
    except ValueError:
        raise InputError(f"--add-host {text!r}: {ip!r} is not an IP address") from None


@dataclass(frozen=True)
class Egress:
    """A guest's egress rules: ``mode`` (allow or deny), its items (normalised), and the
    names pinned to addresses (``--add-host``)."""

    mode: str
    items: tuple[str, ...]
    hosts: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"egress mode must be allow or deny, not {self.mode!r}")
        if len(self.items) > MAX_ITEMS or len(self.hosts) > MAX_HOSTS:
            raise InputError(f"egress rules: at most {MAX_ITEMS} items and {MAX_HOSTS} pins")

    @classmethod
    def parse(cls, mode: str, items: str | list[str] | tuple[str, ...], hosts=()) -> Egress:
        """Rules from the user's text: ``items`` as a comma-separated LIST or a list;
        ``hosts`` as ``NAME:IP`` strings or pairs. One-line InputError on a bad one."""
        parts = items.split(",") if isinstance(items, str) else list(items)
        if not parts or parts == [""]:
            raise InputError(f"{mode}= needs a name, *.suffix, address or range to {mode}")
        pins = tuple(host_pin(h) if isinstance(h, str) else host_pin(":".join(h)) for h in hosts)
        return cls(mode, tuple(dict.fromkeys(_item(p) for p in parts)), pins)

    # --- the items by kind ------------------------------------------------------------------

    def _names(self) -> list[str]:
        return [i for i in self.items if not _is_network(i)]

    def _networks(self) -> list[tuple[str, Network]]:
        return [(i, ipaddress.ip_network(i)) for i in self.items if _is_network(i)]

    def _name_match(self, name: str) -> str | None:
        for item in self._names():
            if item == name or (item.startswith("*.") and name.endswith(item[1:])):
                return item
        return None

    def _network_match(self, addr: Address) -> str | None:
        for item, net in self._networks():
            if addr.version == net.version and addr in net:
                return item
        return None

    def pinned(self, name: str) -> tuple[str, ...]:
        """The addresses ``--add-host`` pins ``name`` to (none: it is resolved)."""
        return tuple(ip for n, ip in self.hosts if n == name)

    # --- verdicts ---------------------------------------------------------------------------

    def name_verdict(self, name: str) -> Verdict:
        """Whether the guest may reach ``name`` at all (its addresses are judged apart)."""
        match = self._name_match(name.lower().rstrip("."))
        if self.mode == "allow":
            return Verdict(True, match) if match else Verdict(False, "not in the allow list")
        return Verdict(False, match) if match else Verdict(True, "not in the deny list")

    def address_verdict(self, addr: Address, name: str | None = None) -> Verdict:
        """Whether the guest may connect to ``addr``: reached by ``name`` (already allowed
        by :meth:`name_verdict`, and resolved to ``addr`` on the host), or as an address
        literal when ``name`` is None."""
        addr = address(str(addr))
        match = self._network_match(addr)
        pinned = name is not None and str(addr) in self.pinned(name)
        if self.mode == "deny" and match:
            return Verdict(False, match)
        if self.mode == "allow" and match:
            return Verdict(True, match)
        if pinned:
            return Verdict(True, f"--add-host {name}:{addr}")
        if needs_naming(addr):
            return Verdict(False, "a non-global address, not listed")
        if name is not None:
            return Verdict(True, self.name_verdict(name).rule)
        if self.mode == "allow":
            return Verdict(False, "not in the allow list")
        return Verdict(True, "not in the deny list")

    # --- as data ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "items": list(self.items),
            "hosts": [list(h) for h in self.hosts],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Egress:
        return cls.parse(data["mode"], list(data["items"]), [tuple(h) for h in data["hosts"]])

    def notation(self) -> str:
        """As ``--net`` takes it."""
        return f"{self.mode}={','.join(self.items)}"


def _is_network(item: str) -> bool:
    return "/" in item or ":" in item or item.replace(".", "").isdigit()


def user_verdict(addr: Address) -> Verdict:
    """``--net user``: everything but the cloud metadata services."""
    addr = address(str(addr))
    if str(addr) in METADATA:
        return Verdict(False, "the cloud metadata address, under --net user")
    return Verdict(True, "--net user")


def parse_network(value: str, hosts=()) -> tuple[str, Egress | None]:
    """``--net``'s value: none, restricted or user (no rules), or ``allow=LIST`` /
    ``deny=LIST`` with their rules. ``hosts``: --add-host pins, which need rules."""
    mode, sep, items = value.partition("=")
    if not sep:
        if value not in ("none", "restricted", "user"):
            raise InputError(
                f"network must be none, restricted, user, allow=LIST or deny=LIST, not {value!r}"
            )
        if hosts:
            raise InputError("--add-host pins names for egress rules: use --net allow= or deny=")
        return value, None
    if mode not in MODES:
        raise InputError(f"network {value!r}: expected allow=LIST or deny=LIST")
    return mode, Egress.parse(mode, items, hosts)
