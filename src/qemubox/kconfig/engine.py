"""Applying merged fragments to a kernel tree (``olddefconfig``) and verifying the result."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qemubox.errors import InputError
from qemubox.kconfig.catalog import resolve_fragment
from qemubox.kconfig.fragment import Assignment, parse_config_text, read_fragments
from qemubox.kconfig.merge import MergedConfig, merge
from qemubox.kconfig.verify import Mismatch, verify
from qemubox.linux.tree import KernelTree, srcarch

_TMP_NAME = ".qemubox-config.tmp"
# make targets that create a config from nothing (they never read an existing .config).
_FRESH_TARGET_RE = re.compile(
    r"(allno|allyes|allmod|alldef|rand|def)config|[A-Za-z0-9_.+-]+_defconfig"
)


def load_fragments(
    args: Sequence[str], stdin_text: Callable[[], str] | None = None
) -> MergedConfig:
    """Parse and merge fragment arguments (paths, shipped names or ``-``)."""
    if not args:
        raise InputError("no fragments given")
    return merge(read_fragments(args, resolve=resolve_fragment, stdin_text=stdin_text))


def read_config_assignments(path: Path, display: str | None = None) -> list[Assignment]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise InputError(f"no such config file: {display or path}") from None
    except OSError as err:
        raise InputError(f"cannot read {display or path}: {err.strerror}") from None
    return parse_config_text(text, display or str(path))


def read_config(path: Path) -> dict[str, str]:
    """The values a ``.config`` sets (``n`` for ``# ... is not set``)."""
    return merge(read_config_assignments(path)).values()


@dataclass(frozen=True)
class ApplyResult:
    config: Path
    changed: bool
    backup: Path | None
    mismatches: list[Mismatch]


def _silenced(assignments: list[Assignment]) -> list[Assignment]:
    return [Assignment(a.name, a.value, a.location, silent=True) for a in assignments]


def _base_assignments(tree: KernelTree, base: str) -> list[Assignment]:
    """The base configuration: a config file, or what a make target such as tinyconfig makes."""
    path = Path(base)
    if path.is_file():
        return read_config_assignments(path, base)
    if base == "tinyconfig":
        return _tinyconfig(tree)
    if "/" in base or not _FRESH_TARGET_RE.fullmatch(base):
        raise InputError(
            f"--base {base}: neither a config file nor a make target that makes a config "
            "from scratch (tinyconfig, defconfig, allnoconfig, x86_64_defconfig, ...)"
        )
    return parse_config_text(_make_config(tree, base), base)


def _make_config(tree: KernelTree, target: str, env: dict[str, str] | None = None) -> str:
    """Run a config target on a scratch file; returns the config text it made."""
    tmp = tree.build / _TMP_NAME
    try:
        tree.make(target, env={**(env or {}), "KCONFIG_CONFIG": str(tmp)})
        return tmp.read_text(encoding="utf-8", errors="replace")
    finally:
        _remove_tmp(tmp)


def _tinyconfig(tree: KernelTree) -> list[Assignment]:
    """``make tinyconfig`` without touching ``.config``.

    The kernel's own recipe is allnoconfig seeded by ``tiny-base.config``, then the
    ``tiny.config`` fragments merged on top; some versions merge those into ``.config``
    regardless of ``KCONFIG_CONFIG``, so the merge is done here.
    """
    seed = tree.src / "kernel" / "configs" / "tiny-base.config"
    env = {"KCONFIG_ALLCONFIG": str(seed)} if seed.is_file() else {}
    base = parse_config_text(_make_config(tree, "allnoconfig", env), "allnoconfig")
    fragments = [
        str(p)
        for p in (
            tree.src / "kernel" / "configs" / "tiny.config",
            tree.src / "arch" / srcarch(tree.arch) / "configs" / "tiny.config",
        )
        if p.is_file()
    ]
    merged = merge([*base, *read_fragments(fragments)])
    return parse_config_text(olddefconfig(tree, merged.kernel_input_text()), "tinyconfig")


def _remove_tmp(tmp: Path) -> None:
    for leftover in (tmp, tmp.with_name(tmp.name + ".old")):
        leftover.unlink(missing_ok=True)


def olddefconfig(tree: KernelTree, text: str) -> str:
    """Resolve a partial config with ``make olddefconfig``; returns the full config text.

    The work happens on a scratch file so that the tree's ``.config`` and ``.config.old``
    are touched only by :func:`install_config`.
    """
    tree.build.mkdir(parents=True, exist_ok=True)
    tmp = tree.build / _TMP_NAME
    try:
        tmp.write_text(text, encoding="utf-8")
        tree.make("olddefconfig", env={"KCONFIG_CONFIG": str(tmp)})
        return tmp.read_text(encoding="utf-8", errors="replace")
    finally:
        _remove_tmp(tmp)


def install_config(tree: KernelTree, text: str) -> tuple[bool, Path | None]:
    """Make ``text`` the tree's ``.config``; a different previous one becomes ``.config.old``.

    An identical ``.config`` is left alone (its timestamp too, so make rebuilds nothing).
    """
    config = tree.config_path
    config.parent.mkdir(parents=True, exist_ok=True)
    old_text = config.read_text(encoding="utf-8", errors="replace") if config.exists() else None
    if old_text == text:
        return False, None
    backup = None
    if old_text is not None:
        backup = config.with_name(".config.old")
        os.replace(config, backup)
    new = config.with_name(".config.qemubox-new")
    new.write_text(text, encoding="utf-8")
    os.replace(new, config)
    return True, backup


def apply_fragments(tree: KernelTree, merged: MergedConfig, base: str | None = None) -> ApplyResult:
    """Merge fragments into the tree's ``.config`` and verify the outcome.

    With ``base``, the base configuration is made first and the fragments go on top of it,
    as ``merge_config.sh -m`` and ``make olddefconfig`` do; without it, the config holds only
    the fragment values before ``olddefconfig`` fills in the rest.
    """
    to_apply = merged
    if base is not None:
        fragments = [merged[name] for name in merged.last_order]
        to_apply = merge([*_silenced(_base_assignments(tree, base)), *fragments])
    result = olddefconfig(tree, to_apply.kernel_input_text())
    changed, backup = install_config(tree, result)
    actual = merge(parse_config_text(result, str(tree.config_path))).values()
    return ApplyResult(tree.config_path, changed, backup, verify(merged, actual))
