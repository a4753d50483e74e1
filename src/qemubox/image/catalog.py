"""Image names: the built-in ``minimal``, ``host`` and ``debian``, images built from them
(``qemubox image build``, one record each under the state directory), and image files.
``root_plan`` turns what a session names into the root of a machine plan."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qemubox.errors import InputError
from qemubox.image import debian, recipe
from qemubox.model.plan import RootPlan
from qemubox.store import Store

IMAGES = Store("images", "image")
BUILTIN = {
    "minimal": "the busybox initramfs, in memory",
    "host": "this machine's / read-only, writes kept in guest memory",
    "debian": "Debian minbase with python3 and ca-certificates",
}
QCOW2_MAGIC = b"QFI\xfb"
EXT4_MAGIC_AT, EXT4_MAGIC = 1024 + 0x38, b"\x53\xef"


def is_path(image: str) -> bool:
    """An image named by a file rather than by name."""
    return "/" in image or image.startswith(".") or image.endswith((".img", ".qcow2", ".raw"))


def is_qcow2(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == QCOW2_MAGIC


def is_ext4(path: Path) -> bool:
    """Whether ``path`` holds an ext4 file system (its superblock's magic)."""
    with open(path, "rb") as fh:
        fh.seek(EXT4_MAGIC_AT)
        return fh.read(2) == EXT4_MAGIC


def file_format(path: Path) -> str:
    """``qcow2`` or ``raw`` (ext4); anything else is refused."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            fh.seek(EXT4_MAGIC_AT)
            magic = fh.read(2)
    except OSError as err:
        raise InputError(f"image {path}: {err.strerror}") from None
    if head == QCOW2_MAGIC:
        return "qcow2"
    if magic == EXT4_MAGIC:
        return "raw"
    raise InputError(f"image {path} is neither an ext4 image nor a qcow2 file")


def check(image: str) -> tuple[str, str]:
    """What a session names, checked: (the name, or the file's absolute path; the root's
    kind: initramfs, share or disk)."""
    if not isinstance(image, str) or not image:
        raise InputError(f"image must be a name or a path, got {image!r}")
    if is_path(image):
        path = Path(image).expanduser()
        if not path.is_file():
            raise InputError(f"image {image}: no such file")
        file_format(path)
        return str(path.resolve()), "disk"
    if image == "minimal":
        return image, "initramfs"
    if image == "host":
        return image, "share"
    if image == "debian" or IMAGES.exists(IMAGES.check_name(image)):
        return image, "disk"
    raise InputError(
        f"unknown image {image!r}: minimal, host, debian, a name from 'qemubox image ls', "
        "or the path of an ext4 or qcow2 image file"
    )


def recipe_of(name: str, arch: str) -> recipe.Recipe:
    if name == "debian":
        return recipe.debian(arch)
    if name in BUILTIN:
        raise InputError(f"image {name!r} is not built from a recipe")
    data = IMAGES.read(name)
    return recipe.Recipe.from_dict(data["recipe"])


def root_plan(image: str, kind: str, arch: str, share_fs: str, overlay: str = "") -> RootPlan:
    """The root an image gives a machine of ``arch``, from what :func:`check` made of it
    (nothing is built)."""
    if kind == "initramfs":
        return RootPlan()
    if kind == "share":
        return RootPlan(kind="share", image=image, base="/", fs=share_fs)
    if is_path(image):
        fmt = file_format(Path(image))
        return RootPlan(kind="disk", image=image, base=image, base_format=fmt, overlay=overlay)
    r = recipe_of(image, arch)
    base = str(debian.built_path(r))
    return RootPlan("disk", image, base, "raw", overlay, recipe=r.to_dict())


def ensure_built(root: RootPlan) -> None:
    """Build a recipe root's image if the cache does not hold it yet."""
    if root.kind != "disk" or root.recipe is None or Path(root.base).exists():
        return
    from qemubox.image.sources import mirror

    r = recipe.Recipe.from_dict(root.recipe)
    built = debian.build(r, mirror(r.suite), f"building image {root.image}")
    if str(built) != root.base:
        raise InputError(f"image {root.image} came out at {built}, planned at {root.base}")


# --- image build / ls / rm ----------------------------------------------------------------------


def build(name: str, base: str, packages: tuple[str, ...], arch: str, mirror_uri: str = "") -> dict:
    """Build (or find built) image ``name``: ``base`` plus ``packages``. A name built before
    is pointed at the new recipe (sandboxes made from it keep theirs)."""
    from qemubox.image.sources import mirror

    IMAGES.check_name(name)
    if name in BUILTIN:
        raise InputError(f"{name!r} is a built-in image; give the new one another name")
    if base != "debian" and (base in BUILTIN or is_path(base)):
        raise InputError(f"--from {base}: images are built from debian or an image built so")
    r = recipe_of(base, arch).with_packages(packages)
    debian.build(r, mirror_uri or mirror(r.suite), f"building image {name}")
    record = {"name": name, "from": base, "recipe": r.to_dict(), "created": time.time()}
    if IMAGES.exists(name):
        with IMAGES.locked(name):
            IMAGES.write(name, record)
    else:
        IMAGES.make(name)
        IMAGES.write(name, record)
    return record


@dataclass
class ImageInfo:
    name: str
    kind: str
    description: str
    packages: tuple[str, ...]
    built: float | None
    bytes: int
    base: str  # the built file ("" for minimal and host)


def _info(name: str, r: recipe.Recipe, description: str) -> ImageInfo:
    made = debian.manifest(r)
    path = debian.built_path(r)
    return ImageInfo(
        name,
        "disk",
        description,
        r.packages,
        made.get("built") if made and path.exists() else None,
        made.get("bytes", 0) if made and path.exists() else 0,
        str(path),
    )


def list_all(arch: str) -> list[ImageInfo]:
    out = [
        ImageInfo("minimal", "initramfs", BUILTIN["minimal"], (), None, 0, ""),
        ImageInfo("host", "share", BUILTIN["host"], (), None, 0, ""),
        _info("debian", recipe.debian(arch), BUILTIN["debian"]),
    ]
    for name in IMAGES.names():
        record = IMAGES.read(name)
        r = recipe.Recipe.from_dict(record["recipe"])
        extra = sorted(set(r.packages) - set(recipe.BASE_PACKAGES))
        out.append(_info(name, r, f"{record.get('from', 'debian')} + {', '.join(extra)}"))
    return out


def remove(name: str, arch: str, used: dict[str, list[str]]) -> None:
    """Forget image ``name`` and delete its built file unless another name or a sandbox
    (``used``: built file -> sandbox names) still needs it. ``debian`` only loses its
    built file."""
    if name in ("minimal", "host"):
        raise InputError(f"{name!r} is built in and has nothing to remove")
    r = recipe_of(name, arch)
    path = debian.built_path(r)
    if used.get(str(path)):
        raise InputError(
            f"image {name!r} is used by sandbox {', '.join(sorted(used[str(path)]))}: "
            "remove those first"
        )
    if name != "debian":
        IMAGES.remove(name)
    still = [i.name for i in list_all(arch) if i.base == str(path) and i.name != name]
    if not still and path.parent.is_dir():
        shutil.rmtree(path.parent, ignore_errors=True)
        (path.parent.parent / f"{path.parent.name}.log").unlink(missing_ok=True)
