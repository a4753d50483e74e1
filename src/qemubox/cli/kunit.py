"""``qemubox kunit``: kunit.py's run — configure from .kunitconfig fragments (verified and
explained), build, boot, read the KTAP — with the matrix's summary, JSON and JUnit XML."""

from __future__ import annotations

from pathlib import Path

import click

from qemubox.arch import ARCHES
from qemubox.cli.common import CONTEXT, say
from qemubox.cli.matrix import _Live, _writable
from qemubox.errors import Exit, InputError
from qemubox.kernel.profiles import DEFAULT, PROFILES


def _tree(source: str | None) -> tuple[str | None, Path]:
    """The tree to build (None: Debian's 6.12 source) and where its files are: --source, or
    the current directory when it is a kernel tree."""
    from qemubox.kernel.source import debian_source
    from qemubox.linux.tree import is_source_tree

    if source is not None:
        path = Path(source).expanduser().absolute()
        if not is_source_tree(path):
            raise InputError(f"--source {source}: not a kernel source tree")
        return str(path), path
    here = Path.cwd()
    if is_source_tree(here):
        return str(here), here
    return None, debian_source("6.12")


def _show(result) -> tuple[int, int, int]:
    """A boot's suites, a failed case's log under it; (passed, failed, skipped) cases."""
    from collections import Counter

    totals: Counter[str] = Counter()
    for suite in result.subtests:
        cases = list(_leaves(suite))
        n = Counter(case["status"] for _, case in cases)
        mark = "FAILED" if n["fail"] else "PASSED"
        click.echo(f"[{mark}] {suite['name']} ({n['pass']} passed, {n['fail']} failed, "
            f"{n['skip']} skipped)")  # fmt: skip
        for path, case in cases:
            if case["status"] == "fail":
                click.echo(f"    [FAILED] {path}")
                for line in case.get("log", []):
                    click.echo(f"        {line}")
        totals += n
    return totals["pass"], totals["fail"], totals["skip"]


def _leaves(test: dict, prefix: str = ""):
    path = f"{prefix}.{test['name']}" if prefix else test["name"]
    if not test["subtests"]:
        yield path, test
    for sub in test["subtests"]:
        yield from _leaves(sub, path)


@click.command(context_settings=CONTEXT)
@click.option(
    "--source",
    metavar="TREE",
    help="The kernel tree (default: the current directory if it is one, else Debian's 6.12).",
)
@click.option(
    "--kunitconfig",
    "kunitconfig",
    multiple=True,
    metavar="PATH",
    help="A .kunitconfig, or a directory with one; repeatable (default: the tree's "
    "tools/testing/kunit/configs/default.config).",
)
@click.option("--arch", type=click.Choice(list(ARCHES)), help="The guest's architecture.")
@click.option("--profile", default=DEFAULT, show_default=True, type=click.Choice(list(PROFILES)))
@click.option("-m", "--memory", default="512M", show_default=True, help="Guest memory.")
@click.option("--timeout", default=300.0, show_default=True, metavar="S", type=float,
              help="A boot's limit, its suites included.")  # fmt: skip
@click.option("--json", "json_out", metavar="OUT", help="Write one JSON record per boot.")
@click.option("--junit", "junit_out", metavar="OUT", help="Write JUnit XML.")
@click.argument("filters", nargs=-1, metavar="[FILTER]...")
def kunit(source, kunitconfig, arch, profile, memory, timeout, json_out, junit_out, filters):
    """Run KUnit suites as kunit.py does: the .kunitconfig fragments on top of the sandbox
    kernel's, verified (an option that does not stick is explained), the tree built
    (cached), booted once per FILTER (SUITE[.TEST], wildcards: kunit.filter_glob; none: every
    suite), and the KTAP the suites print read into a summary; a failed case's log is shown.
    Exit status 0 when every case passed or was skipped, 1 otherwise."""
    from qemubox.kernel.build import BuildRequest, ConfigMismatchError
    from qemubox.matrix import report
    from qemubox.matrix.kunit import kunitconfigs, matrix
    from qemubox.service.actions import KernelBuild, RunMatrix, perform

    if timeout <= 0:
        raise InputError(f"--timeout {timeout:g}: must be positive")
    json_path, junit_path = _writable(json_out, "--json"), _writable(junit_out, "--junit")
    build_source, tree = _tree(source)
    configs = kunitconfigs(tree, kunitconfig)
    options = (("boot_timeout", timeout), ("memory", memory), ("timeout", timeout))
    m = matrix(build_source, configs, list(dict.fromkeys(filters)), arch, profile, options)
    # Built here first: a .kunitconfig option that does not stick is explained, line by line
    # (the matrix then finds the build done).
    spec = m.kernels[0]
    request = BuildRequest(
        source=spec.source, arch=spec.arch, profile=spec.profile, fragments=spec.fragments,
        output=None,
    )  # fmt: skip
    try:
        perform(KernelBuild(request))
    except ConfigMismatchError as err:
        for line in err.lines:
            click.echo(line)
        raise
    with _Live(m.cells) as live:
        results = perform(RunMatrix(m, None, None, True), live)
    if json_path:
        report.write_json(results, json_path)
    if junit_path:
        report.write_junit(results, junit_path, "kunit")
    passed = failed = skipped = 0
    for r in results:
        if r.error:
            say(f"qemubox kunit: {r.cell}: {r.error}")
        if r.console_tail:
            say(f"--- {r.cell}: guest console (last lines) ---\n{r.console_tail}\n---")
        p, f, s = _show(r)
        passed, failed, skipped = passed + p, failed + f, skipped + s
    total = passed + failed + skipped
    click.echo(f"Testing complete. Ran {total} tests: passed: {passed}, failed: {failed}, "
               f"skipped: {skipped}")  # fmt: skip
    ok = all(r.status == "pass" for r in results) and failed == 0
    return Exit.OK if ok else Exit.MISMATCH
