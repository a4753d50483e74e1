"""The ``qemubox`` command line: one module per command group; nothing of click goes below
this package."""

from __future__ import annotations

import importlib
import os
import sys

import click

from qemubox import __version__
from qemubox.cli.common import ALIASES, CONTEXT, say
from qemubox.errors import Exit

# Each command: the module of this package that defines it, and its name there. A command's
# module is imported when the command runs (or help lists it): a start pays for its own.
COMMANDS = {
    "kconfig": ("kconfig", "kconfig"),
    "kernel": ("kernel", "kernel"),
    "bisect": ("bisect", "bisect"),
    "kunit": ("kunit", "kunit"),
    "run": ("run", "run"),
    "create": ("sandboxes", "create"),
    "exec": ("sandboxes", "exec_"),
    "ls": ("sandboxes", "ls"),
    "inspect": ("sandboxes", "inspect"),
    "stop": ("sandboxes", "stop"),
    "kill": ("sandboxes", "kill"),
    "start": ("sandboxes", "start"),
    "pause": ("sandboxes", "pause"),
    "resume": ("sandboxes", "resume"),
    "rm": ("sandboxes", "rm"),
    "logs": ("sandboxes", "logs"),
    "network": ("sandboxes", "network"),
    "dump": ("sandboxes", "dump"),
    "cp": ("sandboxes", "cp"),
    "image": ("images", "image"),
    "matrix": ("matrix", "matrix"),
    "snapshot": ("snapshots", "snapshot"),
    "pool": ("pools", "pool"),
    "vm": ("vmpy", "vm"),
    "mcp": ("mcp", "mcp"),
    "serve": ("serve", "serve"),
}


class _Commands(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd_name = cmd_name if cmd_name in COMMANDS else ALIASES.get(cmd_name, cmd_name)
        if cmd_name not in COMMANDS:
            return None
        module, attr = COMMANDS[cmd_name]
        return getattr(importlib.import_module(f"qemubox.cli.{module}"), attr)


@click.group(cls=_Commands, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="qemubox")
def cli() -> None:
    """QEMU as a fast, scriptable sandbox for Linux kernels and untrusted commands."""


# --- entry point ------------------------------------------------------------------------------


_warned: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning, said once by this process however often it comes: the filters' own "once"
    is forgotten whenever anything changes them, which the standard library does on every
    subprocess start (a long-lived command — serve, a pool, a matrix — boots many guests)."""
    text = f"qemubox: warning: {message}"
    if text not in _warned:
        _warned.add(text)
        say(text)


def _internal_error(exc: Exception) -> int:
    if os.environ.get("QEMUBOX_DEBUG"):
        raise exc
    say(f"qemubox: internal error: {type(exc).__name__}: {exc} (QEMUBOX_DEBUG=1 shows more)")
    return Exit.INTERNAL


def _failed(exc: Exception) -> int:
    """Say what went wrong as the service's outcome says it; an internal error else."""
    from qemubox.service.outcome import of_error

    outcome = of_error(exc)
    if outcome is None:
        return _internal_error(exc)
    for line in outcome.lines:
        say(line)
    say(f"qemubox: error: {outcome.message}")
    return outcome.exit_code


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: errors become one line on stderr and an exit status, never a traceback."""
    import warnings

    warnings.showwarning = _show_warning
    try:
        code = cli.main(args=argv, prog_name="qemubox", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        say("qemubox: aborted")
        code = Exit.INTERRUPTED
    except KeyboardInterrupt:
        say("qemubox: interrupted")
        code = Exit.INTERRUPTED
    except BrokenPipeError:
        code = 0
    except Exception as exc:  # the last line of defence: no traceback for the user
        code = _failed(exc)
    sys.exit(code if isinstance(code, int) else (0 if code is None else Exit.INPUT))
