"""What every command module shares."""

from __future__ import annotations

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def say(message: str) -> None:
    click.echo(message, err=True)
