"""A bisection: checked before anything is touched, ``git bisect run`` over step.py, the
first bad commit read from git, and the tree put back as it was whatever happens."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qemubox.bisect import git as g
from qemubox.errors import InputError, ToolError
from qemubox.kernel.profiles import DEFAULT, PROFILES
from qemubox.linux.tree import is_source_tree

_FIRST_BAD = re.compile(r"^([0-9a-f]{40}) is the first bad commit", re.M)
_ANY_OF = "The first bad commit could be any of:"
STOP_GRACE = 10.0  # seconds a stopped step gets to end its QEMU and make before it is killed


@dataclass(frozen=True)
class BisectRequest:
    tree: str
    good: str
    bad: str
    run_args: tuple[str, ...]  # `qemubox run`'s options, then -- and the command
    arch: str | None = None
    profile: str = DEFAULT
    fragments: tuple[str, ...] = ()  # on top of the profile: shipped names, or files


@dataclass(frozen=True)
class Step:
    """One revision judged."""

    commit: str
    subject: str
    verdict: str  # good, bad or skip
    exit_code: int | None  # `qemubox run`'s (None: not run, the build failed)
    built: bool  # whether make ran (a revision built before is taken from the cache)
    build_seconds: float | None
    seconds: float
    note: str = ""


@dataclass(frozen=True)
class BisectResult:
    first_bad: str | None  # None: only skipped revisions were left (see candidates)
    subject: str
    candidates: tuple[str, ...]
    steps: tuple[Step, ...]


def check(req: BisectRequest) -> tuple[Path, str, str, tuple[str, ...]]:
    """The tree's top, the good and bad commits, and the fragments (files by absolute path:
    each step runs in the tree): everything checked, nothing touched."""
    if req.profile not in PROFILES:
        raise InputError(f"--profile {req.profile}: one of {', '.join(PROFILES)}")
    fragments = tuple(_fragment(f) for f in req.fragments)
    tree = g.toplevel(Path(req.tree).expanduser().absolute())
    if not is_source_tree(tree):
        raise InputError(f"--source {req.tree}: not a kernel source tree (no Makefile, Kconfig)")
    good = g.commit(tree, req.good, "--good")
    bad = g.commit(tree, req.bad, "--bad")
    if good == bad:
        raise InputError(f"--good {req.good} and --bad {req.bad} are the same commit")
    if not g.is_ancestor(tree, good, bad):
        raise InputError(f"--good {req.good} is not an ancestor of --bad {req.bad}")
    if g.bisecting(tree):
        raise InputError(f"{tree}: a bisection is under way there (`git bisect reset` ends it)")
    changed = g.changed_files(tree)
    if changed:
        raise InputError(
            f"{tree}: {len(changed)} file(s) with uncommitted changes ({changed[0]}...): "
            "commit or stash them first"
        )
    return tree, good, bad, fragments


def _fragment(arg: str) -> str:
    from qemubox.kconfig.catalog import resolve_fragment

    try:
        found = resolve_fragment(arg)
    except InputError as err:
        raise InputError(f"--fragment {err}") from None
    return str(found.absolute()) if found == Path(arg) else arg  # a file, or a shipped name


def bisect(req: BisectRequest, echo: Callable[[str], None]) -> BisectResult:
    """Find the first bad commit between ``req.good`` and ``req.bad``; ``echo`` shows git's
    lines as they come (each step shows its own on stderr)."""
    tree, good, bad, fragments = check(req)
    original = g.head(tree)
    with tempfile.TemporaryDirectory(prefix="qemubox-bisect-") as d:
        spec, record = Path(d) / "step.json", Path(d) / "steps.jsonl"
        spec.write_text(
            json.dumps(
                {
                    "tree": str(tree),
                    "arch": req.arch,
                    "profile": req.profile,
                    "fragments": list(fragments),
                    "run_args": list(req.run_args),
                    "record": str(record),
                }
            )
        )
        try:
            for line in g.git(tree, "bisect", "start", bad, good).splitlines():
                echo(line)
            output = _run(tree, spec, echo)
        finally:
            try:
                g.git(tree, "bisect", "reset", original)
            except ToolError as err:
                raise ToolError(
                    f"{err}; to put the tree back: git -C {tree} bisect reset {original}"
                ) from None
        steps = tuple(Step(**json.loads(line)) for line in _lines(record))
    found = _FIRST_BAD.search(output)
    if found:
        return BisectResult(found.group(1), g.subject(tree, found.group(1)), (), steps)
    if _ANY_OF in output:
        rest = output.split(_ANY_OF, 1)[1].split()
        candidates = tuple(w for w in rest if re.fullmatch(r"[0-9a-f]{40}", w))
        return BisectResult(None, "", candidates, steps)
    tail = output.strip().splitlines()[-1:] or ["no output"]
    raise ToolError(f"git bisect run in {tree} did not finish: {tail[0]}")


def _run(tree: Path, spec: Path, echo: Callable[[str], None]) -> str:
    """``git bisect run`` over the step, in a process group of its own (an interrupt here
    stops it whole, its QEMU and make with it); its output."""
    command = ["git", "-C", str(tree), "bisect", "run"]
    command += [sys.executable, "-m", "qemubox.bisect.step", str(spec)]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            echo(line.rstrip("\n"))
        proc.wait()
    except BaseException:
        _stop(proc)
        raise
    return "".join(lines)


def _stop(proc: subprocess.Popen) -> None:
    """Interrupt the whole group (git, the step, its make or `qemubox run`) and wait until
    every member is gone (killed after STOP_GRACE): nothing may touch the tree after."""
    deadline = time.monotonic() + STOP_GRACE
    sig = signal.SIGINT
    while True:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.1)
        if time.monotonic() > deadline + STOP_GRACE:
            break  # only unreaped orphans can be left
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        elif sig == signal.SIGINT:
            sig = 0  # asked once; now only whether any member is left
    proc.wait()


def _lines(path: Path) -> list[str]:
    with contextlib.suppress(OSError):
        return [line for line in path.read_text().splitlines() if line.strip()]
    return []
