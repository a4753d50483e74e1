"""``qemubox snapshot``: the snapshots of booted guests that starts restore."""

from __future__ import annotations

import json

import click

from qemubox.cli.common import CONTEXT, Group, ago, chosen_keys, say, table


@click.group(cls=Group, context_settings=CONTEXT)
def snapshot() -> None:
    """Snapshots of booted guests (which starts restore): list, remove, prune."""


@snapshot.command("ls", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per snapshot.")
def ls(as_json):
    """List the snapshots: key, age, memory, RAM on tmpfs, kernel."""
    from qemubox.vm import snapshot as snapshots

    found = snapshots.list_all()
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    rows = [("KEY", "RECORDED", "MEMORY", "RAM USED", "STATE", "KERNEL")]
    for i in found:
        rows.append(
            (
                i["key"],
                ago(i.get("recorded")) + " ago",
                f"{i.get('memory_mib', 0)}M",
                f"{i['ram_bytes'] >> 20}M" if i["whole"] else "gone",
                f"{i['state_bytes'] >> 10}K",
                i.get("kernel", "?"),
            )
        )
    table(rows)


@snapshot.command(context_settings=CONTEXT)
@click.argument("keys", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every snapshot.")
def rm(keys, everything):
    """Remove snapshots by KEY (see `snapshot ls`); the next start records afresh."""
    from qemubox.vm import snapshot as snapshots

    known = {i["key"] for i in snapshots.list_all()}
    for k in chosen_keys(keys, everything, known, "snapshot rm"):
        snapshots.remove(k)


@snapshot.command(context_settings=CONTEXT)
@click.option("--older-than", metavar="DURATION", help="Remove those recorded before (7d, 12h).")
@click.option("--max-size", metavar="SIZE", help="Then keep at most this much (2G).")
def prune(older_than, max_size):
    """Remove snapshots that cannot serve (RAM gone with a reboot, kernel or initramfs
    gone), old ones, and the oldest beyond a size."""
    from qemubox.model.size import parse_size
    from qemubox.sandbox import notation
    from qemubox.vm import snapshot as snapshots

    age = notation.duration(older_than, "--older-than")
    size = parse_size(max_size, "--max-size") if max_size else None
    removed = snapshots.prune(age, size)
    say(f"removed {len(removed)} snapshot(s)")
