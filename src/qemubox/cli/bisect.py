"""`qemubox bisect`: the first bad commit of a kernel tree, each revision built and booted."""

from __future__ import annotations

import click

from qemubox.cli.common import CONTEXT, say
from qemubox.errors import InputError
from qemubox.kernel.profiles import DEFAULT, PROFILES

# `run`'s options that make no sense for a bisection's steps, and why
_REFUSED = {
    "kernel": "each step boots the tree's build",
    "name": "each step runs in a sandbox of its own",
    "detach": "a step needs the command's exit status",
    "remove": "each step's sandbox goes with it",
    "interactive": "a step has no standard input",
    "dry_run": "a bisection runs builds",
    "ttl": "each step's sandbox goes with it",
}


def _checked_run_args(args: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """Parse ``args`` as `qemubox run`'s would be, refusing what a step cannot take: the
    options, ``--`` and the command, as each step hands them to `qemubox run`; the guest's
    arch, if given."""
    from qemubox.cli.run import run
    from qemubox.service.session import SessionRequest

    try:
        ctx = run.make_context("run", list(args), resilient_parsing=False)
    except click.UsageError as err:
        raise InputError(f"bisect: {err.format_message()}") from None
    params = dict(ctx.params)
    for name, why in _REFUSED.items():
        if params.get(name):
            raise InputError(f"bisect: --{name.replace('_', '-')} does not go with it ({why})")
    if not params.get("command"):
        raise InputError("bisect needs a command to judge each revision: -- CMD...")
    command = tuple(params["command"])
    options = list(args[: len(args) - len(command)])
    if options[-1:] == ["--"]:
        options.pop()
    SessionRequest.take(params).session().validate()
    return (*options, "--", *command), params.get("arch")


@click.command(
    context_settings={**CONTEXT, "ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.option(
    "--source",
    "tree",
    default=".",
    show_default=True,
    metavar="TREE",
    help="The kernel tree: a git checkout with no uncommitted changes.",
)
@click.option("--good", required=True, metavar="REV", help="A revision where CMD succeeds.")
@click.option("--bad", required=True, metavar="REV", help="A later one where it fails.")
@click.option(
    "--profile",
    default=DEFAULT,
    show_default=True,
    type=click.Choice(list(PROFILES)),
    help="How each revision is configured.",
)
@click.option(
    "-f",
    "--fragment",
    "fragments",
    multiple=True,
    metavar="NAME|FILE",
    help="A configuration fragment on top of the profile, as for `kernel build` (a "
    "shipped fragment's name, or a file: a .kunitconfig, say); repeatable.",
)
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED, metavar="[RUN OPTIONS] -- CMD...")
def bisect(tree, good, bad, profile, fragments, run_args):
    """Find the first bad commit between --good and --bad with `git bisect run`: each step
    builds the checkout (cached: a revision built before builds nothing), boots it with
    `qemubox run`'s options, and runs CMD: exit status 0 good, 125 skip, anything else bad;
    a build that fails is skipped. The tree is left at the revision it had, even when
    interrupted. Prints the first bad commit and its subject."""
    from qemubox.bisect.drive import BisectRequest
    from qemubox.service.actions import Bisect, perform

    run_args, arch = _checked_run_args(tuple(run_args))
    request = BisectRequest(tree, good, bad, run_args, arch, profile, tuple(fragments))
    result = perform(Bisect(request), say)
    for step in result.steps:
        how = "built" if step.built else ("failed to build" if step.exit_code is None else "cached")
        say(f"  {step.commit[:12]}  {step.verdict:<4}  {how:<15} {step.seconds:7.1f} s  "
            f"{step.subject}")  # fmt: skip
    if result.first_bad is None:
        say("qemubox bisect: only skipped revisions are left; the first bad commit is one of:")
        for sha in result.candidates:
            click.echo(sha)
        return 1
    click.echo(f"{result.first_bad} is the first bad commit: {result.subject}")
    return 0
