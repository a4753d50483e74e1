"""``qemubox kernel build``: sources, configuration, cached out-of-tree builds.

Layout under ``<cache>/kernel-build/``:

- ``<src>-<arch>-kconfig/``: where the configuration is resolved (olddefconfig);
- ``<src>-<arch>-<profile>/``: the make directory of a profile, built in place so that a
  small configuration change rebuilds only what it affects (a copied build directory would
  not do: kbuild's host tools record absolute paths and rebuild, and every object with them);
- ``<src>-<arch>-<config sha256>/``: a finished build's outputs (image, .config, System.map,
  vmlinux, modules) in a build tree's layout, with ``.qemubox-build.json`` describing it;
- ``index.json``: the inputs of each build (source, arch, fragments) to its outputs, so that
  a build with nothing changed is found without running make at all.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qemubox import __version__
from qemubox import arch as arches
from qemubox.apt import apt_install, program
from qemubox.errors import InputError, VerifyError
from qemubox.kconfig.catalog import resolve_fragment
from qemubox.kconfig.engine import apply_fragments, install_config
from qemubox.kconfig.fragment import Assignment, parse_config_text, read_fragments
from qemubox.kconfig.merge import MergedConfig, merge
from qemubox.kernel.builds import BUILD_MARK, build_root
from qemubox.kernel.install import same_file
from qemubox.kernel.profiles import DEFAULT as DEFAULT_PROFILE
from qemubox.kernel.profiles import PROFILES
from qemubox.kernel.source import debian_source, extract_tarball, file_sha256
from qemubox.linux.tree import KernelTree, cross_compile_prefix
from qemubox.paths import cache_dir, locked, read_json, updating_json, write_json

KERNEL_ORG = "https://cdn.kernel.org/pub/linux/kernel"


@dataclass(frozen=True)
class Source:
    path: Path
    key: str  # short, filesystem-safe identity of the source
    description: str
    fingerprint: str | None  # identity of its content; None: a directory (see scan_tree)
    # A directory its user edits: the same key holds other contents over time. Of a git
    # checkout (fingerprinted), each content's build is kept apart (a revisit builds nothing)
    editable: bool = False

    @property
    def versioned(self) -> bool:
        return self.editable and self.fingerprint is not None


@dataclass
class BuildRequest:
    kernel_version: str | None = None
    source: str | None = None
    sha256: str | None = None
    arch: str | None = None
    profile: str = DEFAULT_PROFILE
    fragments: Sequence[str] = ()
    config_items: Sequence[str] = ()
    jobs: int | None = None
    output: Path | None = Path("build/kernel")  # None: the build stays in the cache alone


@dataclass
class BuildResult:
    manifest: dict
    build_dir: Path
    output: Path
    ran_make: bool
    notes: list[str] = field(default_factory=list)


class ConfigMismatchError(VerifyError):
    """The configuration did not come out as asked; nothing was compiled."""

    def __init__(self, lines: list[str], count: int) -> None:
        super().__init__(f"{count} option(s) did not get their wanted values; nothing was compiled")
        self.lines = lines


# --- sources ----------------------------------------------------------------------------------


UNTRACKED_LIMIT = (256, 64 << 20)  # untracked files fingerprinted: at most this many, bytes


def _git_fingerprint(path: Path) -> str | None:
    """The content of a git checkout: HEAD's tree, uncommitted changes, and each untracked
    (not ignored) file's content. None when not a git checkout, or when its untracked files
    are too many or too large to read at each build (the tree is then scanned instead)."""

    def git(*args: str) -> str | None:
        proc = subprocess.run(["git", "-C", str(path), *args], capture_output=True, check=False)
        return proc.stdout.decode(errors="replace") if proc.returncode == 0 else None

    head = git("rev-parse", "HEAD^{tree}")
    untracked = git("ls-files", "-z", "--others", "--exclude-standard")
    if head is None or untracked is None:
        return None
    digest = hashlib.sha256(head.encode())
    digest.update((git("diff", "--binary", "HEAD") or "").encode())
    names = sorted(n for n in untracked.split("\0") if n)
    count, limit = UNTRACKED_LIMIT
    sizes = 0
    if len(names) > count:
        return None
    for name in names:
        try:
            data = (path / name).read_bytes() if not (path / name).is_symlink() else b""
        except OSError:
            return None
        sizes += len(data)
        if sizes > limit:
            return None
        digest.update(f"{name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def download_kernel(version: str) -> Path:
    """linux-<version>.tar.xz from kernel.org (or $QEMUBOX_KERNEL_MIRROR), cached."""
    import urllib.error
    import urllib.request

    major = version.split(".")[0]
    mirror = os.environ.get("QEMUBOX_KERNEL_MIRROR", KERNEL_ORG).rstrip("/")
    url = f"{mirror}/v{major}.x/linux-{version}.tar.xz"
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / f"linux-{version}.tar.xz"
    if target.is_file():
        return target
    tmp = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=20) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (urllib.error.URLError, OSError) as err:
        tmp.unlink(missing_ok=True)
        reason = getattr(err, "reason", err)
        raise InputError(
            f"cannot download {url} ({reason}); offline? Give a local tarball with --source"
        ) from None
    os.replace(tmp, target)
    return target


def resolve_source(
    kernel_version: str | None, source: str | None, sha256: str | None = None
) -> Source:
    if kernel_version and source:
        raise InputError("give --kernel-version or --source, not both")
    if source:
        path = Path(source)
        if path.is_dir():
            real = path.resolve()
            key = "dir-" + hashlib.sha256(str(real).encode()).hexdigest()[:10]
            return Source(real, key, str(real), _git_fingerprint(real), editable=True)
        if path.is_file():
            digest = file_sha256(path)
            tree = extract_tarball(path, sha256)
            return Source(tree, digest[:12], str(path.resolve()), digest)
        raise InputError(f"--source {source}: no such directory or tarball")
    version = kernel_version or "6.12"
    parts = version.split(".")
    if not all(p.isdigit() for p in parts) or len(parts) not in (2, 3):
        raise InputError(f"--kernel-version must look like 6.12 or 6.6.30, got {version!r}")
    if len(parts) == 2:
        tree = debian_source(version)
        tarball = Path(f"/usr/src/linux-source-{version}.tar.xz")
        digest = file_sha256(tarball)
        return Source(tree, digest[:12], f"Debian linux-source-{version}", digest)
    tarball = download_kernel(version)
    digest = file_sha256(tarball)
    return Source(extract_tarball(tarball, sha256), digest[:12], f"linux-{version}", digest)


# --- configuration ----------------------------------------------------------------------------


def config_items(items: Sequence[str]) -> list[Assignment]:
    out = []
    for i, item in enumerate(items, start=1):
        parsed = parse_config_text(item, f"--config-item {i}")
        if len(parsed) != 1:
            raise InputError(f"--config-item {item!r}: expected one CONFIG_NAME=value")
        out.append(parsed[0])
    return out


def request_fragments(req: BuildRequest, arch: str) -> tuple[str, MergedConfig, list[str]]:
    """The base target, the merged fragments, and the fragment names for the manifest."""
    if req.profile not in PROFILES:
        raise InputError(f"unknown profile {req.profile!r} (one of: {', '.join(PROFILES)})")
    base, shipped = PROFILES[req.profile]
    record = arches.get(arch)
    dumps = ("vmcore",) if record.vmcoreinfo else ()
    names = [*shipped, *record.fragments, *dumps, *req.fragments]
    assignments = read_fragments(names, resolve=resolve_fragment)
    merged = merge([*assignments, *config_items(req.config_items)])
    return base, merged, [*names, *req.config_items]


def _cc_version(arch: str) -> str:
    prefix = cross_compile_prefix(arch) or ""
    if prefix and not shutil.which(prefix + "gcc"):
        apt_install(
            arches.get(arch).cross_package, f"no cross compiler {prefix}gcc for ARCH={arch}"
        )
    proc = subprocess.run([prefix + "gcc", "--version"], capture_output=True, text=True)
    return (proc.stdout.splitlines() or [""])[0]


def _input_key(source: Source, arch: str, base: str, merged: MergedConfig, cc: str) -> str:
    blob = json.dumps(
        {
            "source": source.key,
            "fingerprint": source.fingerprint,
            "arch": arch,
            "base": base,
            "config": merged.kernel_input_text(),
            "silent": sorted(a.name for a in merged.entries.values() if a.silent),
            "cc": cc,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class TreeScan:
    """What one walk of a directory source tells a build: a digest of what a configuration
    is made from (every Kconfig file, the base configurations in ``configs/`` directories,
    the configuration tools in ``scripts/kconfig``, by path, size and time), and the tree's
    state (its entries and the newest change time of any of them: an edit, a new, removed
    or renamed file, even one given an old modification time, changes it)."""

    kconfig: str
    state: str


def scan_tree(tree: Path) -> TreeScan:
    digest = hashlib.sha256()
    newest = count = 0
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(tree / rel if rel else tree) as it:
            entries = sorted(it, key=lambda e: e.name)
        every = os.path.basename(rel) == "configs" or rel.startswith("scripts/kconfig")
        dirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            st = entry.stat(follow_symlinks=False)
            count += 1
            newest = max(newest, st.st_ctime_ns, st.st_mtime_ns)
            if entry.is_symlink():  # make reads what it points to
                with contextlib.suppress(OSError):
                    target = entry.stat()
                    newest = max(newest, target.st_ctime_ns, target.st_mtime_ns)
            if entry.is_dir(follow_symlinks=False):
                dirs.append(f"{rel}/{entry.name}" if rel else entry.name)
            elif every or entry.name.startswith("Kconfig"):
                digest.update(f"{rel}/{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        stack.extend(reversed(dirs))
    return TreeScan(digest.hexdigest(), f"{newest}:{count}")


TREE_MARK = ".qemubox-tree.json"  # in a work directory: the state its last build was made from
# Environment variables make's work does not depend on (any other one that changed runs make)
_UNRELATED_ENV = ("PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES", "PYTEST_CURRENT_TEST")


def _built_from(scan: TreeScan, input_key: str, config_sha: str) -> dict:
    """What a directory source's build is made from, beyond the inputs its key holds: the
    tree's state and the environment make sees. A work directory whose last finished build
    was made from the same needs no make at all (make's own no-op takes seconds: it
    descends into every directory of the tree)."""
    env = sorted((k, v) for k, v in os.environ.items() if k not in _UNRELATED_ENV)
    return {
        "state": scan.state,
        "input_key": input_key,
        "config_sha256": config_sha,
        "env": hashlib.sha256(json.dumps(env).encode()).hexdigest(),
    }


def _configure(
    source: Source,
    kconf: KernelTree,
    merged: MergedConfig,
    base: str,
    key: str,
    scan: TreeScan | None = None,
):
    """Resolve the configuration in ``kconf`` (raising ConfigMismatchError when it does not
    come out as asked); skipped when the last one there had the same inputs (``key``: the
    request's, with the tree's Kconfig files for a directory source, from ``scan`` when it
    was walked already) and is intact. Returns the resolved ``.config``'s text."""
    stamp = kconf.build / ".qemubox-kconfig.json"
    if source.fingerprint is None:
        kconfig = (scan or scan_tree(source.path)).kconfig
        key = hashlib.sha256(f"{key}\0{kconfig}".encode()).hexdigest()
    last = read_json(stamp)
    if last.get("key") == key and kconf.config_path.is_file():
        text = kconf.config_path.read_text()
        if hashlib.sha256(text.encode()).hexdigest() == last.get("config_sha256"):
            return text
    stamp.unlink(missing_ok=True)
    result = apply_fragments(kconf, merged, base)
    if result.mismatches:
        from qemubox.kconfig.explain import explain_mismatches

        reasons = explain_mismatches(kconf, result.config, result.mismatches)
        lines = []
        for m in result.mismatches:
            lines.append(str(m))
            lines += [f"    {r}" for r in reasons.get(m.name, [])]
        raise ConfigMismatchError(lines, len(result.mismatches))
    text = kconf.config_path.read_text()
    write_json(stamp, {"key": key, "config_sha256": hashlib.sha256(text.encode()).hexdigest()})
    return text


# --- build ------------------------------------------------------------------------------------


def _store_outputs(work: Path, target: Path, manifest: dict) -> None:
    """Copy a finished build's outputs out of the work directory into ``target``, laid out
    like a build tree (its boot image, ``.config``, ...), then mark it finished."""
    files = tuple(dict.fromkeys((manifest["image"], ".config", "System.map", "vmlinux")))
    modules = work / ".qemubox-modules"
    if (
        read_json(target / BUILD_MARK).get("version") == manifest["version"]
        and all(same_file(work / rel, target / rel) for rel in files)
        and not modules.is_dir()
    ):  # make changed nothing (a directory source rebuilt as it was)
        write_json(target / BUILD_MARK, manifest)
        return
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in files:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / rel, tmp / rel)
    if modules.is_dir():
        shutil.copytree(modules, tmp / ".qemubox-modules", symlinks=True)
    write_json(tmp / BUILD_MARK, manifest)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _work_name(req: BuildRequest) -> str:
    """The work directory's name: the profile's, and what the request adds to it (a
    .kunitconfig, say), so that alternating between them rebuilds neither from scratch."""
    extra = [*req.fragments, *req.config_items]
    if not extra:
        return req.profile
    return f"{req.profile}-{hashlib.sha256(json.dumps(extra).encode()).hexdigest()[:8]}"


KEEP_VERSIONS = 8  # builds of one git checkout and configuration kept (the newest)


def _prune_versions(root: Path, stem: str, keep: Path) -> None:
    """Remove the oldest builds named ``stem``... beyond KEEP_VERSIONS (never ``keep``)."""
    found = sorted(
        (d for d in root.glob(f"{stem}*") if d.is_dir() and d != keep),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    for old in found[KEEP_VERSIONS - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def _has_modules(config_text: str) -> bool:
    return "\nCONFIG_MODULES=y\n" in "\n" + config_text


def _compile(tree: KernelTree, image: str, jobs: int, label: str) -> float:
    from qemubox.kernel.progress import run_make  # rich, only when compiling

    image_target = Path(image).name
    config_text = tree.config_path.read_text()
    targets = list(dict.fromkeys([image_target, "vmlinux"]))
    if _has_modules(config_text):
        targets.append("modules")
    seconds = run_make(tree.make_args(targets, jobs), tree.build / "build.log", label=label)
    staging = tree.build / ".qemubox-modules"
    shutil.rmtree(staging, ignore_errors=True)
    if _has_modules(config_text):
        # depmod is an administrator's tool (/usr/sbin), off an ordinary user's PATH
        install = {"INSTALL_MOD_PATH": str(staging), "DEPMOD": program("depmod", "kmod")}
        tree.make("modules_install", env=install)
    return seconds


def build_kernel(req: BuildRequest) -> BuildResult:
    """Configure, verify, build (or find the finished build) and install into req.output
    (when given)."""
    from qemubox.kernel.install import install_build

    arch = arches.normalize(req.arch)
    if arch not in arches.ARCHES:
        raise InputError(f"--arch {req.arch}: qemubox builds {', '.join(arches.ARCHES)}")
    karch = arches.get(arch).karch
    base, merged, fragment_names = request_fragments(req, arch)
    source = resolve_source(req.kernel_version, req.source, req.sha256)
    cc = _cc_version(arch)
    jobs = req.jobs or os.cpu_count() or 1
    root = build_root()
    prefix = f"{source.key}-{arch}-"
    input_key = _input_key(source, arch, base, merged, cc)
    with locked(root / f".{source.key}-{arch}.lock"):
        index_path = root / "index.json"
        known = read_json(index_path).get(input_key)
        if source.fingerprint and known and (root / known / BUILD_MARK).is_file():
            build_dir = root / known
            manifest = read_json(build_dir / BUILD_MARK)
            notes = install_build(manifest, build_dir, req.output) if req.output else []
            return BuildResult(manifest, build_dir, req.output or build_dir, False, notes)

        kconf = KernelTree.open(source.path, root / f"{prefix}kconfig", karch)
        scan = scan_tree(source.path) if source.fingerprint is None else None
        config_text = _configure(source, kconf, merged, base, input_key, scan)
        config_sha = hashlib.sha256(config_text.encode()).hexdigest()
        stored = f"{prefix}{config_sha[:16]}"
        if source.versioned:
            stored += f"-{source.fingerprint[:12]}"
        build_dir = root / stored
        work = KernelTree(source.path, root / f"{prefix}{_work_name(req)}", karch)
        built_from = _built_from(scan, input_key, config_sha) if scan else None
        ran_make = False
        if not (build_dir / BUILD_MARK).is_file() or not (
            source.fingerprint or read_json(work.build / TREE_MARK) == built_from
        ):
            (work.build / TREE_MARK).unlink(missing_ok=True)
            install_config(work, config_text)
            label = f"building {source.description} ({req.profile}, {arch})"
            seconds = _compile(work, arches.get(arch).image, jobs, label)
            ran_make = True
            release = (work.build / "include/config/kernel.release").read_text().strip()
            manifest = {
                "version": release,
                "arch": arch,
                "profile": req.profile,
                "fragments": fragment_names,
                "config_sha256": config_sha,
                "source": source.description,
                "source_key": source.key,
                "build_seconds": round(seconds, 1),
                "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "image": arches.get(arch).image,
                "modules": _has_modules(config_text),
                "jobs": jobs,
                "compiler": cc,
                "qemubox": __version__,
                "build_dir": str(build_dir),
                "work_dir": str(work.build),
            }
            _store_outputs(work.build, build_dir, manifest)
            if built_from is not None:
                write_json(work.build / TREE_MARK, built_from)
            if source.versioned:
                _prune_versions(root, f"{prefix}{config_sha[:16]}-", build_dir)
        manifest = read_json(build_dir / BUILD_MARK)
        with updating_json(index_path) as index:  # shared by every source's builds
            index[input_key] = build_dir.name
        notes = install_build(manifest, build_dir, req.output) if req.output else []
        return BuildResult(manifest, build_dir, req.output or build_dir, ran_make, notes)
