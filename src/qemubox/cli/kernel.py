"""``qemubox kernel``: build, list, check and diagnose guest kernels."""

from __future__ import annotations

from pathlib import Path

import click

from qemubox.arch import ARCHES
from qemubox.cli.common import CONTEXT, Group, say
from qemubox.errors import InputError, VerifyError
from qemubox.kernel import profiles

# --- kernel -----------------------------------------------------------------------------------


@click.group(cls=Group, context_settings=CONTEXT)
def kernel() -> None:
    """Build, list, check and diagnose guest kernels."""


def _build_options(func):
    options = [
        click.option(
            "--kernel-version",
            metavar="X.Y[.Z]",
            help="X.Y: Debian's linux-source-X.Y (default 6.12); X.Y.Z: a kernel.org release.",
        ),
        click.option("--source", metavar="DIR|TARBALL", help="Any local source tree or tarball."),
        click.option("--sha256", metavar="HEX", help="Expected sha256 of the tarball."),
        click.option(
            "--arch",
            metavar="ARCH",
            help=f"One of {', '.join(ARCHES)} (default: this host's).",
        ),
        click.option(
            "--profile",
            default=profiles.DEFAULT,
            show_default=True,
            type=click.Choice(list(profiles.PROFILES)),
            help="minimal: tinyconfig + sandbox; default: defconfig + sandbox; "
            "small/fastboot/debug: minimal plus that fragment.",
        ),
        click.option(
            "-f",
            "--fragment",
            "fragments",
            multiple=True,
            metavar="FRAGMENT",
            help="Extra fragment (path or shipped name); repeatable.",
        ),
        click.option(
            "--config-item",
            "config_items",
            multiple=True,
            metavar="CONFIG_X=VALUE",
            help="Extra option; repeatable.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _request(**kw):
    from qemubox.kernel.build import BuildRequest

    return BuildRequest(**kw)


@kernel.command("build")
@_build_options
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Parallel jobs (default: CPUs).")
@click.option(
    "-o",
    "--output",
    metavar="DIR",
    help="Where the kernel, config, System.map, vmlinux and modules go (default: "
    "build/kernel; in a kernel tree, the build stays in the cache, where `run` finds it).",
)
def kernel_build(output, **kw):
    """Configure (verified), build and install a guest kernel: Debian's or kernel.org's
    sources, --source, or the kernel tree you are in.

    Builds are cached by source, configuration and arch: a build with nothing changed
    returns at once, and a small change rebuilds incrementally.
    """
    from qemubox.kernel.build import ConfigMismatchError
    from qemubox.linux.tree import is_source_tree
    from qemubox.service.actions import KernelBuild, perform

    here = not kw["source"] and not kw["kernel_version"] and is_source_tree(Path.cwd())
    if here:
        kw["source"] = str(Path.cwd())
    target = Path(output) if output else (None if here else Path("build/kernel"))
    try:
        result = perform(KernelBuild(_request(output=target, **kw)))
    except ConfigMismatchError as err:
        for line in err.lines:
            click.echo(line)
        raise
    for note in result.notes:
        say(note)
    m = result.manifest
    how = "built" if result.ran_make else "up to date, nothing to build"
    say(f"{how}: Linux {m['version']} ({m['arch']}, {m['profile']}) in {result.output}")
    return 0


@kernel.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the build manifests as JSON.")
def kernel_list(as_json):
    """List built kernels: version, arch, profile, date, path."""
    import json

    from qemubox.kernel.builds import list_builds

    builds = list_builds()
    if as_json:
        click.echo(json.dumps(builds, indent=2, sort_keys=True))
        return 0
    if not builds:
        say("no kernels built yet (qemubox kernel build)")
        return 0
    click.echo(f"{'VERSION':<16} {'ARCH':<7} {'PROFILE':<9} {'BUILT':<20} PATH")
    for m in builds:
        when = m.get("built_at", "")[:19].replace("T", " ")
        click.echo(
            f"{m['version']:<16} {m['arch']:<7} {m['profile']:<9} {when:<20} {m['build_dir']}"
        )
    return 0


def _config_values(target: str | None) -> tuple[Path, dict[str, str]]:
    """A config path (a file, a build or output directory) and its values."""
    from qemubox.kconfig.engine import read_config

    if target is None:
        target = "build/kernel"
        if not Path(target).exists():
            raise InputError("no config given and no build/kernel here (qemubox kernel build)")
    path = Path(target)
    if path.is_dir():
        candidates = [path / ".config", path / "config"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise InputError(f"{target}: a directory without .config or config")
        path = found
    return path, read_config(path)


@kernel.command("check")
@click.argument("config", required=False, metavar="[CONFIG|BUILD_DIR]")
def kernel_check(config):
    """Check a kernel config against the sandbox's required feature list.

    CONFIG is a config file, a build directory or an output directory (default:
    build/kernel). =m counts as enabled, except for options that must be built in.
    """
    from qemubox.kernel.requirements import check_requirements

    path, values = _config_values(config)
    results = check_requirements(values)
    section = None
    for r in results:
        if r.section != section:
            section = r.section
            click.echo(f"{section}:")
        click.echo(f"  {r.line()}")
    missing = [r for r in results if not r.ok]
    if missing:
        raise VerifyError(f"{path}: {len(missing)} required option(s) missing")
    say(f"{path}: all {len(results)} required options are enabled")
    return 0


@kernel.command("doctor")
@click.argument("config", required=False, metavar="[CONFIG|BUILD_DIR]")
@click.option("--boot-log", type=click.Path(dir_okay=False), help="A guest console log.")
def kernel_doctor(config, boot_log):
    """Diagnose the common configuration problems from a config, a boot log, or both."""
    from qemubox.kernel.doctor import diagnose

    values = None
    if config or not boot_log:
        _, values = _config_values(config)
    log = None
    if boot_log:
        try:
            log = Path(boot_log).read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise InputError(f"cannot read {boot_log}: {err.strerror}") from None
    findings = diagnose(values, log)
    for finding in findings:
        click.echo(finding.render())
    if findings:
        raise VerifyError(f"{len(findings)} problem(s) found")
    say("no known problem found")
    return 0


@kernel.command("menuconfig")
@_build_options
@click.option(
    "--save",
    default="menuconfig.config",
    show_default=True,
    metavar="FRAGMENT",
    help="Write the options you changed to this fragment.",
)
def kernel_menuconfig(save, **kw):
    """Configure interactively on top of what `kernel build` would configure.

    Your changes are saved as a fragment (pass it to `kernel build -f`), and the result is
    verified again against the profile's fragments.
    """
    from qemubox.kernel.menuconfig import menuconfig

    outcome = menuconfig(_request(**kw), Path(save))
    for line in outcome.mismatch_lines:
        click.echo(line)
    if outcome.backup:
        say(f"kept the previous {save} as {outcome.backup}")
    if outcome.changed:
        say(
            f"{len(outcome.changed)} change(s) saved to {save}; build with: "
            f"qemubox kernel build -f {save} ..."
        )
    else:
        say("no changes")
    if outcome.mismatch_lines:
        raise VerifyError("your changes undo options the profile needs (see above)")
    return 0
