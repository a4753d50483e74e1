"""Fetching from Debian's mirror: a failure the mirror or the network caused is tried again
(a mirror in the middle of a sync serves an index of the wrong size), any other is said at
once; an update that brought some lists goes on with them; debootstrap starts again from an
empty tree."""

from __future__ import annotations

import os
import subprocess

import pytest

from qemubox import apt
from qemubox.errors import ToolError

SIZE = (
    "E: Failed to fetch http://mirror.test/debian-security/dists/bookworm-security/main/"
    "binary-armhf/Packages.xz  File has unexpected size (356624 != 356976). Mirror sync in "
    "progress?\nE: Some index files failed to download. They have been ignored, or old ones "
    "used instead.\n"
)


@pytest.fixture
def no_wait(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(apt, "RETRY_DELAYS", (3.0, 6.0, 12.0))
    monkeypatch.setattr(apt.time, "sleep", slept.append)
    return slept


def _done(code: int, err: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], code, "", err)


def test_what_the_mirror_or_the_network_caused_is_told_apart():
    assert apt.transient(SIZE)
    assert apt.transient("E: Could not connect to mirror.test:80, connection timed out")
    assert apt.transient("E: Failed to fetch http://m/x.deb  503  Service Unavailable")
    assert apt.transient("E: Hash Sum mismatch")
    assert not apt.transient("E: Unable to locate package linux-image-nothing")
    assert not apt.transient("E: Invalid operation frobnicate")


def test_a_mirror_failure_is_tried_four_times_and_another_failure_once(no_wait):
    runs = iter([_done(100, SIZE), _done(100, SIZE), _done(0)])
    assert apt.attempts("apt-get update", lambda: next(runs)).returncode == 0
    assert no_wait == [3.0, 6.0]
    no_wait.clear()
    tries = []
    with pytest.raises(ToolError, match=r"^apt-get update failed: E: Some index files failed"):
        apt.attempts("apt-get update", lambda: tries.append(1) or _done(100, SIZE))
    assert len(tries) == 4 and no_wait == [3.0, 6.0, 12.0]
    no_wait.clear()
    tries.clear()
    missing = "E: Unable to locate package nothing"
    with pytest.raises(ToolError, match=f"^apt-get download nothing failed: {missing}$"):
        apt.attempts("apt-get download nothing", lambda: tries.append(1) or _done(100, missing))
    assert len(tries) == 1 and no_wait == []


def test_an_update_that_brought_some_lists_goes_on_with_them(tmp_path, monkeypatch, no_wait):
    updates = []

    def mirror(args, cwd=None, env=None):
        assert args[-1] == "update"
        updates.append(args)
        (tmp_path / "lists" / "mirror_dists_bookworm_main_binary-armhf_Packages").touch()
        return _done(100, SIZE)  # bookworm-security's index failed, bookworm's came

    monkeypatch.setattr(apt, "_capture", mirror)
    monkeypatch.setattr(apt, "_UPDATED", set())
    options = apt._foreign("armhf", tmp_path)
    assert len(updates) == 1 and no_wait == []  # no tries again: it has what it needs
    assert (tmp_path / "partial").exists() and "APT::Architecture=armhf" in options
    apt._foreign("armhf", tmp_path)
    assert len(updates) == 1  # once per process
    apt._UPDATED.clear()  # the next process updates again, its lists being partial
    apt._foreign("armhf", tmp_path)
    assert len(updates) == 2
    # A whole update clears the mark; later processes use the lists as they are
    monkeypatch.setattr(apt, "_capture", lambda args, cwd=None, env=None: _done(0))
    apt._UPDATED.clear()
    apt._foreign("armhf", tmp_path)
    assert not (tmp_path / "partial").exists()
    # Nothing came at all: the mirror's failure, tried four times, then said
    monkeypatch.setattr(apt, "_capture", lambda args, cwd=None, env=None: _done(100, SIZE))
    apt._UPDATED.clear()
    with pytest.raises(ToolError, match=r"^apt-get update for i386 failed: E: Some index"):
        apt._foreign("i386", tmp_path / "i386")
    assert no_wait == [3.0, 6.0, 12.0]


@pytest.mark.skipif(os.geteuid() != 0, reason="building a Debian image needs root")
def test_debootstrap_starts_again_from_an_empty_tree_when_the_mirror_fails(
    tmp_path, monkeypatch, no_wait
):
    """A stand-in debootstrap on PATH: its first run leaves a half tree and blames the
    mirror, its second makes a tree; the image is made from the second alone."""
    from qemubox import arch as arches
    from qemubox.image import debian
    from qemubox.image.recipe import Recipe

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "debootstrap"
    stand_in.write_text(
        "#!/bin/sh\n"
        "for a; do tree=$prev; prev=$a; done\n"  # the tree is the last argument but one
        f'count={tmp_path}/runs; echo x >> "$count"\n'
        'mkdir -p "$tree/etc"\n'
        'if [ "$(wc -l < "$count")" = 1 ]; then\n'
        '  echo half > "$tree/etc/half"\n'
        f'  printf "%s" "{SIZE.splitlines()[0]}"; exit 1\n'
        "fi\n"
        'echo whole > "$tree/etc/whole"\n'
    )
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("QEMUBOX_CACHE_DIR", str(tmp_path / "cache"))
    recipe = Recipe("bookworm", arches.host().debian_arch, ())
    image = debian.build(recipe, "http://mirror.test/debian", "image")
    assert (tmp_path / "runs").read_text() == "x\nx\n" and no_wait == [3.0]
    listing = subprocess.run(
        [apt.program("debugfs", "e2fsprogs"), "-R", "ls -l /etc", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "whole" in listing and "half" not in listing and "hostname" in listing
    # A failure that is not the mirror's is said at once, its log's tail shown
    (tmp_path / "runs").write_text("")
    stand_in.write_text("#!/bin/sh\necho 'E: Couldn't find these debs: nothing'; exit 1\n")
    with pytest.raises(ToolError, match="debootstrap failed"):
        debian.build(Recipe("bookworm", recipe.arch, ("nothing",)), "http://m.test/d", "image")
    assert no_wait == [3.0]
