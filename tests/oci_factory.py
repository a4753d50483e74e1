"""Container images made on the spot, with no registry and no container tool: an OCI image
layout (directory or tar) and a ``docker save`` archive of the same layers and config."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Entry:
    """One member of a layer."""

    path: str
    kind: str = "file"  # file, dir, symlink, hardlink
    data: bytes = b""
    target: str = ""  # a link's
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)


def layer_tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.path)
            info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, 1700000000
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.target
                tar.addfile(info)
            elif e.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, e.target
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_blob(layers: list[bytes], config: dict, arch: str) -> bytes:
    return json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [_digest(t) for t in layers]},
        },
        sort_keys=True,
    ).encode()


def oci_layout(root: Path, layers: list[bytes], config: dict, arch: str, tag: str) -> Path:
    """An OCI image layout directory at ``root`` (gzipped layers), tagged ``tag``."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        d = _digest(data)
        (blobs / d.split(":")[1]).write_bytes(data)
        return d

    cfg = config_blob(layers, config, arch)
    zipped = [gzip.compress(t, mtime=0) for t in layers]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(cfg),
                "size": len(cfg),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": put(z),
                    "size": len(z),
                }
                for z in zipped
            ],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


def tar_dir(directory: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    return out


def docker_archive(out: Path, layers: list[bytes], config: dict, arch: str) -> Path:
    """A ``docker save`` archive: manifest.json, the config, one directory per layer."""
    cfg = config_blob(layers, config, arch)
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    names = [f"{hashlib.sha256(t).hexdigest()}/layer.tar" for t in layers]
    manifest = [{"Config": cfg_name, "RepoTags": ["app:latest"], "Layers": names}]
    with tarfile.open(out, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add(cfg_name, cfg)
        for name, data in zip(names, layers, strict=True):
            add(name, data)
        add("manifest.json", json.dumps(manifest).encode())
    return out
