"""The ``qemubox`` command line: one module per command group; nothing of click goes below
this package."""

from __future__ import annotations

import os
import sys

import click

from qemubox import __version__
from qemubox.cli.common import CONTEXT, say
from qemubox.cli.images import image
from qemubox.cli.kconfig import kconfig
from qemubox.cli.kernel import kernel
from qemubox.cli.matrix import matrix
from qemubox.cli.pools import pool
from qemubox.cli.run import run
from qemubox.cli.sandboxes import COMMANDS as SANDBOX_COMMANDS
from qemubox.cli.snapshots import snapshot
from qemubox.cli.vms import vm
from qemubox.errors import Exit, QemuboxError


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="qemubox")
def cli() -> None:
    """QEMU as a fast, scriptable sandbox for Linux kernels and untrusted commands."""


for command in (kconfig, kernel, run, *SANDBOX_COMMANDS, image, matrix, snapshot, pool, vm):
    cli.add_command(command)

# --- entry point ------------------------------------------------------------------------------


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    say(f"qemubox: warning: {message}")


def _internal_error(exc: Exception) -> int:
    if os.environ.get("QEMUBOX_DEBUG"):
        raise exc
    say(f"qemubox: internal error: {type(exc).__name__}: {exc} (QEMUBOX_DEBUG=1 shows more)")
    return Exit.INTERNAL


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
    except QemuboxError as exc:
        tail = getattr(exc, "log_tail", "") if getattr(exc, "show_tail", False) else ""
        if tail:
            say(tail)
        console = getattr(exc, "console_tail", "")
        if console:
            say("--- guest console (last lines) ---\n" + console + "\n---")
        say(f"qemubox: error: {exc}")
        code = exc.exit_code
    except BrokenPipeError:
        code = 0
    except OSError as exc:
        if exc.filename is None:
            code = _internal_error(exc)
        else:
            # A file the user named (or where output must go) cannot be made or used.
            say(f"qemubox: error: {exc.filename}: {exc.strerror or exc}")
            code = Exit.INPUT
    except Exception as exc:  # the last line of defence: no traceback for the user
        code = _internal_error(exc)
    sys.exit(code if isinstance(code, int) else (0 if code is None else Exit.INPUT))
