"""The guest's initramfs: our agent as /init, static busybox, and the kernel modules the
session needs — built once per content and cached."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from qemubox.errors import InputError, ToolError
from qemubox.initramfs import CpioWriter
from qemubox.paths import cache_dir
from qemubox.sandbox.kernels import GuestKernel

BUSYBOX = Path("/bin/busybox")
COMPILERS = {"x86_64": "gcc", "arm64": "aarch64-linux-gnu-gcc"}

# Modules by feature, by the names modules.dep knows them by.
BASE_MODULES = ("virtio_mmio", "virtio_pci", "virtio_console", "virtio_rng")
FEATURE_MODULES = {
    "disks": ("virtio_blk", "ext4"),
    "shares": ("9pnet_virtio", "9p"),
    "network": ("virtio_net", "af_packet"),
    "balloon": ("virtio_balloon",),
}

_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1 localhost qemubox\n::1 localhost\n",
    "etc/resolv.conf": "nameserver 10.0.2.3\n",
    "etc/hostname": "qemubox\n",
}


def agent_source() -> bytes:
    return (resources.files("qemubox.guest") / "agent.c").read_bytes()


def agent_binary(arch: str) -> Path:
    """The guest agent, compiled statically for ``arch`` once per source version."""
    compiler = COMPILERS[arch]
    if shutil.which(compiler) is None:
        raise InputError(f"{compiler} is needed to build the guest agent (see setup.sh)")
    source = agent_source()
    key = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    target = cache_dir() / "agent" / f"qemubox-agent-{arch}-{key}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    src = target.with_suffix(".c")
    src.write_bytes(source)
    tmp = target.with_suffix(".tmp")
    proc = subprocess.run(
        [compiler, "-static", "-O2", "-s", "-o", str(tmp), str(src)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise ToolError(f"building the guest agent failed: {proc.stderr.strip()[-500:]}")
    os.replace(tmp, target)
    return target


def _modules_dep(modules: Path) -> dict[str, tuple[str, list[str]]]:
    """module name -> (path relative to the modules dir, dependency paths)."""
    out = {}
    for line in (modules / "modules.dep").read_text(errors="replace").splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        name = Path(path).name.split(".ko", 1)[0].replace("-", "_")
        out[name] = (path, deps.split())
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


def module_closure(modules: Path, wanted: list[str]) -> list[str]:
    """Paths of the wanted modules, their dependencies and soft dependencies (``pre:``,
    resolved through aliases), dependencies first."""
    dep = _modules_dep(modules)
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


def needed_modules(kernel: GuestKernel, features: set[str]) -> list[str]:
    if kernel.modules is None:
        return []
    wanted = list(BASE_MODULES)
    for feature in sorted(features):
        wanted += FEATURE_MODULES.get(feature, ())
    return module_closure(kernel.modules, wanted)


def _module_index(modules: Path, included: list[str]) -> dict[str, str]:
    """modules.dep and modules.alias for just the included modules (uncompressed names), so
    that the kernel's on-demand loading (busybox modprobe) finds them in the guest."""

    def plain(path: str) -> str:
        return path.split(".ko", 1)[0] + ".ko"

    dep = _modules_dep(modules)
    kept = set(included)
    lines = [
        f"{plain(path)}: {' '.join(plain(d) for d in deps if d in kept)}".rstrip()
        for path, deps in dep.values()
        if path in kept
    ]
    names = {Path(p).name.split(".ko", 1)[0].replace("-", "_") for p in included}
    aliases = [
        f"alias {alias} {name}"
        for alias, targets in _aliases(modules).items()
        for name in targets
        if name in names
    ]
    return {"modules.dep": "\n".join(lines) + "\n", "modules.alias": "\n".join(aliases) + "\n"}


def _busybox_applets() -> list[str]:
    proc = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolError("busybox --list-full failed (is busybox-static installed?)")
    return [line for line in proc.stdout.split() if line and line != "bin/busybox"]


def initramfs(kernel: GuestKernel, features: set[str]) -> Path:
    """The initramfs for this kernel and these features, built once and cached."""
    if not BUSYBOX.is_file():
        raise InputError("busybox-static is not installed (apt-get install busybox-static)")
    if kernel.arch != "x86_64":
        raise InputError(f"sandboxes run x86_64 guests on this host, not {kernel.arch}")
    agent = agent_binary(kernel.arch)
    # Keyed by what decides the content, cheaply: the module closure itself is worked out
    # from the kernel's module index only when the archive has to be made.
    digest = hashlib.sha256()
    for part in (agent.name, kernel.version, str(kernel.modules), *sorted(features)):
        digest.update(part.encode() + b"\0")
    stamped = [BUSYBOX]
    if kernel.modules is not None:
        stamped += [kernel.modules / n for n in ("modules.dep", "modules.alias", "modules.softdep")]
    for path in stamped:
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            digest.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    target = cache_dir() / "initramfs" / f"{digest.hexdigest()[:20]}.cpio"
    if target.is_file():
        return target
    modules = needed_modules(kernel, features)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        cpio = CpioWriter(fh)
        cpio.add_host_file("init", agent, 0o755)
        cpio.add_host_file("bin/busybox", BUSYBOX, 0o755)
        for applet in _busybox_applets():
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
            dest = f"lib/modules/{kernel.version}/" + mod.split(".ko", 1)[0] + ".ko"
            cpio.add_file(dest, _module_bytes(kernel.modules / mod))
            load.append("/" + dest)
        cpio.add_file("etc/qemubox/modules", "".join(p + "\n" for p in load).encode())
        if modules:
            base = f"lib/modules/{kernel.version}/"
            for name, text in _module_index(kernel.modules, modules).items():
                cpio.add_file(base + name, text.encode())
        cpio.close()
    os.replace(tmp, target)
    return target
