"""Egress rules as pure functions: the notation, the verdicts on names and addresses, the
resolver's answers, what a connection's first bytes ask for, the proxy's decisions and what
QEMU is started with. No QEMU, no packet."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from dataclasses import replace

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from helpers import qemubox
from qemubox.egress import launch, names, proxy
from qemubox.egress.sniff import sniff
from qemubox.errors import InputError
from qemubox.model.egress import METADATA, Egress, address, parse_network, user_verdict
from qemubox.model.plan import MachinePlan


def ip(text: str):
    return ipaddress.ip_address(text)


# --- the notation -----------------------------------------------------------------------------


def test_items_are_normalised_and_kept_in_order():
    rules = Egress.parse("allow", "PyPI.org,*.pythonhosted.org,10.1.2.3/8,::FFFF:1.2.3.4,pypi.org")
    assert rules.items == ("pypi.org", "*.pythonhosted.org", "10.0.0.0/8", "1.2.3.4")
    assert parse_network("deny=a.test", ("a.test:127.0.0.2",))[1].hosts == (
        ("a.test", "127.0.0.2"),
    )
    assert parse_network("user") == ("user", None)
    assert Egress.from_dict(rules.to_dict()) == rules
    assert rules.notation() == "allow=pypi.org,*.pythonhosted.org,10.0.0.0/8,1.2.3.4"


@pytest.mark.parametrize(
    ("value", "hosts", "message"),
    [
        ("allow=", (), "allow= needs a name"),
        ("deny=", (), "deny= needs a name"),
        ("allow=*.", (), "egress rule '*.': expected a name"),
        ("allow=300.1.1.1/8", (), "egress rule '300.1.1.1/8': expected a name"),
        ("allow=300.1.1.1", (), "egress rule '300.1.1.1': expected a name"),
        ("allow=a b.test", (), "'a b.test' is not a host name"),
        ("allow=a.test,,b.test", (), "an empty item"),
        ("allow=*", (), "lists every name"),
        ("wide", (), "network must be none, restricted, user, allow=LIST or deny=LIST"),
        ("permit=a.test", (), "expected allow=LIST or deny=LIST"),
        ("allow=a.test", ("a.test",), "--add-host 'a.test': expected NAME:IP"),
        ("allow=a.test", ("a.test:300.0.0.1",), "is not an IP address"),
        ("user", ("a.test:127.0.0.2",), "--add-host pins names for egress rules"),
    ],
)
def test_bad_rules_are_one_line(value, hosts, message):
    with pytest.raises(InputError, match=re.escape(message)) as err:
        parse_network(value, hosts)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--net", "allow="], "allow= needs a name"),
        (["--net", "allow=*."], "egress rule '*.'"),
        (["--net", "allow=300.1.1.1/8"], "egress rule '300.1.1.1/8'"),
        (["--net", "allow=a b"], "'a b' is not a host name"),
        (["--net", "user", "--egress-log", "/tmp/x.log"], "--egress-log needs egress rules"),
    ],
)
def test_bad_rules_on_the_command_line_exit_2(args, message):
    r = qemubox("run", *args, "--", "true")
    assert r.code == 2 and message in r.err, r.err
    assert r.err.count("\n") == 1, r.err


# --- verdicts ---------------------------------------------------------------------------------


def test_names_allowed_exactly_or_below_a_wildcard():
    rules = Egress.parse("allow", "pypi.org,*.pythonhosted.org")
    assert rules.name_verdict("pypi.org") == rules.name_verdict("PyPI.org.")
    assert rules.name_verdict("files.pythonhosted.org").rule == "*.pythonhosted.org"
    assert rules.name_verdict("a.b.pythonhosted.org")
    assert not rules.name_verdict("pythonhosted.org")  # the wildcard is below, not at
    assert not rules.name_verdict("evilpythonhosted.org")
    assert not rules.name_verdict("pypi.org.evil.test")
    deny = Egress.parse("deny", "*.example.com")
    assert not deny.name_verdict("www.example.com") and deny.name_verdict("example.org")


def test_addresses_literal_and_resolved():
    rules = Egress.parse("allow", "203.0.113.0/24,2001:db8::/32,a.test,b.test", ["b.test:10.0.0.5"])
    assert rules.address_verdict(ip("203.0.113.9")).rule == "203.0.113.0/24"
    assert rules.address_verdict(ip("2001:db8::1"))
    assert rules.address_verdict(ip("::ffff:203.0.113.9"))  # IPv4-mapped is IPv4
    assert not rules.address_verdict(ip("8.8.8.8"))  # a literal must be listed
    assert rules.address_verdict(ip("8.8.8.8"), "a.test")  # a global address of a listed name
    # Non-global addresses: named by the list, or pinned by --add-host, else refused.
    for where in ("127.0.0.1", "10.1.1.1", "192.168.0.1", "169.254.169.254", "fd00:ec2::254"):
        verdict = rules.address_verdict(ip(where), "a.test")
        assert not verdict and verdict.rule == "a non-global address, not listed"
    assert rules.address_verdict(ip("10.0.0.5"), "b.test").rule == "--add-host b.test:10.0.0.5"
    assert not rules.address_verdict(ip("10.0.0.5"), "a.test")  # pinned for b.test only
    assert not rules.address_verdict(ip("10.0.0.5"))
    listed = Egress.parse("allow", "169.254.169.254")
    assert listed.address_verdict(ip("169.254.169.254"))


def test_deny_mode_reaches_what_is_not_listed():
    rules = Egress.parse("deny", "*.example.com,203.0.113.0/24", ["api.test:127.0.0.2"])
    assert rules.address_verdict(ip("8.8.8.8"))
    assert rules.address_verdict(ip("8.8.8.8"), "www.example.org")
    assert not rules.address_verdict(ip("203.0.113.7"), "allowed.test")  # a denied range
    assert rules.address_verdict(ip("127.0.0.2"), "api.test")
    assert not rules.address_verdict(ip("127.0.0.1"))  # the host: not named
    assert not rules.address_verdict(ip("169.254.169.254"))


def test_user_mode_refuses_only_the_metadata_address():
    for where in METADATA:
        assert not user_verdict(ip(where))
    assert user_verdict(ip("10.0.2.2")) and user_verdict(ip("93.184.216.34"))
    assert not user_verdict(ip("::ffff:169.254.169.254"))


# --- the resolver -----------------------------------------------------------------------------


def _ask(rules: Egress, name: str, rdtype="A", resolved=("93.184.216.34",), table=None):
    asked = []

    async def resolve(n):
        asked.append(n)
        return tuple(address(a) for a in resolved)

    query = dns.message.make_query(name, rdtype)
    found = asyncio.run(names.answer(query.to_wire(), rules, table or names.Names(), resolve))
    return found, dns.message.from_wire(found.wire), asked


def test_an_allowed_name_answers_its_own_pool_address():
    table = names.Names()
    rules = Egress.parse("allow", "a.test,b.test")
    found, reply, _ = _ask(rules, "a.test", table=table)
    first = reply.answer[0][0].address
    assert found.verdict and ip(first) in names.POOL and reply.rcode() == dns.rcode.NOERROR
    _, again, _ = _ask(rules, "a.test", table=table)
    _, other, _ = _ask(rules, "b.test", table=table)
    assert again.answer[0][0].address == first != other.answer[0][0].address
    assert table.name_of(ip(first)) == "a.test"
    assert table.resolved("a.test") == (ip("93.184.216.34"),)
    _, aaaa, _ = _ask(rules, "a.test", "AAAA", table=table)
    assert aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer


def test_a_refused_name_does_not_resolve_and_is_not_looked_up():
    found, reply, asked = _ask(Egress.parse("allow", "a.test"), "b.test")
    assert reply.rcode() == dns.rcode.NXDOMAIN and not found.verdict and asked == []
    found, reply, _ = _ask(Egress.parse("allow", "localhost"), "localhost", resolved=("127.0.0.1",))
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert found.verdict.rule == "a non-global address, not listed"
    _, pinned, asked = _ask(Egress.parse("allow", "a.test", ["a.test:127.0.0.2"]), "a.test")
    assert pinned.answer and asked == []  # a pin is not looked up


def test_malformed_queries_get_no_answer():
    rules = Egress.parse("allow", "a.test")
    for junk in (
        b"",
        b"\x00" * 5,
        dns.message.make_response(dns.message.make_query("a.test", "A")),
    ):
        wire = junk.to_wire() if hasattr(junk, "to_wire") else junk
        assert asyncio.run(names.answer(wire, rules, names.Names(), None)) is None


# --- what a connection asks for ---------------------------------------------------------------


def _client_hello(server_name: str) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls_server_name_and_http_host():
    hello = _client_hello("Files.PythonHosted.org")
    assert sniff(hello).name == "files.pythonhosted.org" and sniff(hello).protocol == "tls"
    assert not sniff(hello[:40]).complete  # a record cut short: wait for the rest
    http = b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHost: API.test:8080\r\n\r\n"
    assert sniff(http).name == "api.test" and sniff(http).complete
    assert not sniff(http[:20]).complete
    assert sniff(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n").name == "::1"
    assert sniff(b"GET / HTTP/1.1\r\nHost: api.test.:80\r\n\r\n").name == "api.test"
    assert sniff(b"SSH-2.0-OpenSSH_9.2\r\n").protocol == "other"
    assert sniff(b"\x00\x01binary").complete and sniff(b"\x00\x01binary").name is None


# --- the proxy's decisions --------------------------------------------------------------------


def test_the_proxy_decides_by_the_rules_in_force(tmp_path):
    launch.write_rules(tmp_path, Egress.parse("allow", "a.test,203.0.113.5", ["a.test:127.0.0.2"]))
    p = proxy.Proxy(tmp_path, tmp_path / "egress.log")
    fake = p.names.give("a.test", (ip("127.0.0.2"),))
    name, targets, verdict = p.decide(fake, 80)
    assert (name, targets, verdict.allowed) == ("a.test", [ip("127.0.0.2")], True)
    assert p.decide(ip("203.0.113.5"), 443)[2]
    assert not p.decide(ip("203.0.113.6"), 443)[2]
    assert not p.decide(names.POOL[77], 80)[2]  # never given out
    launch.write_rules(tmp_path, Egress.parse("allow", "b.test"))  # changed while it runs
    assert p.decide(fake, 80)[2].rule == "not in the allow list"
    (tmp_path / launch.RULES).write_text("{not json")  # a bad file leaves the rules in force
    assert p.decide(fake, 80)[2].rule == "not in the allow list"


def test_qemu_is_started_with_the_shim_the_network_needs(tmp_path):
    from test_structure import _plan

    base = _plan()
    for network, egress, expected in [
        ("none", None, []),
        ("restricted", None, []),
        ("user", None, ["QEMUBOX_EGRESS_REFUSE=169.254.169.254,fd00:ec2::254"]),
        ("allow", {"mode": "allow", "items": ["a.test"], "hosts": []}, ["QEMUBOX_EGRESS="]),
    ]:
        plan: MachinePlan = replace(base, network=network, egress=egress)
        env = launch.qemu_environment(plan, "/lib/shim.so")
        assert [e for e in env if e.startswith("QEMUBOX")][:1] == [
            f"{x}{plan.runtime_dir}/egress.sock" if x.endswith("=") else x for x in expected
        ]
        assert (launch.proxy_helper(plan) is not None) == (egress is not None)
        assert plan.netdev == ("user" if network == "allow" else network)


def test_a_dry_run_names_the_shim_without_building_it(tmp_path, monkeypatch):
    from test_structure import _plan

    monkeypatch.setenv("QEMUBOX_CACHE_DIR", str(tmp_path / "cache"))
    plan = replace(_plan(), network="allow")
    env = launch.qemu_prefix(plan, build=False)
    assert env[:2] == ["env", f"LD_PRELOAD={launch.shim_path()}"]
    assert not launch.shim_path().exists()
    assert launch.qemu_prefix(replace(plan, network="none", egress=None), build=False) == []
