"""The ``qemubox`` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from qemubox import __version__
from qemubox.errors import EXIT_INPUT, InputError, QemuboxError, VerifyError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _err(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="qemubox")
def cli() -> None:
    """QEMU as a fast, scriptable sandbox for Linux kernels and untrusted commands."""


# --- kconfig ----------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def kconfig() -> None:
    """Merge, apply and verify kernel config fragments."""


def _kernel_tree(kernel_dir, kernel_version, build_dir, arch):
    """A KernelTree from the options, or None when no kernel was named."""
    from qemubox.kernel.source import debian_source
    from qemubox.linux.tree import KernelTree

    if kernel_dir and kernel_version:
        raise InputError("give --kernel-dir or --kernel-version, not both")
    if kernel_version:
        kernel_dir = debian_source(kernel_version)
    if not kernel_dir:
        return None
    return KernelTree.open(kernel_dir, build_dir, arch)


_kernel_options = [
    click.option(
        "--kernel-dir", "-k", metavar="SRC", help="Kernel source tree to apply the fragments to."
    ),
    click.option(
        "--kernel-version",
        metavar="X.Y",
        help="Use Debian's linux-source-X.Y (extracted once into the cache) as the tree.",
    ),
    click.option(
        "--build-dir", "-O", metavar="DIR", help="Out-of-tree build directory (make O=DIR)."
    ),
    click.option("--arch", metavar="ARCH", help="Kernel ARCH (default: the host's)."),
    click.option("--explain", is_flag=True, help="Say why each option that did not stick did not."),
]


def kernel_options(func):
    for option in reversed(_kernel_options):
        func = option(func)
    return func


def _report(tree, config: Path, mismatches, explain: bool) -> int:
    """Print mismatches (and why); the exit status of a verification."""
    if not mismatches:
        return 0
    reasons = {}
    if explain:
        from qemubox.kconfig.explain import explain_mismatches

        reasons = explain_mismatches(tree, config, mismatches)
    for m in mismatches:
        click.echo(str(m))
        for line in reasons.get(m.name, []):
            click.echo(f"    {line}")
    hint = "" if explain else " (--explain says why)"
    raise VerifyError(f"{len(mismatches)} option(s) did not get their wanted values{hint}")


@kconfig.command("merge")
@click.argument("fragments", nargs=-1, required=True)
@click.option("-o", "--output", metavar="OUT", help="Write the merged fragment here.")
@click.option(
    "--base",
    metavar="TARGET|FILE",
    help="Base config made first (tinyconfig, defconfig, ... or a config file).",
)
@kernel_options
def kconfig_merge(fragments, output, base, kernel_dir, kernel_version, build_dir, arch, explain):
    """Merge FRAGMENTS (files, shipped fragment names, or - for stdin).

    Without a kernel tree, write the merged fragment in .config syntax to OUT or stdout.
    With one, write the tree's .config (the previous one is kept as .config.old), run
    olddefconfig and verify that every option outside silent blocks has its wanted value.
    """
    from qemubox.kconfig.engine import apply_fragments, load_fragments

    tree = _kernel_tree(kernel_dir, kernel_version, build_dir, arch)
    if tree is None:
        given = [
            n
            for n, v in (
                ("--base", base),
                ("--build-dir", build_dir),
                ("--arch", arch),
                ("--explain", explain),
            )
            if v
        ]
        if given:
            raise InputError(f"{', '.join(given)} need(s) a kernel tree (--kernel-dir)")
        text = load_fragments(fragments).text()
        if output:
            _write_keeping_old(Path(output), text)
        else:
            click.echo(text, nl=False)
        return 0
    if output:
        raise InputError(
            f"-o is for merging without a kernel tree; the result is {tree.config_path}"
        )
    merged = load_fragments(fragments)
    result = apply_fragments(tree, merged, base)
    if result.changed:
        kept = f"; the previous one is {result.backup}" if result.backup else ""
        _err(f"wrote {result.config}{kept}")
    else:
        _err(f"{result.config} is already up to date")
    return _report(tree, result.config, result.mismatches, explain)


def _write_keeping_old(path: Path, text: str) -> None:
    """Write a user's output file; a different previous one is kept (and we say so)."""
    from qemubox.paths import write_keeping_old

    try:
        backup = write_keeping_old(path, text)
    except IsADirectoryError:
        raise InputError(f"{path} is a directory") from None
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror}") from None
    if backup:
        _err(f"kept the previous {path} as {backup}")


@kconfig.command("check")
@click.option("--config", "config", required=True, metavar="PATH", help="The .config to check.")
@click.argument("fragments", nargs=-1, required=True)
@kernel_options
def kconfig_check(config, fragments, kernel_dir, kernel_version, build_dir, arch, explain):
    """Verify an existing .config against FRAGMENTS, changing nothing."""
    from qemubox.kconfig.engine import load_fragments, read_config
    from qemubox.kconfig.verify import verify

    tree = _kernel_tree(kernel_dir, kernel_version, build_dir, arch)
    if explain and tree is None:
        raise InputError("--explain needs the kernel tree (--kernel-dir or --kernel-version)")
    merged = load_fragments(fragments)
    mismatches = verify(merged, read_config(Path(config)))
    if not mismatches:
        _err(f"{config}: all {len(merged.verified())} verified options have their wanted values")
    return _report(tree, Path(config), mismatches, explain)


@kconfig.command("list")
def kconfig_list():
    """List the fragments shipped with qemubox (usable by name in place of a path)."""
    from qemubox.kconfig.catalog import shipped_fragments

    for frag in shipped_fragments().values():
        click.echo(f"{frag.name:<10} {frag.summary}")
    return 0


# --- kernel -----------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
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
        click.option("--arch", metavar="ARCH", help="x86_64 (default on this host) or arm64."),
        click.option(
            "--profile",
            default="minimal",
            show_default=True,
            type=click.Choice(["minimal", "default", "small", "fastboot", "debug"]),
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
    default="build/kernel",
    show_default=True,
    metavar="DIR",
    help="Where the kernel, config, System.map, vmlinux and modules go.",
)
def kernel_build(output, **kw):
    """Configure (verified), build and install a guest kernel.

    Builds are cached by source, configuration and arch: a build with nothing changed
    returns at once, and a small change rebuilds incrementally.
    """
    from qemubox.kernel.build import ConfigMismatchError, build_kernel

    try:
        result = build_kernel(_request(output=Path(output), **kw))
    except ConfigMismatchError as err:
        for line in err.lines:
            click.echo(line)
        raise
    for note in result.notes:
        _err(note)
    m = result.manifest
    how = "built" if result.ran_make else "up to date, nothing to build"
    _err(f"{how}: Linux {m['version']} ({m['arch']}, {m['profile']}) in {result.output}")
    return 0


@kernel.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the build manifests as JSON.")
def kernel_list(as_json):
    """List built kernels: version, arch, profile, date, path."""
    import json

    from qemubox.kernel.build import list_builds

    builds = list_builds()
    if as_json:
        click.echo(json.dumps(builds, indent=2, sort_keys=True))
        return 0
    if not builds:
        _err("no kernels built yet (qemubox kernel build)")
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
    _err(f"{path}: all {len(results)} required options are enabled")
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
    _err("no known problem found")
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
        _err(f"kept the previous {save} as {outcome.backup}")
    if outcome.changed:
        _err(
            f"{len(outcome.changed)} change(s) saved to {save}; build with: "
            f"qemubox kernel build -f {save} ..."
        )
    else:
        _err("no changes")
    if outcome.mismatch_lines:
        raise VerifyError("your changes undo options the profile needs (see above)")
    return 0


# --- run --------------------------------------------------------------------------------------


def _split_guest(spec: str, what: str) -> tuple[str, str]:
    """``HOST:/guest/path`` split at the last ':' that starts an absolute guest path."""
    at = spec.rfind(":/")
    if at <= 0:
        raise InputError(f"{what} {spec!r}: expected HOST:GUEST with an absolute GUEST path")
    return spec[:at], spec[at + 1 :]


def _ro_suffix(spec: str) -> tuple[str, bool]:
    for suffix, ro in ((":ro", True), (":rw", False)):
        if spec.endswith(suffix):
            return spec[: -len(suffix)], ro
    return spec, False


def _parse_volume(spec: str):
    from qemubox.vm.spec import FSShare

    body, ro = _ro_suffix(spec)
    host, guest = _split_guest(body, "--volume")
    return FSShare(host_path=host, mount_point=guest, read_only=ro)


def _parse_share(spec: str):
    from qemubox.vm.spec import FSShare

    body, ro = _ro_suffix(spec)
    rest, guest = _split_guest(body, "--share")
    host, sep, tag = rest.rpartition(":")
    if not sep or not host or not tag:
        raise InputError(f"--share {spec!r}: expected HOST:TAG:GUEST[:ro]")
    return FSShare(host_path=host, mount_point=guest, mount_tag=tag, read_only=ro)


def _parse_disk(spec: str):
    from qemubox.vm.spec import Disk

    size, sep, rest = spec.partition(":")
    if not sep or not rest.startswith("/"):
        raise InputError(f"--disk {spec!r}: expected SIZE:GUEST[:PATH]")
    guest, sep, path = rest.partition(":")
    return Disk(size=size, mount_point=guest, path=path or None)


def _parse_publish(spec: str) -> tuple[int, int]:
    host, sep, guest = spec.partition(":")
    if not sep or not host.isdigit() or not guest.isdigit():
        raise InputError(f"--publish {spec!r}: expected HOST_PORT:GUEST_PORT (numbers)")
    return int(host), int(guest)


def _parse_env(specs) -> dict[str, str]:
    env = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not key or any(c in key for c in " \0"):
            raise InputError(f"--env {spec!r}: expected KEY=VALUE")
        if not sep:
            if key not in os.environ:
                continue
            value = os.environ[key]
        env[key] = value
    return env


@cli.command(context_settings={**CONTEXT, "allow_interspersed_args": False})
@click.option("-m", "--memory", default="512M", show_default=True, help="Guest memory.")
@click.option("-c", "--cpus", default=1, show_default=True, type=click.IntRange(1, 64))
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
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="Kill the command after S seconds (exit status 124).",
)
@click.option(
    "--boot-timeout",
    default=60.0,
    show_default=True,
    metavar="S",
    type=click.FloatRange(min=0, min_open=True),
)
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

    from qemubox.sandbox.sandbox import Sandbox
    from qemubox.vm.spec import Session

    session = Session(
        memory=memory,
        cpus=cpus,
        balloon=balloon,
        shares=[*map(_parse_volume, volumes), *map(_parse_share, shares)],
        disks=[_parse_disk(d) for d in disks],
        network=net,
        ports=[_parse_publish(p) for p in publish],
        kernel=kernel,
        modules=modules,
        timeout=timeout,
        boot_timeout=boot_timeout,
        accel=accel,
        console_log=console_log,
    )
    sandbox = Sandbox(session)
    if dry_run:
        try:
            cfg = sandbox.prepare(dry_run=True)
            from qemubox.sandbox import qemu

            click.echo(shlex.join(qemu.qemu_args(cfg)))
        finally:
            sandbox.close()
        return 0

    out, err = sys.stdout.buffer, sys.stderr.buffer

    def to(stream):
        def write(data: bytes) -> None:
            stream.write(data)
            stream.flush()

        return write

    with sandbox:
        result = sandbox.exec(
            list(command),
            env=_parse_env(env),
            cwd=workdir,
            on_stdout=to(out),
            on_stderr=to(err),
            stdin_stream=sys.stdin.buffer if interactive else None,
        )
    if result.timed_out:
        _err(f"qemubox: the command timed out after {timeout:g} s and was killed")
        return 124
    return result.exit_code


# --- entry point ------------------------------------------------------------------------------


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _err(f"qemubox: warning: {message}")


def _internal_error(exc: Exception) -> int:
    if os.environ.get("QEMUBOX_DEBUG"):
        raise exc
    _err(f"qemubox: internal error: {type(exc).__name__}: {exc} (QEMUBOX_DEBUG=1 shows more)")
    return 70


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: errors become one line on stderr and an exit status, never a traceback."""
    import warnings

    warnings.showwarning = _show_warning
    try:
        code = cli.main(args=argv, prog_name="qemubox", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        _err("qemubox: aborted")
        code = 130
    except KeyboardInterrupt:
        _err("qemubox: interrupted")
        code = 130
    except QemuboxError as exc:
        tail = getattr(exc, "log_tail", "") if getattr(exc, "show_tail", False) else ""
        if tail:
            _err(tail)
        console = getattr(exc, "console_tail", "")
        if console:
            _err("--- guest console (last lines) ---\n" + console + "\n---")
        _err(f"qemubox: error: {exc}")
        code = exc.exit_code
    except BrokenPipeError:
        code = 0
    except OSError as exc:
        if exc.filename is None:
            code = _internal_error(exc)
        else:
            # A file the user named (or where output must go) cannot be made or used.
            _err(f"qemubox: error: {exc.filename}: {exc.strerror or exc}")
            code = EXIT_INPUT
    except Exception as exc:  # the last line of defence: no traceback for the user
        code = _internal_error(exc)
    sys.exit(code if isinstance(code, int) else (0 if code is None else EXIT_INPUT))
