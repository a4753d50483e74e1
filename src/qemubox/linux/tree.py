"""A kernel source tree with an (optional) separate build directory, driven through make."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qemubox import arch
from qemubox.errors import InputError, ToolError


def host_arch() -> str:
    return arch.karch(arch.normalize(None))


def normalize_arch(name: str | None) -> str:
    """make's ARCH for an arch name (qemubox's, Debian's or the kernel's own); ``None`` is
    the host's (always explicit: x86_64, not x86)."""
    return arch.karch(arch.normalize(name))


def srcarch(name: str) -> str:
    return arch.srcarch(name)


def cross_compile_prefix(name: str) -> str | None:
    """The ``CROSS_COMPILE`` prefix for building ``name`` on this host, if one is needed."""
    if srcarch(name) == srcarch(host_arch()):
        return None
    record = arch.find(name)
    return record.cross_prefix if record else None


def make_program() -> str:
    """The make to run (``QEMUBOX_MAKE`` overrides it, e.g. with a wrapper)."""
    return os.environ.get("QEMUBOX_MAKE", "make")


def is_source_tree(path: Path) -> bool:
    """Whether ``path`` is the top of a kernel source tree."""
    return (
        (path / "Makefile").is_file() and (path / "Kconfig").is_file() and (path / "arch").is_dir()
    )


def makefile_version(src: Path) -> str:
    """``VERSION.PATCHLEVEL.SUBLEVEL`` from a source tree's top Makefile."""
    head = (src / "Makefile").read_text(encoding="utf-8", errors="replace")[:2000]
    fields = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL)\s*=\s*(\d*)", head, re.M))
    if "VERSION" not in fields or "PATCHLEVEL" not in fields:
        raise InputError(f"cannot read the kernel version from {src}/Makefile")
    return f"{fields['VERSION']}.{fields['PATCHLEVEL']}.{fields.get('SUBLEVEL') or 0}"


@dataclass(frozen=True)
class KernelTree:
    """``src`` holds the sources; ``build`` is where .config and objects go (may be ``src``)."""

    src: Path
    build: Path
    arch: str

    @classmethod
    def open(cls, src: str | Path, build: str | Path | None = None, arch: str | None = None):
        src_path = Path(src).resolve()
        if not src_path.is_dir():
            raise InputError(f"kernel source directory does not exist: {src}")
        if not (src_path / "Kconfig").is_file() or not (src_path / "Makefile").is_file():
            raise InputError(f"not a kernel source tree (no Kconfig and Makefile): {src}")
        arch = normalize_arch(arch)
        if not (src_path / "arch" / srcarch(arch)).is_dir():
            raise InputError(f"unknown architecture {arch!r}: no arch/{srcarch(arch)} in {src}")
        build_path = Path(build).resolve() if build else src_path
        if build_path.exists() and not build_path.is_dir():
            raise InputError(f"build directory is not a directory: {build}")
        if build_path != src_path and (src_path / ".config").exists():
            raise InputError(
                f"{src} has a .config, so it cannot be built out of tree "
                f"(run 'make mrproper' there, or build in it without --build-dir)"
            )
        return cls(src_path, build_path, arch)

    @property
    def config_path(self) -> Path:
        return self.build / ".config"

    def version(self) -> str:
        return makefile_version(self.src)

    def make_args(self, targets: Sequence[str], jobs: int | None = None) -> list[str]:
        args = [make_program(), "-C", str(self.src), f"ARCH={self.arch}"]
        if self.build != self.src:
            args.append(f"O={self.build}")
        prefix = cross_compile_prefix(self.arch)
        if prefix and shutil.which(prefix + "gcc"):
            args.append(f"CROSS_COMPILE={prefix}")
        if jobs:
            args.append(f"-j{jobs}")
        return [*args, *targets]

    def make(
        self,
        *targets: str,
        env: Mapping[str, str] | None = None,
        jobs: int | None = None,
    ) -> str:
        """Run make quietly; returns its output, raises ToolError with the tail on failure."""
        if shutil.which(make_program()) is None:
            raise InputError("make is not installed (apt-get install build-essential)")
        self.build.mkdir(parents=True, exist_ok=True)
        args = self.make_args(targets, jobs)
        proc = subprocess.run(
            args,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            check=False,
        )
        if proc.returncode != 0:
            lines = proc.stdout.rstrip().splitlines()
            why = _first_error(lines) or (lines[-1] if lines else "no output")
            raise ToolError(
                f"'make {' '.join(targets)}' failed in {self.src}: {why}",
                "\n".join(lines[-40:]),
            )
        return proc.stdout

    def kconfig_env(self) -> dict[str, str]:
        """The variables the kernel's Makefile exports to Kconfig, for a standalone parser."""
        prefix = cross_compile_prefix(self.arch)
        if not (prefix and shutil.which(prefix + "gcc")):
            prefix = ""
        cc = prefix + "gcc"
        try:
            cc_text = subprocess.run(
                [cc, "--version"], capture_output=True, text=True, check=False
            ).stdout.splitlines()[0]
        except (OSError, IndexError):
            cc_text = ""
        return {
            "srctree": str(self.src),
            "ARCH": self.arch,
            "SRCARCH": srcarch(self.arch),
            "SUBARCH": srcarch(host_arch()),
            "KERNELVERSION": self.version(),
            "CC": cc,
            "LD": prefix + "ld",
            "OBJCOPY": prefix + "objcopy",
            "NM": prefix + "nm",
            "AR": prefix + "ar",
            "HOSTCC": "gcc",
            "HOSTCXX": "g++",
            "PAHOLE": "pahole",
            "RUSTC": "rustc",
            "BINDGEN": "bindgen",
            "CLANG_FLAGS": "",
            "CC_VERSION_TEXT": cc_text,
            "CROSS_COMPILE": prefix,
        }


def _first_error(lines: list[str]) -> str | None:
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("***") and stripped.strip("* "):
            return stripped.strip("* ")
        if re.search(r"(error|Error|ERROR)[: ]", stripped) and "Error 2" not in stripped:
            return stripped
    return None
