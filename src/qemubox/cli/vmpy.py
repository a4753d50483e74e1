"""``qemubox vm``: persistent VMs, as vm.py knows them (create, install, run -k) and more
(list, stop, rm, ssh, exec, console)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from qemubox.cli.common import CONTEXT, Group, say, table


def _where():
    from qemubox.vmpy import conf

    return conf.load()


def _vm(name: str):
    from qemubox.vmpy.layout import VmDir

    return VmDir.of(_where().vms, name)


@click.group(cls=Group, context_settings=CONTEXT)
def vm() -> None:
    """Persistent VMs: a distribution on a qcow2 disk, booted with its own kernel or with
    one built on the host (-k), whose modules the guest mounts over 9p.

    Where VMs live: $XDG_CONFIG_HOME/vmpy.conf, [Paths] VMs (default ~/vms), ISOs and
    Builds (where -k looks first)."""


@vm.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("-c", "--cpu", "cpus", default=2, show_default=True, type=int, help="CPUs.")
@click.option("-m", "--memory", default="2G", show_default=True, help="RAM (QEMU -m).")
@click.option("-s", "--size", default="16G", show_default=True, help="Disk size (sparse).")
@click.option(
    "--arch",
    default=None,
    metavar="ARCH",
    help="x86_64 (default on this host) or aarch64: the config's qemu_arch.",
)
@click.option("--force", is_flag=True, help="Make NAME anew; its disk and config are kept as .bak.")
def create(name, cpus, memory, size, arch, force):
    """Create VM NAME: <VMs>/NAME/NAME.qcow2 (blank), config.py and an ssh key."""
    from qemubox import arch as arches
    from qemubox.vmpy import lifecycle

    where = _where()
    record = arches.get(arch) if arch else arches.host()
    for note in lifecycle.create(where.vms, name, cpus, memory, size, record.name, force):
        say(f"qemubox: {note}")
    click.echo(f"created {where.vms / name} (cpus={cpus} memory={memory} disk={size})")


@vm.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("--release", default="bookworm", show_default=True, help="Debian release.")
@click.option("--mirror", metavar="URL", help="Default: the mirror the host's apt sources name.")
@click.option("--user", default="vmuser", show_default=True, help="The user (password = name).")
@click.option("--hostname", metavar="H", help="Default: NAME, made a valid host name.")
@click.option("--packages", default="", metavar="P,...", help="More Debian packages.")
@click.option("--timezone", default="Etc/UTC", show_default=True, metavar="TZ")
@click.option("--locale", default="C.UTF-8", show_default=True, metavar="L")
@click.option("-e", "--edit", is_flag=True, help="Write the install script for editing; stop.")
@click.option(
    "--script",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Run this (edited) install script instead of the generated one.",
)
@click.option("--force", is_flag=True, help="Install over a disk that holds data (kept as .bak).")
def install(name, release, mirror, user, hostname, packages, timezone, locale, edit, script, force):
    """Install Debian on VM NAME, unattended (as root: debootstrap on a loop device).

    The result boots with `vm run NAME`: USER with password USER and sudo, root locked,
    sshd, autologin on the serial console, DHCP on the NIC, and the modules mounter for
    kernels run with -k. Installs are cached by their script: the same inputs again take
    seconds."""
    from qemubox.vmpy import install as installer

    target = _vm(name).must_exist()
    if script is not None:
        if edit:
            raise click.UsageError("--edit writes a script and --script runs one: pick one")
        text = script.read_text()
        spec = None
    else:
        choices = (release, mirror, user, hostname, packages, timezone, locale)
        spec, text = installer.generated(target, *choices)
    if edit:
        from qemubox import paths

        backup = paths.write_keeping_old(target.install_script, text)
        if backup:
            say(f"qemubox: kept the previous script as {backup}")
        click.echo(f"wrote {target.install_script}: edit it, then run")
        click.echo(f"  qemubox vm install {name} --script {target.install_script}")
        return
    for note in installer.install(target, text, spec, force):
        say(f"qemubox: {note}")
    who = spec.user if spec else "the script's user"
    click.echo(f"installed {name}: start it with `qemubox vm run {name}` (login: {who})")


@vm.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("-k", "--kernel", "build", metavar="BUILD", help="A kernel build directory.")
@click.option("-i", "--initrd", metavar="FILE", help="An initramfs (with -k).")
@click.option("-a", "--append", multiple=True, metavar="ARG", help="Kernel argument (with -k).")
@click.option("-n", "--dry-run", is_flag=True, help="Print the QEMU command; start nothing.")
@click.option("--gdb", is_flag=True, help="A gdb stub on a free port; prints how to attach.")
@click.option("-d", "--detach", is_flag=True, help="Run in the background (vm console attaches).")
@click.option(
    "--accel",
    type=click.Choice(["auto", "kvm", "tcg"]),
    default="auto",
    show_default=True,
    help="auto: KVM when a real boot under it works here.",
)
@click.argument("qemu_options", nargs=-1, metavar="[-- QEMU_OPTION...]")
def run(name, build, initrd, append, dry_run, gdb, detach, accel, qemu_options):
    """Run VM NAME: QEMU with its config.py's options; the serial console and QEMU's
    monitor on this terminal (Ctrl-A X quits), or in the background with -d."""
    from qemubox.qemu.accel import tcg_warning
    from qemubox.vmpy import run as runner
    from qemubox.vmpy.command import qemu_command

    request = runner.RunRequest(
        name=name,
        kernel=build,
        initrd=initrd,
        append=tuple(append),
        extra=tuple(qemu_options),
        gdb=gdb,
        detach=detach,
        accel=accel,
    )
    target, plan = runner.plan(_where(), request, Path.cwd(), probe=not dry_run)
    if plan.accel_note:
        say(f"qemubox: warning: {tcg_warning(plan.accel_note)}")
    hint = runner.gdb_hint(plan)
    if hint:
        say(f"qemubox: {hint}")
    if dry_run:
        click.echo(shlex.join(qemu_command(plan)))
        return
    if detach:
        pid = runner.start(target, plan)
        click.echo(f"{name} is running (pid {pid}); console: qemubox vm console {name}")
        return
    sys.stdout.flush()
    runner.exec_foreground(target, plan)


@vm.command("ls", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per VM, as a list.")
def list_(as_json):
    """The VMs under <VMs>: size, disk, running or not, ssh port."""
    from qemubox.vmpy import lifecycle

    where = _where()
    rows = [lifecycle.describe(where.vms, n) for n in lifecycle.names(where.vms)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        say(f"qemubox: no VMs in {where.vms}")
        return
    out = [("NAME", "CPUS", "MEMORY", "DISK", "USED", "STATE", "SSH")]
    for r in rows:
        state = f"running ({r['pid']})" if r["running"] else "stopped"
        if r.get("error"):
            state += " (config.py: error)"
        out.append(
            (
                r["name"],
                str(r.get("cpus") or "-"),
                _size(r.get("memory")),
                _size(r.get("disk_size")),
                _size(r.get("disk_used")),
                state,
                str(r.get("ssh_port") or "-"),
            )
        )
    table(out)


def _size(n: int | None) -> str:
    if not n:
        return "-"
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return f"{n}B"


@vm.command(context_settings=CONTEXT)
@click.argument("name")
@click.option(
    "--timeout", default=60.0, show_default=True, help="Seconds to wait for the power-off."
)
def stop(name, timeout):
    """Power VM NAME off (ACPI, as the power button), killing it after --timeout."""
    from qemubox.vmpy import control

    how = control.stop(_vm(name).must_exist(), timeout)
    click.echo(f"{name}: {how}")


@vm.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("-f", "--force", is_flag=True, help="Kill it first if it runs.")
def rm(name, force):
    """Remove VM NAME and its directory (disk included)."""
    from qemubox.vmpy import lifecycle

    lifecycle.remove(_where().vms, name, force)
    click.echo(f"removed {name}")


@vm.command(context_settings=CONTEXT)
@click.argument("name")
@click.argument("command", nargs=-1)
def ssh(name, command):
    """ssh into VM NAME with its own key; `-- CMD` runs CMD through the guest's shell."""
    from qemubox.vmpy import access

    access.ssh(_vm(name).must_exist(), command)


@vm.command("exec", context_settings=CONTEXT)
@click.argument("name")
@click.option("--wait", default=0.0, metavar="SECONDS", help="Keep trying while the VM boots.")
@click.option(
    "--via",
    type=click.Choice(["auto", "agent", "ssh"]),
    default="auto",
    show_default=True,
    help="auto: the guest agent when vm install put one in, else ssh.",
)
@click.argument("command", nargs=-1, required=True)
def exec_(name, wait, via, command):
    """Run COMMAND (its words kept as they are) in VM NAME as its user, in a login shell;
    exit with its status."""
    from qemubox.vmpy import access

    return access.exec_command(_vm(name).must_exist(), command, wait, via)


@vm.command(context_settings=CONTEXT)
@click.argument("name")
def console(name):
    """Attach to the serial console of VM NAME (run with -d); Ctrl-] detaches."""
    from qemubox.cli import terminal
    from qemubox.vmpy import access

    sock = access.console(_vm(name).must_exist())
    with terminal.raw(sys.stdin.fileno()) as on_terminal:
        if on_terminal:
            say("[attached; Ctrl-] detaches]\r")
        try:
            access.relay(sock, on_terminal)
        finally:
            if on_terminal:
                say("\r\n[detached]\r")
