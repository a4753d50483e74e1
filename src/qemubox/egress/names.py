"""The guest's view of names under egress rules: each allowed name answers with an address
of its own from a private pool, which the proxy maps back to the name and to the addresses
the name resolved to on the host (pinned: a connection goes only there). Pure, apart from
the resolving function it is given."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from qemubox.model.egress import Address, Egress, Verdict, address

POOL = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544's benchmarking range: never a real peer
TTL = 30
MAX_NAMES = POOL.num_addresses - 2


@dataclass(frozen=True)
class Answer:
    """What the resolver answered, and the verdict behind it (for the log)."""

    wire: bytes
    name: str
    verdict: Verdict | None  # None: nothing to decide (a malformed or empty query)
    addresses: tuple[str, ...] = ()


class Names:
    """Names the guest looked up: the pool address each one got, what it resolved to."""

    def __init__(self) -> None:
        self._fake: dict[str, Address] = {}
        self._name: dict[Address, str] = {}
        self._resolved: dict[str, tuple[Address, ...]] = {}

    def give(self, name: str, resolved: tuple[Address, ...]) -> Address:
        """The pool address of ``name`` (the same for its life), now resolving to
        ``resolved``."""
        self._resolved[name] = resolved
        if name not in self._fake:
            if len(self._fake) >= MAX_NAMES:
                raise OverflowError("every pool address is taken")
            fake = POOL[len(self._fake) + 1]
            self._fake[name], self._name[fake] = fake, name
        return self._fake[name]

    def name_of(self, addr: Address) -> str | None:
        return self._name.get(addr)

    def resolved(self, name: str) -> tuple[Address, ...]:
        return self._resolved.get(name, ())


def targets(rules: Egress, name: str, resolved: tuple[Address, ...]) -> tuple[list[Address], str]:
    """The addresses of ``name`` a connection may go to under ``rules``, with the rule that
    decided (when none may: why)."""
    verdict = rules.name_verdict(name)
    if not verdict:
        return [], verdict.rule
    verdicts = [(a, rules.address_verdict(a, name)) for a in resolved]
    allowed = [a for a, v in verdicts if v]
    if allowed:
        return allowed, next(v.rule for _, v in verdicts if v)
    return [], verdicts[0][1].rule if verdicts else "it does not resolve"


async def answer(
    wire: bytes,
    rules: Egress,
    names: Names,
    resolve: Callable[[str], Awaitable[tuple[Address, ...]]],
) -> Answer | None:
    """The answer to a DNS query from the guest, under ``rules``: an allowed name's A record
    is its pool address; a refused name (or one whose every address is refused) does not
    exist; other record types of an allowed name are empty (AAAA too: the pool is IPv4).
    None: not a query worth an answer."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # dnspython's errors share no base; anything malformed is dropped
        return None
    if query.flags & dns.flags.QR or len(query.question) != 1:
        return None
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    pinned = tuple(address(a) for a in rules.pinned(name))
    resolved: tuple[Address, ...] = ()
    if rules.name_verdict(name):  # a refused name is not looked up at all
        resolved = pinned or await resolve(name)
    allowed, rule = targets(rules, name, resolved)
    if not allowed:
        response.set_rcode(dns.rcode.NXDOMAIN)
        verdict = Verdict(False, rule)
    else:
        verdict = Verdict(True, rule)
        if question.rdtype == dns.rdatatype.A:
            try:
                fake = names.give(name, resolved)
            except OverflowError:
                response.set_rcode(dns.rcode.SERVFAIL)
            else:
                response.answer.append(
                    dns.rrset.from_text(question.name, TTL, "IN", "A", str(fake))
                )
    shown = tuple(str(a) for a in (allowed or resolved))
    return Answer(response.to_wire(), name, verdict, shown)
