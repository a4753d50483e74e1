"""``qemubox pool``: machines restored ahead, waiting stopped to be taken (see vm/pool.py)."""

from __future__ import annotations

import json

import click

from qemubox.cli.common import CONTEXT, Group, chosen_keys, say, table
from qemubox.cli.run import session_options
from qemubox.errors import InputError


@click.group(cls=Group, context_settings=CONTEXT)
def pool() -> None:
    """Warm pools: machines restored ahead, so that a start only continues one."""


@pool.command(context_settings=CONTEXT)
@session_options
@click.option(
    "--size", default=2, show_default=True, type=int, metavar="N", help="Machines kept waiting."
)
@click.option(
    "--ttl",
    default="1h",
    show_default=True,
    metavar="DURATION",
    help="A machine unused that long ends (90s, 10m, 2h).",
)
def start(size, ttl, **options):
    """Keep machines of this session waiting: `run` (and `Sandbox`) of the same session
    then takes one instead of starting QEMU. Prints the pool's key."""
    from qemubox.sandbox import notation
    from qemubox.service.actions import StartPool, perform
    from qemubox.service.session import SessionRequest

    if size < 1:
        raise InputError(f"--size: at least 1, got {size}")
    seconds = notation.duration(ttl, "--ttl")
    key, waiting = perform(StartPool(SessionRequest.take(options), size, int(seconds)))
    click.echo(key)
    say(f"{waiting} machine(s) waiting")


@pool.command("ls", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per pool.")
def ls(as_json):
    """List the pools: key, size, machines waiting."""
    from qemubox.vm import pool as pools

    found = list(pools.pools().values())
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    table(
        [("KEY", "SIZE", "WAITING")]
        + [(p["key"], str(p["size"]), str(len(p["waiting"]))) for p in found]
    )


@pool.command(context_settings=CONTEXT)
@click.argument("keys", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every pool.")
def stop(keys, everything):
    """Stop pools by KEY (see `pool ls`): their waiting machines end."""
    from qemubox.vm import pool as pools

    keys = chosen_keys(keys, everything, pools.pools(), "pool stop")
    ended = sum(pools.drain(k) for k in keys)
    say(f"stopped {ended} waiting machine(s)")
