"""``qemubox run``: one command in a fresh sandbox."""

from __future__ import annotations

import os
import signal
import sys

import click

from qemubox.cli.common import CONTEXT, say
from qemubox.errors import Exit


@click.command(context_settings={**CONTEXT, "allow_interspersed_args": False})
@click.option("-m", "--memory", default="512M", show_default=True, help="Guest memory.")
@click.option("-c", "--cpus", default="1", show_default=True, metavar="N")
@click.option("--balloon", is_flag=True, help="Add a virtio-balloon device.")
@click.option(
    "-v",
    "--volume",
    "volumes",
    multiple=True,
    metavar="HOST:GUEST[:ro]",
    help="Share a host directory (9p); repeatable.",
)
@click.option(
    "--share",
    "shares",
    multiple=True,
    metavar="HOST:TAG:GUEST[:ro]",
    help="Share a host directory under a mount tag of your choice; repeatable.",
)
@click.option(
    "--disk",
    "disks",
    multiple=True,
    metavar="SIZE:GUEST[:PATH]",
    help="An ext4 disk: ephemeral, or persistent at PATH (never reformatted).",
)
@click.option(
    "--net", default="none", show_default=True, type=click.Choice(["none", "restricted", "user"])
)
@click.option(
    "-p",
    "--publish",
    "publish",
    multiple=True,
    metavar="HOST:GUEST",
    help="Forward 127.0.0.1:HOST to the guest's GUEST port (HOST 0: any free).",
)
@click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE")
@click.option("-w", "--workdir", default="/", show_default=True, metavar="DIR")
@click.option(
    "--kernel",
    metavar="PATH|debian",
    help="Kernel image (default: the newest qemubox build, else Debian's).",
)
@click.option("--modules", metavar="DIR", help="Modules of --kernel (lib/modules/VERSION).")
@click.option("--timeout", metavar="S", help="Kill the command after S seconds (exit status 124).")
@click.option("--boot-timeout", default="60", show_default=True, metavar="S")
@click.option(
    "--accel", default="auto", show_default=True, type=click.Choice(["auto", "kvm", "tcg"])
)
@click.option("--console-log", metavar="FILE", help="Keep the guest console log here.")
@click.option("--dry-run", is_flag=True, help="Print the QEMU command line; run nothing.")
@click.option("-i", "--interactive", is_flag=True, help="Pass standard input to the command.")
@click.argument("command", nargs=-1, required=True)
def run(
    command,
    memory,
    cpus,
    balloon,
    volumes,
    shares,
    disks,
    net,
    publish,
    env,
    workdir,
    kernel,
    modules,
    timeout,
    boot_timeout,
    accel,
    console_log,
    dry_run,
    interactive,
):
    """Boot a sandbox, run COMMAND in it, and exit with its exit status.

    Its stdout and stderr stream to ours as they come. Exit status: the command's, 128+N
    when a signal N killed it, 124 on --timeout; 121 boot failure, 122 kernel panic,
    123 VM died, 125 the kernel or QEMU could not start (the console tail is printed).
    """
    import shlex

    from qemubox.cli import parse
    from qemubox.sandbox.sandbox import Sandbox
    from qemubox.vm.spec import Session

    timeout = parse.seconds(timeout, "--timeout")
    session = Session(
        memory=memory,
        cpus=parse.cpus(cpus),
        balloon=balloon,
        shares=[*map(parse.volume, volumes), *map(parse.share, shares)],
        disks=[parse.disk(d) for d in disks],
        network=net,
        ports=[parse.publish(p) for p in publish],
        kernel=kernel,
        modules=modules,
        timeout=timeout,
        boot_timeout=parse.seconds(boot_timeout, "--boot-timeout"),
        accel=accel,
        console_log=console_log,
    )
    command_env = parse.env(env, os.environ)
    cwd = parse.workdir(workdir)
    sandbox = Sandbox(session)
    if dry_run:
        from qemubox.qemu.cmdline import qemu_args

        click.echo(shlex.join(qemu_args(sandbox.make_plan(dry_run=True))))
        return 0

    # When our reader goes away (`| head -1`), end as any writer to a closed pipe does:
    # killed by SIGPIPE, at once, the VM with us. (The agent's socket is written with
    # MSG_NOSIGNAL: a VM that dies is reported, not taken for a closed pipe.)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    with sandbox:
        result = sandbox.exec(
            list(command),
            env=command_env,
            cwd=cwd,
            on_stdout=_writer(sys.stdout.buffer),
            on_stderr=_writer(sys.stderr.buffer),
            stdin_stream=sys.stdin.buffer if interactive else None,
        )
    if result.timed_out:
        say(f"qemubox: the command timed out after {timeout:g} s and was killed")
        return Exit.TIMEOUT
    return result.exit_code


def _writer(stream):
    """A callback writing a command's output as it comes."""

    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write
