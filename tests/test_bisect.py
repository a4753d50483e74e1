"""`qemubox bisect`: git bisect run over real builds and boots of a real history (the 6.12
source in a git repository, conftest.py's linux_history: one commit adds a bad boot message,
a later one breaks the build), the first bad commit found, the tree left as it was (also
when interrupted); and every refusal before anything is touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import BAD_BOOT_MESSAGE, commit, git, qemubox
from qemubox.bisect.step import BAD, GOOD, SKIP, verdict

CHECK = ["sh", "-c", f"! dmesg | grep -q '{BAD_BOOT_MESSAGE}'"]


def test_each_revision_is_judged_by_its_commands_exit_status():
    assert [verdict(c) for c in (0, 125, 1, 2, 121, 122, 124, 130)] == [
        GOOD, SKIP, BAD, BAD, BAD, BAD, BAD, BAD,
    ]  # fmt: skip


@pytest.fixture
def small_tree(tmp_path):
    """A git checkout shaped like a kernel tree, with two commits."""
    tree = tmp_path / "linux"
    (tree / "arch").mkdir(parents=True)
    (tree / "Kconfig").write_text("")
    (tree / "Makefile").write_text("VERSION = 6\n")
    git(tree, "init", "-q", "-b", "main")
    git(tree, "add", "-A")
    first = commit(tree, "one")
    (tree / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 12\n")
    return tree, first, commit(tree, "two")


@pytest.mark.parametrize(
    ("change", "args", "message"),
    [
        (None, ["--good", "nope"], "--good nope: no such commit in"),
        (None, ["--good", "HEAD", "--bad", "HEAD~1"], "is not an ancestor of --bad HEAD~1"),
        (None, ["--good", "HEAD", "--bad", "main"], "are the same commit"),
        ("dirty", [], "1 file(s) with uncommitted changes (Makefile...): commit or stash them"),
        ("bisecting", [], "a bisection is under way there (`git bisect reset` ends it)"),
        (None, ["--kernel", "x"], "--kernel does not go with it"),
        (None, ["--name", "x"], "--name does not go with it"),
        (None, ["-m", "1"], "memory '1' is too small"),
        (None, ["-f", "nosuch"], "--fragment no such fragment: nosuch (not a file, nor one"),
    ],
)
def test_a_bisection_that_cannot_be_done_is_refused_before_the_tree_is_touched(
    small_tree, change, args, message
):
    tree, first, second = small_tree
    if change == "dirty":
        (tree / "Makefile").write_text("changed\n")
    if change == "bisecting":
        git(tree, "bisect", "start", second, first)
    before = (git(tree, "status", "--porcelain"), git(tree, "rev-parse", "HEAD"))
    own = [a for a in args if a in ("--good", "--bad")]
    defaults = [*(["--good", first] if "--good" not in own else []),
                *(["--bad", second] if "--bad" not in own else [])]  # fmt: skip
    r = qemubox("bisect", "--source", tree, *defaults, *args, "--", "true")
    assert (r.code, r.err.count("\n")) == (2, 1) and message in r.err, r.err
    assert (git(tree, "status", "--porcelain"), git(tree, "rev-parse", "HEAD")) == before


def test_a_tree_that_is_no_git_checkout_is_refused(tmp_path):
    r = qemubox("bisect", "--source", tmp_path, "--good", "a", "--bad", "b", "--", "true")
    assert (r.code, r.err) == (
        2,
        f"qemubox: error: --source {tmp_path}: not a git checkout (bisection needs its history)\n",
    )


@pytest.mark.kernel
@pytest.mark.qemu
def test_bisect_finds_the_commit_that_added_a_bad_boot_message_and_leaves_the_tree_as_it_was(
    linux_history,
):
    """Built with KUnit's configuration (the tree's .kunitconfig), as a KUnit failure is
    bisected: `qemubox kunit` on the tree goes on from these builds (test_kunit.py)."""
    tree, commits = linux_history
    r = qemubox(
        "bisect", "--source", tree, "--good", commits["base"], "--bad", commits["doc"],
        "-f", "kunit", "-f", tree / ".kunitconfig", "-m", "256M", "--", *CHECK, timeout=3000,
    )  # fmt: skip
    assert r.code == 0, r.err[-3000:]
    assert r.out == f"{commits['bad']} is the first bad commit: init: print a bad boot message\n"
    # The broken revision was tested first (the middle), and skipped; each step said so live.
    assert "init: break the build: skip (the build failed:" in r.err
    assert f"{commits['bad'][:12]} init: print a bad boot message: bad (exit status 1)" in r.err
    assert git(tree, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(tree, "rev-parse", "HEAD") == commits["kunit"]
    assert git(tree, "status", "--porcelain", "--untracked-files=all") == ""
    assert not (tree / ".git" / "BISECT_LOG").exists()

    # Again, from a detached HEAD, interrupted while a step's command runs: the revisions
    # built above build nothing, and the tree is left detached where it was.
    git(tree, "checkout", "-q", "--detach", commits["fixed"])  # left detached, as found
    proc = subprocess.Popen(
        [sys.executable, "-m", "qemubox", "bisect", "--source", str(tree),
         "--good", commits["base"], "--bad", commits["doc"],
         "-f", "kunit", "-f", str(tree / ".kunitconfig"), "--", "sleep", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    seen = []
    assert proc.stderr is not None
    deadline = time.monotonic() + 600
    for line in proc.stderr:
        seen.append(line)
        if "running the command" in line or time.monotonic() > deadline:
            break
    assert "built before; running the command" in "".join(seen), "".join(seen)
    time.sleep(2)  # the command is in its sandbox
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C at a terminal
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + err
    assert "Traceback" not in err
    assert git(tree, "rev-parse", "HEAD") == commits["fixed"]
    detached = subprocess.run(["git", "-C", str(tree), "symbolic-ref", "-q", "HEAD"], check=False)
    assert detached.returncode == 1
    assert git(tree, "status", "--porcelain", "--untracked-files=all") == ""
    assert not (tree / ".git" / "BISECT_LOG").exists()
    git(tree, "checkout", "-q", "main")
