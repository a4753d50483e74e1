"""``qemubox kconfig``: merge, apply and verify config fragments."""

from __future__ import annotations

from pathlib import Path

import click

from qemubox.cli.common import CONTEXT, Group, say
from qemubox.errors import InputError, VerifyError

# --- kconfig ----------------------------------------------------------------------------------


@click.group(cls=Group, context_settings=CONTEXT)
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
        say(f"wrote {result.config}{kept}")
    else:
        say(f"{result.config} is already up to date")
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
        say(f"kept the previous {path} as {backup}")


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
        say(f"{config}: all {len(merged.verified())} verified options have their wanted values")
    return _report(tree, Path(config), mismatches, explain)


@kconfig.command("ls")
def kconfig_list():
    """List the fragments shipped with qemubox (usable by name in place of a path)."""
    from qemubox.kconfig.catalog import shipped_fragments

    for frag in shipped_fragments().values():
        click.echo(f"{frag.name:<10} {frag.summary}")
    return 0
