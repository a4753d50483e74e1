"""``qemubox image``: the root images sandboxes boot (``--image``): list, build, remove."""

from __future__ import annotations

import json

import click

from qemubox.cli.common import CONTEXT, Group, ago, table


@click.group(cls=Group, context_settings=CONTEXT)
def image() -> None:
    """Root images: minimal, host, debian, images built from debian, container images
    (imported, or built from a Dockerfile)."""


def _host():
    from qemubox import arch as arches

    return arches.host()


def _arch() -> str:
    return _host().debian_arch


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
@click.option(
    "-f", "--file", "dockerfile", metavar="DOCKERFILE", help="Build this Dockerfile instead."
)
@click.option(
    "--build-arg", "build_args", multiple=True, metavar="NAME=VALUE", help="For -f's ARGs."
)
@click.argument("name")
@click.argument("context", required=False)
def build(name, packages, base, mirror, dockerfile, build_args, context):
    """Build image NAME: IMAGE (debian, or one built so) with more packages, or with -f a
    Dockerfile in CONTEXT (default: the Dockerfile's directory) whose FROM names a qemubox
    image or a container image (oci-archive:FILE, ...). Built once per package set: the
    same packages again reuse the build. Needs root (debootstrap, buildah)."""
    from pathlib import Path

    from qemubox.errors import InputError
    from qemubox.image import catalog, recipe

    if dockerfile:
        if packages or mirror or base != "debian":
            raise InputError("-f takes its FROM from the Dockerfile: no --packages/--from/--mirror")
        from qemubox.image import dockerfile as df

        path = Path(dockerfile).resolve()
        where = Path(context).resolve() if context else path.parent
        record = df.build(name, path, where, _host(), tuple(build_args))
        click.echo(f"{name}: {record['digest']}")
        return
    if context or build_args:
        raise InputError("CONTEXT and --build-arg go with -f DOCKERFILE")
    wanted = recipe.parse_packages(packages)
    record = catalog.build(name, base, wanted, _arch(), mirror or "")
    click.echo(f"{name}: {' '.join(record['recipe']['packages'])}")


@image.command("import", context_settings=CONTEXT)
@click.argument("name")
@click.argument("source")
def import_(name, source):
    """Name the container image SOURCE as NAME: oci-archive:FILE, docker-archive:FILE,
    oci:DIR[:TAG], containers-storage:IMAGE, docker-daemon:IMAGE. Unpacked once per image
    (the same image under another name or path is not unpacked again). Needs root."""
    from qemubox.image import catalog

    record = catalog.import_image(name, source, _arch())
    click.echo(f"{name}: {record['digest']}")


@image.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("-o", "--output", required=True, metavar="FILE", help="The OCI archive to write.")
def export(name, output):
    """Write image NAME as an OCI archive (usable as oci-archive:FILE, and by other tools)."""
    from pathlib import Path

    from qemubox.image import export as exporting

    exporting.export(name, Path(output), _host())
    click.echo(output)


@image.command(context_settings=CONTEXT)
@click.argument("name")
def inspect(name):
    """Image NAME as JSON: its root, file, size, and for a container image its digests and
    config (Env, WorkingDir, User, Entrypoint, Cmd, architecture)."""
    from qemubox.image import catalog
    from qemubox.sandbox import named

    found = catalog.inspect(name, _arch())
    found["used_by"] = sorted(named.image_users().get(found["base"], []))
    click.echo(json.dumps(found, indent=2))


@image.command(context_settings=CONTEXT)
@click.argument("names", nargs=-1, required=True)
def rm(names):
    """Remove images (debian: its built file). Refused while a sandbox boots from one."""
    from qemubox.image import catalog
    from qemubox.sandbox import named

    for name in names:
        catalog.remove(name, _arch(), named.image_users())
