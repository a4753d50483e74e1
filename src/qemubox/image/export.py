"""A qemubox disk image as an OCI image archive (``oci-archive``), so that other tools,
and ``FROM`` in a Dockerfile, can start from it: its files read out of the ext4 base with
``debugfs rdump`` (owners and modes kept; hard links come out as copies), made one layer by
``umoci``, with the image's config."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from qemubox import arch as arches
from qemubox import paths
from qemubox.apt import program
from qemubox.errors import InputError, ToolError
from qemubox.image import oci
from qemubox.image.ociconfig import ImageConfig

DEBIAN_CONFIG = ImageConfig(
    env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
    cmd=("bash",),
)
TAG = "latest"


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ToolError(f"{what}: {(proc.stderr or proc.stdout).strip()[-300:]}")


def config_args(config: ImageConfig, arch: arches.Arch) -> list[str]:
    """umoci config's options for ``config``. Pure."""
    args = ["--architecture", arch.oci_arch, "--os", "linux", "--no-history"]
    args += [f"--config.env={e}" for e in config.env]
    if config.workdir:
        args.append(f"--config.workingdir={config.workdir}")
    if config.user:
        args.append(f"--config.user={config.user}")
    args += [f"--config.entrypoint={a}" for a in config.entrypoint or ()]
    args += [f"--config.cmd={a}" for a in config.cmd or ()]
    return args


def write_archive(base: Path, config: ImageConfig, arch: arches.Arch, out: Path) -> None:
    """``out``: an OCI archive of the ext4 image ``base``, with ``config``."""
    oci.need_tools("umoci")
    debugfs = program("debugfs", "e2fsprogs")
    work = paths.temp_beside(out)
    work.mkdir()
    try:
        tree, layout = work / "tree", work / "layout"
        tree.mkdir()
        _run([debugfs, "-R", f"rdump / {tree}", str(base)], f"reading {base}")
        shutil.rmtree(tree / "lost+found", ignore_errors=True)
        image = f"{layout}:{TAG}"
        _run(["umoci", "init", "--layout", str(layout)], "umoci init")
        _run(["umoci", "new", "--image", image], "umoci new")
        _run(["umoci", "insert", "--no-history", "--image", image, str(tree), "/"], "umoci insert")
        _run(["umoci", "config", "--image", image, *config_args(config, arch)], "umoci config")
        _run(["umoci", "gc", "--layout", str(layout)], "umoci gc")
        archive = work / "image.tar"
        _run(["tar", "-C", str(layout), "-cf", str(archive), "."], "tar")
        archive.replace(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export(name: str, out: Path, arch: arches.Arch) -> Path:
    """Write image ``name`` (debian, an image built or imported) to ``out``."""
    base, config = source_of(name, arch)
    if not out.parent.is_dir():
        raise InputError(f"-o {out}: no such directory {out.parent}")
    if out.exists() and not out.is_file():
        raise InputError(f"-o {out}: not a file")
    oci.check_can_unpack()
    write_archive(base, config, arch, out.resolve())
    return out


def source_of(name: str, arch: arches.Arch) -> tuple[Path, ImageConfig]:
    """The ext4 base of image ``name`` (built if it is a recipe's and not built yet) and
    the config it exports with."""
    from qemubox.image import catalog
    from qemubox.model.plan import RootPlan

    if name in ("minimal", "host"):
        raise InputError(f"image {name!r} has no disk to export: export debian or an image of it")
    found, kind = catalog.check(name)
    if kind != "disk" or catalog.is_path(found):
        raise InputError(f"image {name!r}: only named images are exported")
    root: RootPlan = catalog.root_plan(found, kind, arch.debian_arch, "9p")
    catalog.ensure_built(root, arch.name)
    config = ImageConfig.from_dict(root.config) if root.config else DEBIAN_CONFIG
    return Path(root.base), config


def cached(name: str, arch: arches.Arch) -> Path:
    """An OCI archive of image ``name``, kept in the cache per base (for ``FROM``)."""
    base, config = source_of(name, arch)
    key = base.parent.name
    target = paths.cache_dir() / "images" / "exports" / f"{key}.tar"
    return paths.fill(target, lambda tmp: write_archive(base, config, arch, tmp))
