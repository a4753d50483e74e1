"""Container images as roots: an image is read through ``skopeo`` (no registry: archives,
layout directories, local storages), copied into an OCI layout, unpacked layer after layer
by ``umoci`` (whiteouts, opaque directories, links, modes, owners, xattrs), and made an ext4
base with ``mkfs.ext4 -d``, cached by the image's config digest (its image id, the same
under every transport and every name): an image is never unpacked twice."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from qemubox import arch as arches
from qemubox import paths
from qemubox.apt import apt_install
from qemubox.errors import InputError, ToolError
from qemubox.image.ext4 import make_ext4
from qemubox.image.ociconfig import ImageConfig
from qemubox.image.reference import Reference
from qemubox.model.net import DNS

IMAGE_FILE = "root.img"
RECORD = "image.json"
TAG = "image"  # the one tag of the layouts qemubox writes
# What every container root gets at run time, as docker gives it (it bind-mounts them).
ETC = {
    "etc/hostname": "qemubox\n",
    "etc/hosts": "127.0.0.1 localhost qemubox\n::1 localhost\n",
    "etc/resolv.conf": f"nameserver {DNS}\n",
}
RUNTIME_DIRS = {"dev": 0o755, "proc": 0o555, "sys": 0o555, "run": 0o755, "tmp": 0o1777}


@dataclass(frozen=True)
class Identity:
    """What names an image's content: the digest of its config (which lists its layers'
    digests), and the config itself."""

    digest: str  # sha256:HEX
    config: ImageConfig


def oci_dir() -> Path:
    return paths.cache_dir() / "images" / "oci"


def base_dir(digest: str) -> Path:
    return oci_dir() / digest.removeprefix("sha256:")


def base_path(digest: str) -> Path:
    return base_dir(digest) / IMAGE_FILE


def record(digest: str) -> dict | None:
    try:
        return json.loads((base_dir(digest) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def need_tools(*names: str) -> None:
    """skopeo, umoci, buildah: each program is its Debian package's name."""
    for name in names:
        if shutil.which(name) is None:
            apt_install(name, f"container images need {name}")


def _skopeo(args: list[str], what: str, timeout: float = 600) -> bytes:
    need_tools("skopeo")
    try:
        proc = subprocess.run(["skopeo", *args], capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{what}: skopeo took more than {timeout:g} s") from None
    if proc.returncode != 0:
        raise InputError(f"{what}: {reason(proc.stderr.decode(errors='replace'))}")
    return proc.stdout


def reason(stderr: str) -> str:
    """skopeo's and umoci's last error line, without their log prefix."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    line = lines[-1] if lines else "failed"
    for prefix in ('time="', "level=fatal msg="):
        if line.startswith(prefix) and "msg=" in line:
            line = line.split("msg=", 1)[1].strip().strip('"')
    return line.replace("\\n", " ").replace('\\"', '"')[:400]


def platform_args(arch: arches.Arch) -> list[str]:
    return ["--override-arch", arch.oci_arch, "--override-os", "linux"]


def identify(ref: Reference, arch: arches.Arch) -> Identity:
    """The image ``ref`` names, for a guest of ``arch`` (one of a multi-platform index),
    without copying its layers; an image of another architecture is refused."""
    blob = _skopeo(
        [*platform_args(arch), "inspect", "--config", "--raw", ref.skopeo()],
        f"image {ref}",
    )
    try:
        config = ImageConfig.from_oci(json.loads(blob))
    except ValueError:
        raise InputError(f"image {ref}: its config is not JSON") from None
    if config.os and config.os != "linux":
        raise InputError(f"image {ref} is for {config.os}, not linux")
    if config.architecture and config.architecture != arch.oci_arch:
        raise InputError(
            f"image {ref} is for {config.architecture}; this guest is {arch.oci_arch} ({arch.name})"
        )
    return Identity("sha256:" + hashlib.sha256(blob).hexdigest(), config)


def unpack(
    ref: Reference, arch: arches.Arch, label: str | None = None, found: Identity | None = None
) -> dict:
    """The image's ext4 base in the cache, made once; returns its record. ``found``: what
    :func:`identify` says of ``ref`` (it is asked when not given)."""
    found = found or identify(ref, arch)
    target = base_dir(found.digest)
    if not target.exists():
        check_can_unpack()
        paths.fill(target, lambda tmp: _make(tmp, ref, found, arch, label or f"importing {ref}"))
    made = record(found.digest)
    if made is None:
        raise ToolError(f"image {ref}: its cache entry {target} has no {RECORD}")
    return made


def check_can_unpack() -> None:
    if os.geteuid() != 0:
        raise InputError(
            "unpacking a container image needs root (its files have many owners): run "
            "this qemubox command as root"
        )
    need_tools("skopeo", "umoci")


def _make(tmp: Path, ref: Reference, found: Identity, arch: arches.Arch, label: str) -> None:
    from qemubox.progress import run_logged

    tmp.mkdir()
    layout, rootfs = tmp / "layout", tmp / "rootfs"
    log = tmp / "import.log"
    run_logged(
        ["skopeo", *platform_args(arch), "copy", ref.skopeo(), f"oci:{layout}:{TAG}"],
        log,
        label,
        _copy_progress(),
        interrupted=f"{label}: interrupted; nothing was kept",
    )
    manifest_digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    run_logged(
        ["umoci", "raw", "unpack", "--image", f"{layout}:{TAG}", str(rootfs)],
        log.with_name("unpack.log"),
        label,
        lambda line: None,
        interrupted=f"{label}: interrupted; nothing was kept",
    )
    prepare_tree(rootfs, found.config)
    size = make_ext4(rootfs, tmp / IMAGE_FILE)
    shutil.rmtree(rootfs)
    shutil.rmtree(layout)
    log.unlink(missing_ok=True)
    log.with_name("unpack.log").unlink(missing_ok=True)
    paths.write_json(
        tmp / RECORD,
        {
            "digest": found.digest,
            "manifest": manifest_digest,
            "source": ref.skopeo(),
            "config": found.config.to_dict(),
            "arch": arch.name,
            "unpacked": time.time(),
            "bytes": size,
        },
    )


def _copy_progress():
    def describe(line: str) -> str | None:
        words = line.split()
        if len(words) >= 3 and words[0] in ("Copying", "Writing"):
            return f"{words[0].lower()} {words[1]} {words[2][:19]}"
        return None

    return describe


def prepare_tree(rootfs: Path, config: ImageConfig) -> None:
    """What a root needs to boot as a qemubox guest, as docker gives a container: the name
    and resolver files, the mount points, the working directory."""
    etc = rootfs / "etc"
    if etc.is_symlink() or (etc.exists() and not etc.is_dir()):
        raise InputError("the image's /etc is not a directory")
    etc.mkdir(mode=0o755, exist_ok=True)
    for name, text in ETC.items():
        path = rootfs / name
        if path.is_symlink() or path.exists():
            path.unlink()
        path.write_text(text)
        path.chmod(0o644)
    for name, mode in RUNTIME_DIRS.items():
        path = rootfs / name
        if not path.exists() and not path.is_symlink():
            path.mkdir()
            path.chmod(mode)
    if config.workdir.startswith("/"):
        workdir = rootfs / config.workdir.lstrip("/")
        if not workdir.exists() and not workdir.is_symlink():
            workdir.mkdir(parents=True)
