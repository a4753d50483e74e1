"""What bisection asks of git, each a ``git -C TREE`` call; git's refusals become one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

from qemubox.errors import InputError, ToolError


def git(tree: Path, *args: str, check: bool = True) -> str:
    """git's stdout; its stderr's last line as a ToolError when it fails and ``check``."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(tree), *args], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise InputError("git is not installed (apt-get install git)") from None
    if proc.returncode != 0 and check:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ToolError(f"git {args[0]} in {tree}: {why}")
    return proc.stdout if proc.returncode == 0 else ""


def toplevel(tree: Path) -> Path:
    """The top of the git checkout ``tree`` is (InputError when it is none)."""
    if not tree.is_dir():
        raise InputError(f"--source {tree}: no such directory")
    top = git(tree, "rev-parse", "--show-toplevel", check=False).strip()
    if not top:
        raise InputError(f"--source {tree}: not a git checkout (bisection needs its history)")
    return Path(top)


def commit(tree: Path, rev: str, what: str) -> str:
    """The full hash of the commit ``rev`` names (InputError naming ``what`` when none)."""
    if rev.startswith("-"):
        raise InputError(f"{what} {rev}: not a revision")
    found = git(tree, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if not found.strip():
        raise InputError(f"{what} {rev}: no such commit in {tree}")
    return found.strip()


def subject(tree: Path, sha: str) -> str:
    return git(tree, "log", "-1", "--format=%s", sha).strip()


def is_ancestor(tree: Path, older: str, newer: str) -> bool:
    return (
        subprocess.run(
            ["git", "-C", str(tree), "merge-base", "--is-ancestor", older, newer],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )


def changed_files(tree: Path) -> list[str]:
    """Tracked files with changes not committed (a checkout would carry or refuse them)."""
    out = git(tree, "status", "--porcelain", "--untracked-files=no")
    return [line[3:] for line in out.splitlines() if line.strip()]


def bisecting(tree: Path) -> bool:
    """Whether a bisection is under way in ``tree`` already."""
    return bool(git(tree, "bisect", "log", check=False).strip())


def head(tree: Path) -> str:
    """What HEAD is: its branch (refs/heads/...), else the commit it is detached at."""
    branch = git(tree, "symbolic-ref", "--quiet", "HEAD", check=False).strip()
    return branch.removeprefix("refs/heads/") if branch else git(tree, "rev-parse", "HEAD").strip()
