"""``qemubox mcp``: the MCP server, over stdio (an agent starts it) or streamable HTTP."""

from __future__ import annotations

import os

import click

from qemubox.cli.common import CONTEXT, say
from qemubox.errors import InputError


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--listen {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


@click.command(context_settings=CONTEXT)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Serve streamable HTTP at http://HOST:PORT/mcp instead of stdio.",
)
def mcp(listen):
    """Serve qemubox's tools to AI agents over the Model Context Protocol.

    Over stdio by default (an MCP client starts `qemubox mcp`). With --listen, over
    streamable HTTP, where every request needs `Authorization: Bearer TOKEN`: the token
    is $QEMUBOX_MCP_TOKEN, or a new one printed on stderr at start."""
    from qemubox.mcpserver import server

    if listen is None:
        server.serve_stdio()
        return 0
    host, port = _address(listen)
    token = os.environ.get("QEMUBOX_MCP_TOKEN", "")
    if not token:
        token = os.urandom(24).hex()
        say(f"qemubox mcp: token {token}")
    elif len(token) < 16:
        raise InputError("QEMUBOX_MCP_TOKEN: at least 16 characters")
    say(f"qemubox mcp: serving http://{host}:{port}/mcp")
    server.serve_http(host, port, token)
    return 0
