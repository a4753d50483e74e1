"""Building a Debian root image: debootstrap (minbase and the recipe's packages) from the
mirror the host's apt sources name, a little configuration for a qemubox guest, then an
ext4 image made from the tree without mounting anything (``mkfs.ext4 -d``)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qemubox import arch as arches
from qemubox import paths
from qemubox.apt import RETRY_DELAYS, apt_install, program, transient
from qemubox.errors import InputError, last_line
from qemubox.image.ext4 import make_ext4
from qemubox.image.recipe import Recipe
from qemubox.model.net import DNS

if TYPE_CHECKING:
    from rich.console import Console

IMAGE_FILE = "root.img"
MANIFEST = "manifest.json"
# What a qemubox guest expects of its root: its name, and user networking's resolver.
_ETC = {
    "etc/hostname": "qemubox\n",
    "etc/hosts": "127.0.0.1 localhost qemubox\n::1 localhost\n",
    "etc/resolv.conf": f"nameserver {DNS}\n",
}


def add_user(tree: Path, name: str) -> None:
    """Make account ``name`` in the root ``tree`` by its files (no program of the tree is run:
    any architecture's tree): the next free uid from 1000, a group of its own, a home from
    /etc/skel, bash, no password, passwordless sudo."""
    etc = tree / "etc"
    passwd = (etc / "passwd").read_text()
    used = {int(line.split(":")[2]) for line in passwd.splitlines() if line.count(":") >= 6}
    uid = next(n for n in range(1000, 60000) if n not in used)
    home = tree / "home" / name
    with open(etc / "passwd", "a") as fh:
        fh.write(f"{name}:x:{uid}:{uid}::/home/{name}:/bin/bash\n")
    with open(etc / "shadow", "a") as fh:
        fh.write(f"{name}:*:19000:0:99999:7:::\n")
    for group_file, line in (("group", f"{name}:x:{uid}:\n"), ("gshadow", f"{name}:!::\n")):
        text = (etc / group_file).read_text() + line
        text = "\n".join(
            (f"{g}{',' if g.split(':')[-1] else ''}{name}" if g.startswith("sudo:") else g)
            for g in text.splitlines()
        )
        (etc / group_file).write_text(text + "\n")
    shutil.copytree(etc / "skel", home, symlinks=True, dirs_exist_ok=True)
    for root, dirs, files in os.walk(home):
        for entry in (root, *(os.path.join(root, f) for f in dirs + files)):
            os.lchown(entry, uid, uid)
    home.chmod(0o750)
    sudoers = etc / "sudoers.d" / name
    sudoers.write_text(f"{name} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)


def images_dir() -> Path:
    return paths.cache_dir() / "images"


def debs_dir(suite: str, arch: str) -> Path:
    """Where downloaded packages are kept, for every debootstrap of ``suite`` on ``arch``
    (made when missing: debootstrap's --cache-dir must exist)."""
    path = images_dir() / "debs" / suite / arch
    path.mkdir(parents=True, exist_ok=True)
    return path


def built_path(recipe: Recipe) -> Path:
    """Where the image of ``recipe`` is (or will be) in the cache."""
    return images_dir() / recipe.key() / IMAGE_FILE


def manifest(recipe: Recipe) -> dict | None:
    path = images_dir() / recipe.key() / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_can_build(recipe: Recipe) -> None:
    """Root, debootstrap, this machine's architecture: a one-line error that says what to
    do otherwise."""
    if recipe.distribution != "debian":
        raise InputError(f"cannot build a {recipe.distribution} image: only debian is known")
    host = arches.host()
    if recipe.arch != host.debian_arch:
        raise InputError(
            f"cannot build a {recipe.arch} image on this {host.debian_arch} machine "
            "(debootstrap runs the packages' scripts)"
        )
    if os.geteuid() != 0:
        raise InputError(
            "building a Debian image needs root (debootstrap makes files of every owner): "
            "run this qemubox command as root once; later sandboxes use the cached image"
        )
    try:
        program("debootstrap", "debootstrap")
    except InputError:
        apt_install("debootstrap", "building a Debian image needs debootstrap")


def debootstrap_progress():
    """debootstrap's "I: Retrieving pkg 1.0" lines, as progress words."""
    fetched = 0
    verbs = {"Retrieving": "downloading", "Extracting": "extracting", "Unpacking": "unpacking"}
    verbs["Configuring"] = "configuring"

    def describe(line: str) -> str | None:
        nonlocal fetched
        words = line.split()
        if len(words) < 3 or words[0] != "I:" or words[1] not in verbs:
            return None
        fetched += words[1] == "Retrieving"
        return f"{verbs[words[1]]} {words[2].rstrip('.')} ({fetched} packages fetched)"

    return describe


def build(recipe: Recipe, mirror: str, label: str, console: Console | None = None) -> Path:
    """The image of ``recipe``, built once (concurrent builders wait for each other)."""
    target = built_path(recipe)
    if target.exists():
        return target
    check_can_build(recipe)
    from qemubox.progress import CommandFailed, run_logged  # rich, only when building

    log = images_dir() / f"{recipe.key()}.log"
    debs = debs_dir(recipe.suite, recipe.arch)

    def make(tmp: Path) -> None:
        tree = tmp / "tree"
        tmp.mkdir()
        args = [
            program("debootstrap", "debootstrap"),
            "--variant=minbase",
            f"--arch={recipe.arch}",
            "--components=main",
            f"--include={','.join(recipe.packages)}",
            f"--cache-dir={debs}",
            recipe.suite,
            str(tree),
            mirror,
        ]
        for delay in (*RETRY_DELAYS, None):  # a mirror's or network's failure: again
            try:
                run_logged(
                    args,
                    log,
                    label,
                    debootstrap_progress(),
                    console=console,
                    interrupted=f"{label}: interrupted; nothing was kept",
                )
                break
            except CommandFailed as err:
                if delay is None or not transient(err.log_tail):
                    raise
                shutil.rmtree(tree, ignore_errors=True)  # from an empty tree; debs are kept
                why = (
                    f"{label}: the mirror failed ({last_line(err.log_tail)}); again in {delay:g} s"
                )
                if console is not None:
                    console.print(why, highlight=False, soft_wrap=True)
                else:
                    print(why, file=sys.stderr)
                time.sleep(delay)
        for name, text in _ETC.items():
            (tree / name).unlink(missing_ok=True)
            (tree / name).write_text(text)
        for user in recipe.users:
            add_user(tree, user)
        for deb in (tree / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        image = tmp / IMAGE_FILE
        size = make_ext4(tree, image)
        shutil.rmtree(tree)
        info = {"recipe": recipe.to_dict(), "mirror": mirror, "built": time.time()}
        info["bytes"] = size
        paths.write_json(tmp / MANIFEST, info)

    paths.fill(target.parent, make)
    return target
