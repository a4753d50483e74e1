"""A kernel developer's tree: `run --kernel DIR` builds the tree DIR and boots it, and
`kernel build` in a tree builds that tree. The compile is make's (a stand-in here that
hands over qemubox's minimal kernel, built once by the suite, as the tree's build: the
configuration is the real make's), the boot is QEMU's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import STAND_IN_MAKE, borrowed_source_cache, qemubox

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]


@pytest.fixture
def tree(kernel, tmp_path, monkeypatch):
    """The extracted 6.12 source as a developer's tree, a scratch cache, and make's
    stand-in: (tree, release, make's log)."""
    src, cache = borrowed_source_cache(tmp_path)
    real = Path(kernel).parent
    release = json.loads((real / "manifest.json").read_text())["version"]
    make = tmp_path / "make"
    make.write_text(STAND_IN_MAKE)
    make.chmod(0o755)
    log = tmp_path / "make.log"
    for name, value in {
        "QEMUBOX_CACHE_DIR": cache,
        "QEMUBOX_MAKE": make,
        "LOG": log,
        "REAL": real,
        "RELEASE": release,
    }.items():
        monkeypatch.setenv(name, str(value))
    return src, release, log


def test_run_kernel_dir_builds_the_tree_and_boots_it(tree):
    src, release, log = tree
    before = sorted(p.name for p in src.iterdir())
    r = qemubox("run", "--kernel", src, "--", "uname", "-r")
    assert r.code == 0 and r.out == f"{release}\n", r.err
    assert len(log.read_text().splitlines()) == 1  # built once...
    r = qemubox("run", "--kernel", src, "--", "uname", "-r")
    assert r.code == 0 and r.out == f"{release}\n", r.err
    assert len(log.read_text().splitlines()) == 1  # ...and not again: nothing changed
    assert sorted(p.name for p in src.iterdir()) == before  # built out of the tree
    r = qemubox("run", "--kernel", src, "--dry-run", "--", "true")
    assert r.code == 2 and "a dry run builds nothing" in r.err


def test_kernel_build_in_a_tree_builds_that_tree(tree):
    src, release, log = tree
    r = qemubox("kernel", "build", cwd=src)
    assert r.code == 0, r.err
    assert f"Linux {release}" in r.err and not (src / "build").exists()  # the tree is left
    r = qemubox("kernel", "ls", "--json")
    (built,) = json.loads(r.out)
    assert built["source"] == str(src.resolve()) and built["source_key"].startswith("dir-")
    r = qemubox("run", "--", "uname", "-r")  # the newest build is run's kernel
    assert r.code == 0 and r.out == f"{release}\n", r.err
    assert len(log.read_text().splitlines()) == 1
