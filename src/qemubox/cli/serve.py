"""``qemubox serve``: the E2B API (control plane and envd) on one address; ``serve key``
manages its API keys."""

from __future__ import annotations

import click

from qemubox.cli.common import CONTEXT, say, table
from qemubox.cli.mcp import _address


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@click.option(
    "--listen",
    default="127.0.0.1:3000",
    show_default=True,
    metavar="HOST:PORT",
    help="One address for the API and every sandbox's envd.",
)
@click.option(
    "--pool",
    default=0,
    show_default=True,
    type=click.IntRange(0, 64),
    metavar="N",
    help="Sandboxes booted ahead per template, so that a create only takes one.",
)
@click.option(
    "--kernel",
    metavar="KERNEL",
    help="The sandboxes' kernel, as `run --kernel` takes it (default: the newest qemubox "
    "build, else Debian's).",
)
@click.option("--tls-cert", metavar="FILE", help="Serve HTTPS with this certificate (PEM).")
@click.option("--tls-key", metavar="FILE", help="The certificate's private key (PEM).")
@click.pass_context
def serve(ctx, listen, pool, kernel, tls_cert, tls_key):
    """Serve sandboxes over the E2B API, so that E2B's SDKs drive qemubox unchanged
    (E2B_API_URL and E2B_SANDBOX_URL set to http://HOST:PORT, E2B_API_KEY to a key of
    `qemubox serve key add`). Sandboxes are named sandboxes: `qemubox ls` shows them, they
    outlive the server, and a restarted server adopts them."""
    if ctx.invoked_subcommand is not None:
        return
    from pathlib import Path

    from qemubox.errors import InputError
    from qemubox.serve import server

    host, port = _address(listen)
    if bool(tls_cert) != bool(tls_key):
        raise InputError("--tls-cert and --tls-key go together")
    for option, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path and not Path(path).is_file():
            raise InputError(f"{option} {path}: no such file")
    server.serve(host, port, pool, tls_cert, tls_key, kernel)


@serve.group(context_settings=CONTEXT)
def key():
    """The API keys the server takes (kept hashed: a key is shown once, when added)."""


@key.command("add", context_settings=CONTEXT)
@click.argument("name")
def key_add(name):
    """Make a key named NAME and print it."""
    from qemubox.serve import keys

    click.echo(keys.add(name))
    say(f"qemubox serve: key {name!r} added; it is not shown again")


@key.command("ls", context_settings=CONTEXT)
def key_ls():
    """The keys: name, when made, their first characters."""
    import time

    from qemubox.serve import keys

    rows = [("NAME", "CREATED", "KEY")]
    for info in keys.list_all():
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created))
        rows.append((info.name, made, f"{info.shown}…"))
    table(rows)


@key.command("rm", context_settings=CONTEXT)
@click.argument("name")
def key_rm(name):
    """Remove key NAME: its requests are refused from now on (its sandboxes run on)."""
    from qemubox.serve import keys

    keys.remove(name)
