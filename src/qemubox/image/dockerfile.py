"""``qemubox image build NAME -f Dockerfile [CONTEXT]``: a Dockerfile built by ``buildah``
(in qemubox's own storage, chroot isolation: ``RUN`` reaches the network the host reaches,
so ``apt-get install`` works against the image's mirror), its ``FROM`` naming a qemubox
image (exported on the fly, cached) or a container image by transport; the result is
imported as any container image."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from qemubox import arch as arches
from qemubox import paths
from qemubox.errors import InputError
from qemubox.image import oci, reference

MAX_DOCKERFILE = 1 << 20
_FROM = re.compile(r"^(\s*FROM\s+)((?:--\S+\s+)*)(\S+)(.*)$", re.I)
_ARG = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=.*$", re.S)


def rewrite_from(text: str, resolve: Callable[[str], str]) -> str:
    """``text`` with each ``FROM IMAGE`` that names neither ``scratch``, an earlier stage
    nor an ``$ARG`` replaced by ``resolve(IMAGE)``. Pure but for ``resolve``."""
    stages: set[str] = set()
    out = []
    for line in text.splitlines(keepends=True):
        m = _FROM.match(line.rstrip("\n"))
        if not m:
            out.append(line)
            continue
        head, flags, image, rest = m.groups()
        words = rest.split()
        if len(words) == 2 and words[0].lower() == "as":
            stages.add(words[1].lower())
        if image.lower() != "scratch" and image.lower() not in stages and "$" not in image:
            image = resolve(image)
        out.append(f"{head}{flags}{image}{rest}" + ("\n" if line.endswith("\n") else ""))
    return "".join(out)


def parse_build_args(items: tuple[str, ...]) -> tuple[str, ...]:
    for item in items:
        if not _ARG.fullmatch(item):
            raise InputError(f"--build-arg {item!r}: expected NAME=VALUE")
    return items


def storage() -> list[str]:
    """buildah's options for qemubox's own image storage (vfs: works on every file system)."""
    root = paths.cache_dir() / "buildah"
    return [
        "--root",
        str(root / "storage"),
        "--runroot",
        str(root / "run"),
        "--storage-driver",
        "vfs",
    ]


def _steps():
    def describe(line: str) -> str | None:
        return line.strip()[:100] if line.startswith("STEP ") else None

    return describe


def _why(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.lower().startswith(("error", "time=")) or "error" in line.lower():
            return oci.reason(line)
    return lines[-1] if lines else "failed"


def build(
    name: str,
    dockerfile: Path,
    context: Path,
    arch: arches.Arch,
    build_args: tuple[str, ...] = (),
) -> dict:
    """Build ``dockerfile`` in ``context`` and name the image ``name``."""
    from qemubox.image import catalog, export
    from qemubox.progress import CommandFailed, run_logged

    catalog.check_new_name(name)
    if not context.is_dir():
        raise InputError(f"build context {context}: no such directory")
    if not dockerfile.is_file():
        raise InputError(f"-f {dockerfile}: no such file")
    if dockerfile.stat().st_size > MAX_DOCKERFILE:
        raise InputError(f"-f {dockerfile}: larger than {MAX_DOCKERFILE >> 20} MiB")
    parse_build_args(build_args)
    oci.check_can_unpack()
    oci.need_tools("buildah")

    def resolve(image: str) -> str:
        if reference.looks_like(image):
            return reference.parse(image, context).skopeo()
        try:
            catalog.check(image)
        except InputError:
            raise InputError(
                f"{dockerfile}: FROM {image}: not a qemubox image (qemubox image ls) nor a "
                "container image by transport (oci-archive:FILE, ...); qemubox reads no registry"
            ) from None
        return f"oci-archive:{export.cached(image, arch)}"

    text = rewrite_from(dockerfile.read_text(errors="replace"), resolve)
    builds = paths.cache_dir() / "images" / "builds"
    builds.mkdir(parents=True, exist_ok=True)
    work = paths.temp_beside(builds / name)
    work.mkdir()
    tag = f"localhost/qemubox-build-{os.urandom(6).hex()}:latest"
    log = builds / f"{name}.log"
    try:
        (work / "Dockerfile").write_text(text)
        argv = ["buildah", *storage(), "build", "--isolation", "chroot", "--no-cache", "--force-rm"]
        argv += ["--arch", arch.oci_arch, "--os", "linux"]
        argv += [f"--build-arg={a}" for a in build_args]
        argv += ["-f", str(work / "Dockerfile"), "-t", tag, str(context)]
        try:
            run_logged(argv, log, f"building image {name}", _steps(), cwd=context)
        except CommandFailed:
            raise InputError(f"{dockerfile}: {_why(log)} (log: {log})") from None
        archive = work / "image.tar"
        run_logged(
            ["buildah", *storage(), "push", tag, f"oci-archive:{archive}"],
            work / "push.log",
            f"building image {name}",
            lambda line: None,
        )
        return catalog.import_image(
            name, f"oci-archive:{archive}", arch.debian_arch, origin=f"Dockerfile {dockerfile}"
        )
    finally:
        subprocess.run(["buildah", *storage(), "rmi", "-f", tag], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
