"""virtiofsd, QEMU's virtiofs daemon (shipped with Debian's QEMU, root only): where it is and
the command lines that serve a plan's virtiofs shares (a read-only one through
``qemu/readonly.py``'s view)."""

from __future__ import annotations

import sys

from qemubox.model.plan import ROOT_ID, MachinePlan

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def virtiofsd_commands(plan: MachinePlan) -> list[tuple[list[str], str]]:
    """The virtiofsd daemons the plan's virtiofs shares need, started before QEMU, with the
    socket each listens on (it exits when QEMU goes)."""
    commands = []
    for i, share in enumerate(plan.exported):
        if share.fs != "virtiofs":
            continue
        view = share.host_path
        if share.read_only:  # a read-only view of it, made by the helper below
            view = plan.read_only_view(i)
        daemon = [
            VIRTIOFSD,
            f"--socket-path={plan.virtiofs_socket(i)}",
            "-o",
            "source=" + view.replace("\\", "\\\\").replace(",", "\\,"),
            "-o",
            "cache=auto",
        ]
        if share.tag != ROOT_ID:
            # Mounts under the share as mounts in the guest (distinct inode numbers). Not
            # for a root: overlayfs would not look into them.
            daemon += ["-o", "announce_submounts"]
        if share.read_only:  # virtiofsd has no read-only option: see qemu/readonly.py
            helper = [sys.executable, "-m", "qemubox.qemu.readonly", share.host_path, view]
            daemon = [*helper, *daemon]
        commands.append((daemon, plan.virtiofs_socket(i)))
    return commands
