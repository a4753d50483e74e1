"""Container images benchmark: importing an image of about 100 MB (skopeo copy, umoci
unpack, mkfs.ext4 -d), importing it again (the same digest: nothing unpacked), and
`run -- true` on an imported image against `--image debian` when the imported image holds
the same files (debian exported as an OCI archive and imported back) — in the same run, as
whole `qemubox` processes, with a state and cache of their own.

Run by hand, as root (unpacking and exporting need it):

    .venv/bin/python benchmarks/image.py [-n 3] [--kernel PATH]

Figures are medians of n. Targets: a second import of one digest within 1 s; a run on the
imported debian within 1.1x of a run on debian itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import qemubox, timed

from oci_factory import Entry, layer_tar, oci_layout, tar_dir

FILES, FILE_SIZE = 400, 256 << 10  # 100 MiB of incompressible data


def big_image(top: Path, salt: int) -> Path:
    """An OCI archive of about 100 MB: busybox and FILES random files in two layers; the
    salt makes each one another image (another digest)."""
    from qemubox import arch as arches

    busybox = Path("/bin/busybox").read_bytes()
    first = [
        Entry("bin", "dir", mode=0o755),
        Entry("bin/busybox", data=busybox, mode=0o755),
        Entry("bin/sh", "symlink", target="busybox"),
        Entry("bin/true", "symlink", target="busybox"),
        Entry("data", "dir", mode=0o755),
        *(Entry(f"data/{i}", data=os.urandom(FILE_SIZE)) for i in range(FILES // 2)),
    ]
    second = [Entry(f"data/{i}", data=os.urandom(FILE_SIZE)) for i in range(FILES // 2, FILES)]
    config = {"Env": ["PATH=/bin", f"SALT={salt}"], "Cmd": ["true"]}
    arch = arches.host().oci_arch
    layers = [layer_tar(first), layer_tar(second)]
    layout = oci_layout(top / f"layout{salt}", layers, config, arch, "latest")
    return tar_dir(layout, top / f"big{salt}.tar")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--kernel", help="the guest kernel (default: qemubox's choice)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: unpacking and exporting images need it")
    kernel = ["--kernel", args.kernel] if args.kernel else []
    with tempfile.TemporaryDirectory(prefix="qemubox-image-bench-") as tmp:
        top = Path(tmp)
        env = {
            **os.environ,
            "QEMUBOX_STATE_DIR": str(top / "state"),
            "QEMUBOX_CACHE_DIR": os.environ.get("QEMUBOX_CACHE_DIR", ""),
        }
        if not env["QEMUBOX_CACHE_DIR"]:
            del env["QEMUBOX_CACHE_DIR"]  # the user's cache: kernels and debian built once
        (top / "state").mkdir(mode=0o700)
        imports, again = [], []
        size = 0
        for i in range(args.n):
            archive = big_image(top, int(time.time() * 1000) + i)
            size = archive.stat().st_size
            imports.append(timed(env, "image", "import", f"big{i}", f"oci-archive:{archive}"))
            again.append(timed(env, "image", "import", f"again{i}", f"oci-archive:{archive}"))
            qemubox(env, "image", "rm", f"big{i}", f"again{i}")
        qemubox(env, "run", *kernel, "--image", "debian", "--", "true")  # built, snapshot made
        exported = top / "debian.oci.tar"
        qemubox(env, "image", "export", "debian", "-o", str(exported))
        qemubox(env, "image", "import", "debian-oci", f"oci-archive:{exported}")
        qemubox(env, "run", *kernel, "--image", "debian-oci", "--", "true")  # its snapshot
        native, imported = [], []
        for _ in range(args.n):
            native.append(timed(env, "run", *kernel, "--image", "debian", "--", "true"))
            imported.append(timed(env, "run", *kernel, "--image", "debian-oci", "--", "true"))
        qemubox(env, "image", "rm", "debian-oci")
    med = statistics.median
    print(f"import of a {size / 1e6:.0f} MB image (2 layers, {FILES} files): {med(imports):.2f} s")
    print(f"second import of the same digest: {med(again):.2f} s (target <= 1 s)")
    ratio = med(imported) / med(native)
    print(
        f"run -- true: --image debian {med(native):.2f} s, the same files imported "
        f"{med(imported):.2f} s ({ratio:.2f}x; target <= 1.1)"
    )


if __name__ == "__main__":
    main()
