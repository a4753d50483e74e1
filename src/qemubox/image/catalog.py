"""Image names: the built-in ``minimal``, ``host`` and ``debian``, images built from them
(``qemubox image build``) or imported (``qemubox image import``), one record each under the
state directory; container images named by a transport (``oci-archive:app.tar``); and
image files. ``root_plan`` turns what a session names into the root of a machine plan."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qemubox import arch as arches
from qemubox.errors import InputError
from qemubox.image import debian, oci, recipe, reference
from qemubox.image.ociconfig import ImageConfig
from qemubox.model.plan import RootPlan
from qemubox.store import Store

IMAGES = Store("images", "image")
BUILTIN = {
    "minimal": "the busybox initramfs, in memory",
    "host": "this machine's / read-only, writes kept in guest memory",
    "debian": "Debian minbase with python3 and ca-certificates",
    "base": "Debian with bash, curl, python3, sudo and a user `user` (E2B's base template)",
}
RECIPES = {"debian": recipe.debian, "base": recipe.e2b_base}  # the built-ins built by recipe
QCOW2_MAGIC = b"QFI\xfb"
EXT4_MAGIC_AT, EXT4_MAGIC = 1024 + 0x38, b"\x53\xef"


def is_path(image: str) -> bool:
    """An image named by a file rather than by name (or by a transport)."""
    if reference.looks_like(image):
        return False
    return "/" in image or image.startswith(".") or image.endswith((".img", ".qcow2", ".raw"))


def is_container(record: dict) -> bool:
    """Whether an image record is of an imported (or Dockerfile-built) container image."""
    return "digest" in record


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
    if reference.looks_like(image):
        return reference.parse(image).skopeo(), "disk"
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
    if ":" in image:
        reference.parse(image)  # an unknown transport: the error names it
    if image in RECIPES or IMAGES.exists(IMAGES.check_name(image)):
        return image, "disk"
    raise InputError(
        f"unknown image {image!r}: minimal, host, debian, base, a name from 'qemubox image ls', "
        "a container image (oci-archive:FILE, docker-archive:FILE, oci:DIR:TAG, ...) "
        "or the path of an ext4 or qcow2 image file"
    )


def recipe_of(name: str, arch: str) -> recipe.Recipe:
    if name in RECIPES:
        return RECIPES[name](arch)
    if name in BUILTIN:
        raise InputError(f"image {name!r} is not built from a recipe")
    data = IMAGES.read(name)
    if is_container(data):
        raise InputError(f"image {name!r} is a container image, not built from a recipe")
    return recipe.Recipe.from_dict(data["recipe"])


def invoking_user() -> str:
    """Who runs qemubox: a name of this machine's /etc/passwd (with its groups and home),
    else the uid and gid."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"{os.getuid()}:{os.getgid()}"


def root_plan(image: str, kind: str, arch: str, share_fs: str, overlay: str = "") -> RootPlan:
    """The root an image gives a machine of ``arch``, from what :func:`check` made of it
    (nothing is built)."""
    if kind == "initramfs":
        return RootPlan()
    if kind == "share":  # this machine's root: commands run as whoever runs qemubox
        config = ImageConfig(user=invoking_user()).to_dict()
        return RootPlan(kind="share", image=image, base="/", fs=share_fs, config=config)
    if reference.looks_like(image):
        found = oci.identify(reference.parse(image), arches.by_debian_arch(arch))
        base = str(oci.base_path(found.digest))
        config = found.config.to_dict()
        return RootPlan("disk", image, base, "raw", overlay, source=image, config=config)
    if is_path(image):
        fmt = file_format(Path(image))
        return RootPlan(kind="disk", image=image, base=image, base_format=fmt, overlay=overlay)
    if image not in BUILTIN and is_container(data := IMAGES.read(image)):
        base = str(oci.base_path(data["digest"]))
        source = data.get("source", "")
        return RootPlan("disk", image, base, "raw", overlay, source=source, config=data["config"])
    r = recipe_of(image, arch)
    base = str(debian.built_path(r))
    return RootPlan("disk", image, base, "raw", overlay, recipe=r.to_dict())


def ensure_built(root: RootPlan, arch: str) -> None:
    """Build a recipe root's image, or unpack a container image's, if the cache does not
    hold it yet."""
    if root.kind != "disk" or Path(root.base).exists():
        return
    if root.source:
        ref, record = reference.parse(root.source), arches.get(arch)
        found = oci.identify(ref, record)
        if str(oci.base_path(found.digest)) != root.base:
            raise InputError(f"image {root.image} changed since it was planned: run again")
        oci.unpack(ref, record, f"unpacking {root.image}", found)
        return
    if root.recipe is None:
        if root.config is not None:
            raise InputError(
                f"image {root.image}: its unpacked root {root.base} is gone from the cache; "
                f"make it again (qemubox image import or image build)"
            )
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

    check_new_name(name)
    if base not in RECIPES and (base in BUILTIN or is_path(base)):
        raise InputError(f"--from {base}: images are built from debian, base or an image built so")
    r = recipe_of(base, arch).with_packages(packages)
    debian.build(r, mirror_uri or mirror(r.suite), f"building image {name}")
    record = {"name": name, "from": base, "recipe": r.to_dict(), "created": time.time()}
    _save(name, record)
    return record


def _save(name: str, record: dict) -> None:
    if IMAGES.exists(name):
        with IMAGES.locked(name):
            IMAGES.write(name, record)
    else:
        IMAGES.make(name)
        IMAGES.write(name, record)


def check_new_name(name: str) -> None:
    IMAGES.check_name(name)
    if name in BUILTIN:
        raise InputError(f"{name!r} is a built-in image; give the new one another name")


def import_image(name: str, source: str, arch: str, origin: str = "") -> dict:
    """Name the container image ``source`` (a transport reference) ``name``, unpacking it
    unless an image of the same digest was unpacked before (under any name)."""
    check_new_name(name)
    ref = reference.parse(source)
    made = oci.unpack(ref, arches.by_debian_arch(arch), f"importing {name}")
    record = {
        "name": name,
        "from": origin or ref.skopeo(),
        "source": "" if origin else ref.skopeo(),
        "digest": made["digest"],
        "manifest": made["manifest"],
        "config": made["config"],
        "created": time.time(),
    }
    _save(name, record)
    return record


def inspect(name: str, arch: str) -> dict:
    """What is known of image ``name``: its record, and for a container image its config
    and digests."""
    found = next((i for i in list_all(arch) if i.name == name), None)
    if found is None:
        check(name)  # the one-line error for a name that is not an image
        raise InputError(f"{name!r} is not an image name")
    return asdict(found)


@dataclass
class ImageInfo:
    name: str
    kind: str
    description: str
    packages: tuple[str, ...]
    built: float | None
    bytes: int
    base: str  # the built file ("" for minimal and host)
    digest: str = ""  # a container image's config digest (its image id)
    manifest: str = ""  # ... and the digest of the manifest it was imported by
    config: dict | None = None  # ... and its run-time config


def _container_info(name: str, record: dict) -> ImageInfo:
    path = oci.base_path(record["digest"])
    made = oci.record(record["digest"]) if path.exists() else None
    return ImageInfo(
        name,
        "disk",
        record.get("from", ""),
        (),
        made.get("unpacked") if made else None,
        made.get("bytes", 0) if made else 0,
        str(path),
        record["digest"],
        record.get("manifest", ""),
        record.get("config"),
    )


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
        *(_info(name, make(arch), BUILTIN[name]) for name, make in RECIPES.items()),
    ]
    for name in IMAGES.names():
        record = IMAGES.read(name)
        if is_container(record):
            out.append(_container_info(name, record))
            continue
        r = recipe.Recipe.from_dict(record["recipe"])
        extra = sorted(set(r.packages) - set(recipe.BASE_PACKAGES))
        out.append(_info(name, r, f"{record.get('from', 'debian')} + {', '.join(extra)}"))
    return out


def remove(name: str, arch: str, used: dict[str, list[str]]) -> None:
    """Forget image ``name`` and delete its built file unless another name or a sandbox
    (``used``: built file -> sandbox names) still needs it. ``debian`` only loses its
    built file (``base`` too)."""
    if name in ("minimal", "host"):
        raise InputError(f"{name!r} is built in and has nothing to remove")
    if name not in RECIPES and is_container(data := IMAGES.read(IMAGES.check_name(name))):
        path = oci.base_path(data["digest"])
    else:
        path = debian.built_path(recipe_of(name, arch))
    if used.get(str(path)):
        raise InputError(
            f"image {name!r} is used by sandbox {', '.join(sorted(used[str(path)]))}: "
            "remove those first"
        )
    if name not in RECIPES:
        IMAGES.remove(name)
    still = [i.name for i in list_all(arch) if i.base == str(path) and i.name != name]
    if not still and path.parent.is_dir():
        shutil.rmtree(path.parent, ignore_errors=True)
        (path.parent.parent / f"{path.parent.name}.log").unlink(missing_ok=True)
