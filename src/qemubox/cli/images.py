"""``qemubox image``: the root images sandboxes boot (``--image``): list, build, remove."""

from __future__ import annotations

import json

import click

from qemubox.cli.common import CONTEXT, Group, ago, table


@click.group(cls=Group, context_settings=CONTEXT)
def image() -> None:
    """Root images: minimal, host, debian, and images built from debian."""


def _arch() -> str:
    from qemubox import arch as arches

    return arches.host().debian_arch


def _size(n: int) -> str:
    return f"{n / (1 << 20):.0f}M" if n else "-"


@image.command("ls", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image, as a list.")
def ls(as_json):
    """List the images: built-in ones and those `image build` made."""
    from dataclasses import asdict

    from qemubox.image import catalog
    from qemubox.sandbox import named

    users = named.image_users()
    found = catalog.list_all(_arch())
    if as_json:
        out = [{**asdict(i), "used_by": sorted(users.get(i.base, []))} for i in found]
        click.echo(json.dumps(out, indent=2))
        return
    rows = [("NAME", "ROOT", "SIZE", "BUILT", "USED BY", "DESCRIPTION")]
    for i in found:
        built = "-" if i.kind != "disk" else (ago(i.built) + " ago" if i.built else "not yet")
        used = ",".join(sorted(users.get(i.base, []))) if i.base else ""
        rows.append((i.name, i.kind, _size(i.bytes), built, used or "-", i.description))
    table(rows)


@image.command(context_settings=CONTEXT)
@click.option(
    "--packages", default="", metavar="A,B", help="Debian packages to add (and their needs)."
)
@click.option("--from", "base", default="debian", show_default=True, metavar="IMAGE")
@click.option("--mirror", metavar="URL", help="Default: the mirror the host's apt sources name.")
@click.argument("name")
def build(name, packages, base, mirror):
    """Build image NAME: IMAGE (debian, or one built so) with more packages. Built once per
    package set: the same packages again reuse the build. Needs root (debootstrap)."""
    from qemubox.image import catalog, recipe

    wanted = recipe.parse_packages(packages)
    record = catalog.build(name, base, wanted, _arch(), mirror or "")
    click.echo(f"{name}: {' '.join(record['recipe']['packages'])}")


@image.command(context_settings=CONTEXT)
@click.argument("names", nargs=-1, required=True)
def rm(names):
    """Remove images (debian: its built file). Refused while a sandbox boots from one."""
    from qemubox.image import catalog
    from qemubox.sandbox import named

    for name in names:
        catalog.remove(name, _arch(), named.image_users())
