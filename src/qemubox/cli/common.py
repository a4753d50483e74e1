"""What every command module shares."""

from __future__ import annotations

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
ALIASES = {"list": "ls"}  # every listing verb is `ls`; `list` still works


class Group(click.Group):
    """A command group whose listing verb is ``ls``, with ``list`` as its alias."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None and cmd_name in ALIASES:
            return super().get_command(ctx, ALIASES[cmd_name])
        return found

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        return (command.name if command else name), command, rest


def say(message: str) -> None:
    click.echo(message, err=True)


def ago(t: float | None) -> str:
    """How long ago ``t`` (a time.time()) was: 5s, 3m, 2h, 1d; ``-`` for none."""
    import time

    if not t:
        return "-"
    s = int(time.time() - t)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def table(rows: list[tuple[str, ...]]) -> None:
    """Rows (the first one the header) in aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def chosen_keys(keys: tuple[str, ...], everything: bool, known, command: str) -> tuple[str, ...]:
    """The KEYs a ``command`` (``snapshot rm``, ``pool stop``) acts on: those given, each
    one of ``known``, or with ``--all`` every known one."""
    from qemubox.errors import InputError

    if everything:
        return tuple(known)
    if not keys:
        raise InputError(f"{command}: give KEYs or --all")
    noun = command.split()[0]
    for k in keys:
        if k not in known:
            raise InputError(f"no {noun} {k!r} (see: qemubox {noun} ls)")
    return keys
