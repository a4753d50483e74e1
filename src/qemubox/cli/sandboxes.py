"""Named sandboxes on the command line: create, exec, ls, inspect, stop, kill, start, rm, cp,
logs."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from qemubox.cli.common import CONTEXT, ago, table
from qemubox.cli.run import named_options, perform_streaming, session_options
from qemubox.errors import InputError
from qemubox.model.state import State
from qemubox.service import actions
from qemubox.service.actions import perform


@click.command(context_settings=CONTEXT)
@session_options
@named_options
@click.argument("name")
def create(name, ttl, **options):
    """Start the named sandbox NAME in the background; returns once it is ready.

    It outlives this command and the terminal; `qemubox exec NAME -- CMD` runs commands in
    it, `qemubox stop NAME` powers it off (its disks kept), `qemubox rm NAME` removes it.
    """
    from qemubox.sandbox import notation
    from qemubox.service.session import SessionRequest

    ttl = notation.duration(ttl, "--ttl")
    click.echo(perform(actions.Create(name, SessionRequest.take(options), ttl)))


@click.command("exec", context_settings={**CONTEXT, "allow_interspersed_args": False})
@click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE")
@click.option("-w", "--workdir", metavar="DIR", help="Default: the image's WorkingDir, else /.")
@click.option(
    "-u", "--user", metavar="NAME|UID[:GID]", help="Default: the image's User, else root."
)
@click.option("-i", "--interactive", is_flag=True, help="Pass standard input to the command.")
@click.option("-t", "--tty", is_flag=True, help="Run it on a pseudo-terminal, fed standard input.")
@click.option("--timeout", metavar="S", help="Kill the command after S seconds (exit status 124).")
@click.option(
    "--vmcore",
    metavar="FILE",
    help="Should the guest kernel panic meanwhile, save its memory in FILE (exit 122).",
)
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
def exec_(name, command, env, workdir, user, interactive, tty, timeout, vmcore):
    """Run COMMAND in the running sandbox NAME; exit with its exit status (as `run`)."""
    from qemubox.sandbox import notation
    from qemubox.service.command import CommandRequest

    if command[:1] == ("--",):  # NAME -- COMMAND: options end at NAME, the "--" is ours
        command = command[1:]
    if not command:
        raise InputError("exec needs a COMMAND after NAME")
    timeout = notation.seconds(timeout, "--timeout")
    command_env = notation.env(env, os.environ)
    if tty and "TERM" not in command_env:
        command_env["TERM"] = os.environ.get("TERM", "xterm")
    cwd = notation.workdir(workdir) if workdir else None
    request = CommandRequest(
        tuple(command), command_env, cwd, timeout, interactive, tty, notation.user(user)
    )
    return perform_streaming(actions.Exec(name, request, vmcore))


@click.command(context_settings=CONTEXT)
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
def dump(name, file):
    """Save the running sandbox NAME's memory in FILE: an ELF core with the kernel's
    VMCOREINFO, for drgn or crash (the guest is stopped meanwhile, then runs on)."""
    saved = perform(actions.Dump(name, file))
    mib = saved["bytes"] / (1 << 20)
    click.echo(f"{name}: {mib:.0f} MiB saved in {saved['path']} ({saved['seconds']:.1f} s)")


def _until(t: float | None) -> str:
    if t is None:
        return "-"
    s = int(t - time.time())
    return "now" if s <= 0 else f"in {ago(time.time() - s)}"


@click.command("ls", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sandbox, as a list.")
@click.option("-a", "--all", "show_all", is_flag=True, help="Stopped and failed ones too.")
def ls(as_json, show_all):
    """List the named sandboxes (running ones; -a: all)."""
    found = perform(actions.List(show_all))
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in found], indent=2))
        return
    rows = [
        ("NAME", "STATE", "IMAGE", "ARCH", "KERNEL", "MEMORY", "CPUS", "UP", "PORTS", "EXPIRES")
    ]
    for s in found:
        state = s.state + (f" ({s.note})" if s.note and s.state is not State.RUNNING else "")
        expires = "in use" if s.in_use and s.ttl else _until(s.expires)
        ports = ",".join(f"{h}->{g}" for h, g in s.ports) or "-"
        rows.append(
            (
                s.name,
                state,
                s.image,
                s.arch,
                s.kernel or "-",
                s.memory,
                str(s.cpus),
                ago(s.started),
                ports,
                expires,
            )
        )
    table(rows)


@click.command(context_settings=CONTEXT)
@click.argument("name")
def inspect(name):
    """NAME's record as JSON: its session, state and, while it runs, its machine plan."""
    click.echo(json.dumps(perform(actions.Inspect(name)), indent=2, sort_keys=True))


@click.command(context_settings=CONTEXT)
@click.option(
    "-t",
    "--time",
    "wait",
    default="10",
    show_default=True,
    metavar="S",
    help="Seconds the guest has to power off before it is killed.",
)
@click.option("--expired", is_flag=True, hidden=True)
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def stop(names, wait, expired):
    """Power the sandboxes off cleanly (disks synced); they keep their disks for `start`."""
    from qemubox.sandbox import notation

    perform(actions.Stop(names, notation.seconds(wait, "--time"), expired))


def _for_each(verb: str, action: type, doc: str) -> click.Command:
    """A command performing ``action`` on the NAMEs given."""

    @click.command(verb, context_settings=CONTEXT, help=doc)
    @click.argument("names", nargs=-1, required=True, metavar="NAME...")
    def command(names):
        perform(action(names))

    return command


kill = _for_each("kill", actions.Kill, "Kill the sandboxes' VMs at once (no clean power-off).")
pause = _for_each(
    "pause",
    actions.Pause,
    "Save running sandboxes whole (memory, processes, devices) and end their VMs.",
)
resume = _for_each("resume", actions.Resume, "Bring paused sandboxes back as they were.")
start = _for_each(
    "start",
    actions.Start,
    "Boot stopped sandboxes again, with their disks as they were (paused: resume).",
)


@click.command("rm", context_settings=CONTEXT)
@click.option("-f", "--force", is_flag=True, help="Kill running ones first.")
@click.option("--expired", is_flag=True, hidden=True)
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def rm(names, force, expired):
    """Remove sandboxes and the files they own (disks given a PATH stay)."""
    perform(actions.Remove(names, force, expired))


@click.command(context_settings=CONTEXT)
@click.option("-f", "--follow", is_flag=True, help="Keep printing as the guest writes.")
@click.option("-n", "--tail", "lines", metavar="N", help="Only the last N lines.")
@click.option("--net", is_flag=True, help="Its egress decisions (JSON lines), not its console.")
@click.argument("name")
def logs(name, follow, lines, net):
    """NAME's console: of its current run, or of its last one. With --net, every egress
    decision of its rules: time, what, name, address, port, verdict, rule."""
    from qemubox.sandbox import notation

    count = notation.count(lines, "--tail") if lines is not None else None
    out = sys.stdout.buffer
    for chunk in perform(actions.Logs(name, count, follow, net)):
        out.write(chunk)
        out.flush()


@click.command(context_settings=CONTEXT)
@click.argument("src")
@click.argument("dst")
def cp(src, dst):
    """Copy files or directory trees between the host and a sandbox, modes kept.

    One of SRC and DST is NAME:/path; the other a host path, or - for a tar stream on
    standard input (to a sandbox) or output (from one)."""
    from qemubox.sandbox import notation

    perform(actions.Copy(notation.guest_path(src), notation.guest_path(dst)))


@click.command(context_settings=CONTEXT)
@click.option("--allow", metavar="LIST", help="Reach only LIST (names, *.suffix, IPs, CIDRs).")
@click.option("--deny", metavar="LIST", help="Reach everything but LIST.")
@click.option(
    "--add-host",
    "add_hosts",
    multiple=True,
    metavar="NAME:IP",
    help="Pin NAME to IP (replaces the pins; default: kept).",
)
@click.argument("name")
def network(name, allow, deny, add_hosts):
    """Show NAME's egress rules, or change them: at once while it runs, and for its later
    starts. NAME must have been made with --net allow=LIST or deny=LIST."""
    if allow is not None and deny is not None:
        raise InputError("--allow and --deny: one or the other")
    net = f"allow={allow}" if allow is not None else f"deny={deny}" if deny is not None else None
    rules = perform(actions.Network(name, net, tuple(add_hosts) if add_hosts else None))
    click.echo(rules.notation())
    for host, ip in rules.hosts:
        click.echo(f"--add-host {host}:{ip}")
