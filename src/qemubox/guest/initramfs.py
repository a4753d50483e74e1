"""The guest's initramfs: our agent as /init, static busybox, and the kernel modules the
session needs — built once per content and cached.

The cache keeps the archives used last (``CACHE_KEEP``, and none unused for
``CACHE_DAYS``). An archive's use is its access time, set at each use: its modification
time is part of the snapshot key (``vm/snapshot.py``) and stays as it was made."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path

from qemubox import arch as arches
from qemubox.apt import apt_install, download_for_arch, download_source
from qemubox.cc import compiled
from qemubox.errors import InputError, ToolError
from qemubox.guest.cpio import CpioWriter
from qemubox.model.net import DNS
from qemubox.model.plan import KernelPlan
from qemubox.paths import cache_dir, fill, least_recently_used

HOST_BUSYBOX = Path("/bin/busybox")
CACHE_KEEP = 64  # archives kept, those used last
CACHE_DAYS = 14  # an archive unused this long is removed
CACHE_GRACE = 3600.0  # seconds: one used this recently stays (a start may be booting it)

# Modules by feature, by the names modules.dep knows them by.
BASE_MODULES = ("virtio_mmio", "virtio_pci", "virtio_console", "virtio_rng")
FEATURE_MODULES = {
    "disks": ("virtio_blk", "ext4"),
    "shares": ("9pnet_virtio", "9p"),
    "virtiofs": ("virtiofs",),
    "network": ("virtio_net", "af_packet"),
    "balloon": ("virtio_balloon",),
    "overlay": ("overlay",),  # a host root's writes
}
# fw_cfg's driver tells QEMU's vmcoreinfo device where the kernel's VMCOREINFO is, so that
# dumps of the guest's memory open in drgn and crash: on the arches whose machines have one.
DUMP_MODULES = ("qemu_fw_cfg",)
OPTIONAL_MODULES = {"virtio_mmio", "virtio_pci", "virtio_rng", "af_packet", *DUMP_MODULES}

_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1 localhost qemubox\n::1 localhost\n",
    "etc/resolv.conf": f"nameserver {DNS}\n",
    "etc/hostname": "qemubox\n",
}


def agent_source() -> bytes:
    return (resources.files("qemubox.guest") / "agent.c").read_bytes()


def agent_path(arch: arches.Arch) -> Path:
    """Where the agent for ``arch`` is cached: named by its source and compiler."""
    key = hashlib.sha256(agent_source() + arch.compiler().encode()).hexdigest()[:16]
    return cache_dir() / "agent" / f"qemubox-agent-{arch.name}-{key}"


def static_compiler(arch: arches.Arch, what: str) -> str:
    """The C compiler that links static programs for ``arch`` (``what``: for the error),
    with its libc; a cross compiler is installed when missing (as root)."""
    compiler = arch.compiler()
    if shutil.which(compiler) is None:
        if compiler == "gcc":
            raise InputError(f"gcc is needed to build {what} (see setup.sh)")
        apt_install(arch.cross_package, f"{compiler} is needed to build {what} for {arch.name}")
        apt_install(arch.cross_libc, f"{arch.cross_libc} is needed to build {what}")
    return compiler


def agent_binary(arch: arches.Arch) -> Path:
    """The guest agent, compiled statically for ``arch`` once per source version."""
    compiler = static_compiler(arch, "the guest agent")

    flags = [compiler, "-static", "-O2", "-s"]
    return compiled(agent_source(), agent_path(arch), flags, "the guest agent")


def busybox(arch: arches.Arch) -> Path:
    """A static busybox for the guest: the host's for its own arch, else Debian's
    busybox-static of that arch, fetched once into the cache."""
    if arch.name == arches.host().name:
        if not HOST_BUSYBOX.is_file():
            raise InputError("busybox-static is not installed (apt-get install busybox-static)")
        return HOST_BUSYBOX

    def make(tmp: Path) -> None:
        tmp.mkdir()
        if arch.busybox_package is None:
            _build_busybox(arch, tmp / "busybox")
            return
        deb = download_for_arch(
            arch.busybox_package, arch.debian_arch, tmp, cache_dir() / "apt" / arch.debian_arch
        )
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
        os.replace(tmp / "x" / "bin" / "busybox", tmp / "busybox")

    return fill(cache_dir() / "busybox" / arch.debian_arch, make) / "busybox"


def _build_busybox(arch: arches.Arch, target: Path) -> None:
    """busybox built static from Debian's source for an arch Debian has no package of
    (busybox's default configuration), put at ``target``."""
    from qemubox.progress import run_logged  # rich, only when compiling

    compiler = static_compiler(arch, "busybox")
    with tempfile.TemporaryDirectory(dir=target.parent.parent) as work:
        tree = download_source("busybox", Path(work), cache_dir() / "apt" / "source")
        make = ["make", "-C", str(tree), f"CROSS_COMPILE={compiler.removesuffix('gcc')}"]
        log = Path(work) / "build.log"
        what = f"busybox for {arch.name}"
        run_logged([*make, "defconfig"], log, f"configuring {what}", lambda _: None)
        config = tree / ".config"
        config.write_text(
            config.read_text().replace("# CONFIG_STATIC is not set", "CONFIG_STATIC=y")
        )
        jobs = str(os.cpu_count() or 1)
        label = f"building {what}"
        run_logged([*make, "-j", jobs, "busybox"], log, label, lambda line: line.strip()[:60])
        shutil.copy(tree / "busybox", target)


def _module_name(path: str) -> str:
    """A module's name as the kernel knows it, from its file's path (``a-b.ko.xz`` -> ``a_b``)."""
    return Path(path).name.split(".ko", 1)[0].replace("-", "_")


def _plain(path: str) -> str:
    """A module's path as it goes into the guest: uncompressed (``x.ko.zst`` -> ``x.ko``)."""
    return path.split(".ko", 1)[0] + ".ko"


def _modules_dep(modules: Path) -> dict[str, tuple[str, list[str]]]:
    """module name -> (path relative to the modules dir, dependency paths)."""
    out = {}
    for line in (modules / "modules.dep").read_text(errors="replace").splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        out[_module_name(path)] = (path, deps.split())
    return out


def _aliases(modules: Path) -> dict[str, list[str]]:
    """alias -> module names, from modules.alias (plain names only, no wildcards)."""
    out: dict[str, list[str]] = {}
    path = modules / "modules.alias"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "alias" and "*" not in parts[1]:
                out.setdefault(parts[1], []).append(parts[2].replace("-", "_"))
    return out


def _softdeps(modules: Path) -> dict[str, list[str]]:
    """module -> the names its ``softdep ... pre:`` line asks for first."""
    out: dict[str, list[str]] = {}
    path = modules / "modules.softdep"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) < 3 or parts[0] != "softdep":
                continue
            pre = parts[3 : parts.index("post:")] if "post:" in parts else parts[3:]
            if parts[2] == "pre:":
                out[parts[1].replace("-", "_")] = pre
    return out


def module_closure(
    modules: Path, wanted: list[str], dep: dict[str, tuple[str, list[str]]] | None = None
) -> list[str]:
    """Paths of the wanted modules, their dependencies and soft dependencies (``pre:``,
    resolved through aliases), dependencies first. ``dep``: modules.dep, when read already."""
    dep = dep if dep is not None else _modules_dep(modules)
    by_path = {path: deps for path, deps in dep.values()}
    name_of = {path: name for name, (path, _) in dep.items()}
    aliases = _aliases(modules)
    softdeps = _softdeps(modules)
    order: list[str] = []

    def visit_name(name: str) -> None:
        module = name.replace("-", "_")
        if module in dep:
            visit(dep[module][0])
        for real in aliases.get(name, []):  # aliases keep their dashes
            if real in dep:
                visit(dep[real][0])

    def visit(path: str) -> None:
        if path in order:
            return
        order.append(path)  # placed now to end cycles; moved after its dependencies below
        for pre in softdeps.get(name_of.get(path, ""), []):
            visit_name(pre)
        for d in by_path.get(path, []):
            visit(d)
        order.remove(path)
        order.append(path)

    for name in wanted:
        visit_name(name)
    return order


def _module_bytes(path: Path) -> bytes:
    import gzip
    import lzma

    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        proc = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True)
        return proc.stdout
    return data


def needed_modules(kernel: KernelPlan, features: tuple[str, ...]) -> list[str]:
    """Paths (in the kernel's modules directory) of the modules the guest must load for
    ``features``; InputError when the kernel has none of a needed driver."""
    if kernel.modules is None:
        return []
    modules = Path(kernel.modules)
    wanted = list(BASE_MODULES)
    if arches.get(kernel.arch).vmcoreinfo:
        wanted += DUMP_MODULES
    for feature in sorted(features):
        wanted += FEATURE_MODULES.get(feature, ())
    dep = _modules_dep(modules)
    builtin = _builtin(modules)
    if builtin is not None:  # without modules.builtin, what is built in is unknown
        for name in wanted:
            if name not in OPTIONAL_MODULES and name not in builtin and name not in dep:
                raise InputError(
                    f"the kernel {kernel.description} has no {name} driver "
                    f"(neither built in nor a module in {modules})"
                )
    return module_closure(modules, wanted, dep)


def _builtin(modules: Path) -> set[str] | None:
    """Names of the modules built into the kernel, from modules.builtin (None: unknown)."""
    path = modules / "modules.builtin"
    if not path.is_file():
        return None
    return {_module_name(line.strip()) for line in path.read_text(errors="replace").splitlines()}


def _module_index(modules: Path, included: list[str]) -> dict[str, str]:
    """modules.dep and modules.alias for just the included modules (uncompressed names), so
    that the kernel's on-demand loading (busybox modprobe) finds them in the guest."""

    dep = _modules_dep(modules)
    kept = set(included)
    lines = [
        f"{_plain(path)}: {' '.join(_plain(d) for d in deps if d in kept)}".rstrip()
        for path, deps in dep.values()
        if path in kept
    ]
    names = {_module_name(p) for p in included}
    aliases = [
        f"alias {alias} {name}"
        for alias, targets in _aliases(modules).items()
        for name in targets
        if name in names
    ]
    return {"modules.dep": "\n".join(lines) + "\n", "modules.alias": "\n".join(aliases) + "\n"}


def _busybox_applets() -> list[str]:
    """The applets to link, as the host's busybox lists them (Debian builds busybox-static
    with the same applets for every arch, and a foreign one cannot run here)."""
    if not HOST_BUSYBOX.is_file():
        raise InputError("busybox-static is not installed (apt-get install busybox-static)")
    proc = subprocess.run(
        [str(HOST_BUSYBOX), "--list-full"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise ToolError("busybox --list-full failed (is busybox-static installed?)")
    return [line for line in proc.stdout.split() if line and line != "bin/busybox"]


def initramfs_path(kernel: KernelPlan, features: tuple[str, ...]) -> Path:
    """Where the initramfs for this kernel and these features is cached. Keyed by what
    decides its content, cheaply (the module closure is worked out only when the archive is
    made); computing it creates nothing."""
    arch = arches.get(kernel.arch)
    digest = hashlib.sha256()
    for part in (agent_path(arch).name, kernel.version, str(kernel.modules), *sorted(features)):
        digest.update(part.encode() + b"\0")
    stamped = [HOST_BUSYBOX]
    if kernel.modules is not None:
        stamped += [
            Path(kernel.modules) / n for n in ("modules.dep", "modules.alias", "modules.softdep")
        ]
    for path in stamped:
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache_dir() / "initramfs" / f"{arch.name}-{digest.hexdigest()[:20]}.cpio"


def initramfs(kernel: KernelPlan, features: tuple[str, ...]) -> Path:
    """The initramfs for this kernel and these features, built once and cached."""
    target = initramfs_path(kernel, features)
    if target.is_file():
        _used(target)
        return target
    arch = arches.get(kernel.arch)
    modules = needed_modules(kernel, features)
    agent = agent_binary(arch)
    box = busybox(arch)
    applets = _busybox_applets()

    def make(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            cpio = CpioWriter(fh)
            cpio.add_host_file("init", agent, 0o755)
            cpio.add_host_file("bin/busybox", box, 0o755)
            for applet in applets:
                depth = applet.count("/")
                cpio.add_symlink(applet, "../" * depth + "bin/busybox")
            for d in ("proc", "sys", "dev", "tmp", "run", "root", "mnt", "var/tmp", "etc/qemubox"):
                cpio.add_dir(d)
            cpio.add_char_device("dev/console", 5, 1)
            cpio.add_char_device("dev/null", 1, 3, 0o666)
            for name, text in _ETC.items():
                cpio.add_file(name, text.encode())
            load = []
            for mod in modules:
                dest = f"lib/modules/{kernel.version}/" + _plain(mod)
                cpio.add_file(dest, _module_bytes(Path(kernel.modules) / mod))
                load.append("/" + dest)
            cpio.add_file("etc/qemubox/modules", "".join(p + "\n" for p in load).encode())
            if modules:
                base = f"lib/modules/{kernel.version}/"
                for name, text in _module_index(Path(kernel.modules), modules).items():
                    cpio.add_file(base + name, text.encode())
            cpio.close()
        if tmp.stat().st_size < agent.stat().st_size:
            raise ToolError(f"writing {target} came out short")

    fill(target, make)
    prune(target.parent)
    return target


def _used(path: Path) -> None:
    """Say that ``path`` was used now (its access time; its modification time stays)."""
    with contextlib.suppress(OSError):
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))


def prune(directory: Path | None = None) -> list[Path]:
    """Remove the archives not among the ``CACHE_KEEP`` used last or unused for
    ``CACHE_DAYS`` (with their lock files); returns those removed."""
    directory = directory or cache_dir() / "initramfs"
    archives = [p for p in directory.glob("*.cpio") if not p.name.startswith(".")]
    old = least_recently_used(
        archives,
        CACHE_KEEP,
        lambda p: p.stat().st_atime,
        max_age=CACHE_DAYS * 86400,
        grace=CACHE_GRACE,
    )
    for archive in old:
        archive.unlink(missing_ok=True)
        archive.with_name(f".{archive.name}.lock").unlink(missing_ok=True)
    return old
