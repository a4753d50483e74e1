"""``qemubox run``: one command in a fresh sandbox (or in a new named one); and what the
commands that start or use sandboxes share: the session's options, and running a command
with its output streamed and its exit status returned."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import replace

import click

from qemubox.cli import terminal
from qemubox.cli.common import CONTEXT, say
from qemubox.errors import Exit, InputError

_SESSION_OPTIONS = [
    click.option("-m", "--memory", default="512M", show_default=True, help="Guest memory."),
    click.option("-c", "--cpus", default="1", show_default=True, metavar="N"),
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
        default="9p",
        show_default=True,
        type=click.Choice(["9p", "virtiofs"]),
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
        default="none",
        show_default=True,
        type=click.Choice(["none", "restricted", "user"]),
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
        help="Kernel image (default: the newest qemubox build, else Debian's).",
    ),
    click.option("--modules", metavar="DIR", help="Modules of --kernel (lib/modules/VERSION)."),
    click.option("--boot-timeout", default="60", show_default=True, metavar="S"),
    click.option(
        "--accel", default="auto", show_default=True, type=click.Choice(["auto", "kvm", "tcg"])
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
        default="minimal",
        show_default=True,
        metavar="IMAGE",
        help="The root: minimal, host (this machine's / read-only), debian, an image of "
        "`qemubox image ls`, or an ext4/qcow2 file.",
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


def make_session(options: dict, timeout: float | None = None, console_log: str | None = None):
    """The Session the options in ``options`` ask for (they are taken out of it)."""
    from qemubox.cli import parse
    from qemubox.sandbox.spec import Session

    fs = options.pop("share_fs")
    shares = [*map(parse.volume, options.pop("volumes")), *map(parse.share, options.pop("shares"))]
    return Session(
        memory=options.pop("memory"),
        cpus=parse.cpus(options.pop("cpus")),
        balloon=options.pop("balloon"),
        shares=[replace(share, fs=fs) for share in shares],
        disks=[parse.disk(d) for d in options.pop("disks")],
        network=options.pop("net"),
        ports=[parse.publish(p) for p in options.pop("publish")],
        kernel=options.pop("kernel"),
        modules=options.pop("modules"),
        timeout=timeout,
        boot_timeout=parse.seconds(options.pop("boot_timeout"), "--boot-timeout"),
        accel=options.pop("accel"),
        console_log=console_log,
        image=options.pop("image"),
        snapshot=options.pop("snapshot"),
    )


def default_workdir(session) -> str:
    """Where a command starts unless told: in a host root, where we are (it is there, at
    the same path); elsewhere at /."""
    return os.getcwd() if session.image == "host" else "/"


def run_command(sandbox, command, env, cwd, interactive, timeout, tty=False) -> int:
    """Run ``command`` in ``sandbox`` with our stdin (when ``interactive``), stdout and
    stderr; returns the exit status qemubox exits with. With ``tty`` it runs on a
    pseudo-terminal in the guest, the size of ours, fed our stdin: ours is put in raw mode
    meanwhile (so ^C reaches the guest's program) and its size changes follow."""
    # When our reader goes away (`| head -1`), end as any writer to a closed pipe does:
    # killed by SIGPIPE, at once, the VM with us. (The agent's socket is written with
    # MSG_NOSIGNAL: a VM that dies is reported, not taken for a closed pipe.)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    with terminal.forwarded(sandbox, tty) as size:
        result = sandbox.exec(
            list(command),
            env=env,
            cwd=cwd,
            timeout=timeout,
            on_stdout=_writer(sys.stdout.buffer),
            on_stderr=_writer(sys.stderr.buffer),
            stdin_stream=_raw_stdin() if interactive or tty else None,
            tty=size,
        )
    if result.timed_out:
        say(f"qemubox: the command timed out after {timeout:g} s and was killed")
        return Exit.TIMEOUT
    return result.exit_code


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
    help="Where COMMAND starts (default: /; with --image host, ours).",
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
@click.argument("command", nargs=-1, required=True)
def run(command, env, workdir, timeout, console_log, dry_run, timings, interactive, **options):
    """Boot a sandbox, run COMMAND in it, and exit with its exit status.

    Its stdout and stderr stream to ours as they come. Exit status: the command's, 128+N
    when a signal N killed it, 124 on --timeout; 121 boot failure, 122 kernel panic,
    123 VM died, 125 the kernel or QEMU could not start (the console tail is printed).

    With --name the sandbox is a named one (see `qemubox create`): it stays running after
    COMMAND, unless --rm; with -d, COMMAND is started in the background (its output goes to
    the console, `qemubox logs NAME`) and qemubox returns at once.
    """
    import shlex

    from qemubox.cli import parse
    from qemubox.sandbox.sandbox import Sandbox

    name, detach, remove = options.pop("name"), options.pop("detach"), options.pop("remove")
    ttl = parse.duration(options.pop("ttl"), "--ttl")
    timeout = parse.seconds(timeout, "--timeout")
    session = make_session(options, timeout, console_log)
    command_env = parse.env(env, os.environ)
    cwd = parse.workdir(workdir or default_workdir(session))
    if name is None:
        if detach or remove or ttl:
            raise InputError("-d, --rm and --ttl go with --name")
    elif detach and (remove or interactive):
        raise InputError("-d goes with neither --rm nor -i")
    elif console_log:
        raise InputError(f"--console-log goes without --name (see: qemubox logs {name})")
    if dry_run:
        from qemubox.qemu.cmdline import qemu_args

        click.echo(shlex.join(qemu_args(Sandbox(session).make_plan(dry_run=True))))
        return 0
    if name is None:
        with Sandbox(session) as sandbox:
            code = run_command(sandbox, command, command_env, cwd, interactive, timeout)
            sandbox.phase("command")
        sandbox.phase("teardown")
        if timings:
            _print_timings(sandbox.timings)
        return code
    sandbox = Sandbox.create(name, session, ttl)
    try:
        if detach:
            _start_in_background(sandbox, command, command_env, cwd)
            click.echo(name)
            return 0
        return run_command(sandbox, command, command_env, cwd, interactive, timeout)
    finally:
        if remove:
            sandbox.remove(force=True)
        else:
            sandbox.detach()


def _print_timings(phases: list[tuple[str, float]]) -> None:
    width = max(len(name) for name, _ in phases)
    for name, seconds in phases:
        say(f"{name:<{width}}  {seconds * 1000:8.1f} ms")
    say(f"{'total':<{width}}  {sum(s for _, s in phases) * 1000:8.1f} ms")


def _start_in_background(sandbox, command, env, cwd) -> None:
    """Start ``command`` so that it outlives this client, its output on the console."""
    from qemubox.errors import SandboxError

    line = (
        'command -v "$1" >/dev/null || { echo "$1: command not found" >&2; exit 127; }; '
        'setsid "$@" </dev/null >/dev/console 2>&1 &'
    )
    r = sandbox.exec(["sh", "-c", line, "sh", *command], env=env, cwd=cwd, timeout=30)
    if r.exit_code != 0:
        why = r.stderr.decode(errors="replace").strip()
        raise SandboxError(f"cannot start {command[0]} in the background: {why}")
