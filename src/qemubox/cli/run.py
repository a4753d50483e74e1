"""``qemubox run``: one command in a fresh sandbox (or in a new named one); and what the
commands that start or use sandboxes share: the session's options, and running a command
with its output streamed and its exit status returned."""

from __future__ import annotations

import os
import signal
import sys

import click

from qemubox.arch import ARCHES
from qemubox.cli import terminal
from qemubox.cli.common import CONTEXT, say
from qemubox.model import session as defaults

_SESSION_OPTIONS = [
    click.option(
        "-m", "--memory", default=defaults.DEFAULT_MEMORY, show_default=True, help="Guest memory."
    ),
    click.option(
        "-c", "--cpus", default=str(defaults.DEFAULT_CPUS), show_default=True, metavar="N"
    ),
    click.option("--balloon", is_flag=True, help="Add a virtio-balloon device."),
    click.option(
        "-v",
        "--volume",
        "volumes",
        multiple=True,
        metavar="HOST:GUEST[:ro]",
        help="Share a host directory (9p); repeatable. DIR alone: at the same path.",
    ),
    click.option(
        "--share-fs",
        default=defaults.SHARE_FS[0],
        show_default=True,
        type=click.Choice(defaults.SHARE_FS),
        help="What -v and --share use (virtiofs: faster; needs root).",
    ),
    click.option(
        "--share",
        "shares",
        multiple=True,
        metavar="HOST:TAG:GUEST[:ro]",
        help="Share a host directory under a mount tag of your choice; repeatable.",
    ),
    click.option(
        "--disk",
        "disks",
        multiple=True,
        metavar="SIZE:GUEST[:PATH]",
        help="An ext4 disk: ephemeral, or persistent at PATH (never reformatted).",
    ),
    click.option(
        "--net",
        default=defaults.NETWORKS[0],
        show_default=True,
        metavar="none|restricted|user|allow=LIST|deny=LIST",
        help="The guest's network. allow=LIST reaches only LIST; deny=LIST all but LIST "
        "(names, *.suffix wildcards, IP addresses, CIDR ranges; comma-separated).",
    ),
    click.option(
        "--add-host",
        "add_hosts",
        multiple=True,
        metavar="NAME:IP",
        help="With allow= or deny=: NAME resolves to IP, for the guest and the rules.",
    ),
    click.option(
        "--egress-log",
        metavar="FILE",
        help="With allow= or deny=: write every egress decision here (JSON lines).",
    ),
    click.option(
        "--vmcore",
        metavar="FILE",
        help="Should the guest kernel panic, save its memory in FILE (an ELF core with the "
        "kernel's VMCOREINFO, for drgn or crash); exit 122 as always.",
    ),
    click.option(
        "-p",
        "--publish",
        "publish",
        multiple=True,
        metavar="HOST:GUEST",
        help="Forward 127.0.0.1:HOST to the guest's GUEST port (HOST 0: any free).",
    ),
    click.option(
        "--kernel",
        metavar="PATH|debian",
        help="Kernel image, or a kernel source tree DIR (built first, cached) "
        "(default: the newest qemubox build, else Debian's).",
    ),
    click.option("--modules", metavar="DIR", help="Modules of --kernel (lib/modules/VERSION)."),
    click.option(
        "--append",
        default="",
        metavar="ARGS",
        help="Add ARGS to the guest kernel's command line (kunit.filter_glob=..., dyndbg=...).",
    ),
    click.option(
        "--arch",
        type=click.Choice(list(ARCHES)),
        help="The guest's architecture (default: this host's, or --kernel's); another "
        "one's is emulated (TCG).",
    ),
    click.option(
        "--boot-timeout",
        default=f"{defaults.DEFAULT_BOOT_TIMEOUT:g}",
        show_default=True,
        metavar="S",
    ),
    click.option(
        "--accel",
        default=defaults.ACCELS[0],
        show_default=True,
        type=click.Choice(defaults.ACCELS),
    ),
    click.option(
        "--snapshot/--no-snapshot",
        default=True,
        show_default=True,
        help="Start from a snapshot of a booted guest (recorded by the first start of its "
        "kind); --no-snapshot boots.",
    ),
    click.option(
        "--image",
        default=defaults.DEFAULT_IMAGE,
        show_default=True,
        metavar="IMAGE",
        help="The root: minimal, host (this machine's / read-only), debian, an image of "
        "`qemubox image ls`, a container image (oci-archive:FILE, docker-archive:FILE, "
        "oci:DIR[:TAG], containers-storage:NAME, docker-daemon:NAME), or an ext4/qcow2 file.",
    ),
]

_NAMED_OPTIONS = [
    click.option(
        "--ttl",
        metavar="DURATION",
        help="Stop the sandbox once unused that long (90s, 10m, 2h, 1d).",
    ),
]


def session_options(f):
    for option in reversed(_SESSION_OPTIONS):
        f = option(f)
    return f


def named_options(f):
    for option in reversed(_NAMED_OPTIONS):
        f = option(f)
    return f


def default_workdir(image: str) -> str | None:
    """Where a command starts unless told: in a host root, where we are (it is there, at
    the same path); elsewhere the image's WorkingDir, else / (None)."""
    return os.getcwd() if image == "host" else None


def streams():
    """Our stdin, stdout and stderr, and our terminal, lent to a command."""
    from qemubox.service.command import Streams

    # When our reader goes away (`| head -1`), end as any writer to a closed pipe does:
    # killed by SIGPIPE, at once, the VM with us. (The agent's socket is written with
    # MSG_NOSIGNAL: a VM that dies is reported, not taken for a closed pipe.)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return Streams(
        _writer(sys.stdout.buffer), _writer(sys.stderr.buffer), _raw_stdin(), terminal.lent
    )


def perform_streaming(action):
    """Perform an action that runs a command, with our streams; its notices said after."""
    from qemubox.service.actions import perform

    io = streams()
    try:
        return perform(action, io)
    finally:
        for notice in io.notices:
            say(notice)


def _raw_stdin():
    """Our stdin, unbuffered: a read returns what is there (a key, at a terminal), and a
    reader still blocked at exit holds no lock the interpreter's shutdown would wait for."""
    return open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)


def _writer(stream):
    """A callback writing a command's output as it comes."""

    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


@click.command(context_settings={**CONTEXT, "allow_interspersed_args": False})
@session_options
@click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE")
@click.option(
    "-w",
    "--workdir",
    metavar="DIR",
    help="Where COMMAND starts (default: the image's WorkingDir, else /; with --image host, ours).",
)
@click.option(
    "-u",
    "--user",
    metavar="NAME|UID[:GID]",
    help="Run COMMAND as this user of the root (default: the image's User, else root).",
)
@click.option(
    "--entrypoint",
    metavar="PROGRAM",
    help="Replace a container image's Entrypoint (its Cmd is then dropped too).",
)
@click.option("--timeout", metavar="S", help="Kill the command after S seconds (exit status 124).")
@click.option("--console-log", metavar="FILE", help="Keep the guest console log here.")
@click.option("--dry-run", is_flag=True, help="Print the QEMU command line; run nothing.")
@click.option("--timings", is_flag=True, help="Print where the time went, on stderr.")
@click.option("-i", "--interactive", is_flag=True, help="Pass standard input to the command.")
@click.option("--name", metavar="NAME", help="Make it a named sandbox, which stays after COMMAND.")
@named_options
@click.option("-d", "--detach", is_flag=True, help="With --name: start COMMAND and return at once.")
@click.option("--rm", "remove", is_flag=True, help="With --name: remove the sandbox after COMMAND.")
@click.argument("command", nargs=-1)
def run(command, env, workdir, timeout, console_log, dry_run, timings, interactive, **options):
    """Boot a sandbox, run COMMAND in it, and exit with its exit status. A container image
    runs its Entrypoint and Cmd as `docker run` does (COMMAND replaces Cmd).

    Its stdout and stderr stream to ours as they come. Exit status: the command's, 128+N
    when a signal N killed it, 124 on --timeout; 121 boot failure, 122 kernel panic,
    123 VM died, 125 the kernel or QEMU could not start (the console tail is printed).

    With --name the sandbox is a named one (see `qemubox create`): it stays running after
    COMMAND, unless --rm; with -d, COMMAND is started in the background (its output goes to
    the console, `qemubox logs NAME`) and qemubox returns at once.
    """
    import shlex

    from qemubox.sandbox import notation
    from qemubox.service import actions
    from qemubox.service.command import CommandRequest
    from qemubox.service.session import SessionRequest

    request = SessionRequest.take(options)
    timeout = notation.seconds(timeout, "--timeout")
    cwd = workdir or default_workdir(request.image)
    command_request = CommandRequest(
        tuple(command),
        notation.env(env, os.environ),
        notation.workdir(cwd) if cwd else None,
        timeout,
        interactive,
        user=notation.user(options.pop("user")),
        entrypoint=options.pop("entrypoint"),
    )
    action = actions.Run(
        command_request,
        request,
        console_log,
        options.pop("name"),
        options.pop("detach"),
        options.pop("remove"),
        notation.duration(options.pop("ttl"), "--ttl"),
        dry_run,
    )
    if dry_run:
        click.echo(shlex.join(actions.perform(action).qemu_args))
        return 0
    result = perform_streaming(action)
    if action.detach:
        click.echo(action.name)
    if timings and result.timings:
        _print_timings(result.timings)
    return result.exit_code


def _print_timings(timings) -> None:
    width = max(len(t.phase) for t in timings)
    for phase, seconds in timings:
        say(f"{phase:<{width}}  {seconds * 1000:8.1f} ms")
    say(f"{'total':<{width}}  {sum(t.seconds for t in timings) * 1000:8.1f} ms")
