"""KUnit as kunit.py runs it, made a matrix: the ``.kunitconfig`` fragments of a run (files,
directories holding one, or the tree's default), a kernel built with them on top of the
``kunit`` fragment, and a boot per filter whose KTAP is read from the kernel log (a test kind
of matrix files too: ``kunit = "GLOB"``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qemubox.errors import InputError
from qemubox.kconfig.fragment import read_fragments
from qemubox.kernel.profiles import DEFAULT as DEFAULT_PROFILE
from qemubox.matrix.spec import KUNIT_COMMAND, Cell, KernelSpec, Matrix, TestSpec

KUNITCONFIG = ".kunitconfig"  # what a directory given as --kunitconfig holds
DEFAULT_KUNITCONFIG = "tools/testing/kunit/configs/default.config"  # the tree's own default
FRAGMENT = "kunit"  # the shipped fragment under every .kunitconfig
FILTER_MAX = 256  # characters of a filter glob


def kunitconfigs(tree: Path, given: Sequence[str]) -> tuple[str, ...]:
    """The .kunitconfig files of a run, as kunit.py finds them: each PATH a file, or a
    directory holding one; none given, the tree's default. Two that set one option to
    different values are refused, naming both."""
    paths = []
    for text in given:
        path = Path(text).expanduser().absolute()
        if path.is_dir():
            path = path / KUNITCONFIG
        if not path.is_file():
            raise InputError(
                f"--kunitconfig {text}: no such file, nor a directory with a .kunitconfig"
            )
        paths.append(path)
    if not paths:
        path = tree / DEFAULT_KUNITCONFIG
        if not path.is_file():
            raise InputError(f"{tree} has no {DEFAULT_KUNITCONFIG}: give --kunitconfig")
        paths.append(path)
    seen: dict[str, tuple[str, Path]] = {}
    for path in paths:
        for a in read_fragments([str(path)]):
            if a.name in seen and seen[a.name][0] != a.value:
                first_value, first = seen[a.name]
                raise InputError(
                    f"{a.symbol} is {first_value} in {first} and {a.value} in {path}: "
                    "one value per option"
                )
            seen.setdefault(a.name, (a.value, path))
    return tuple(str(p) for p in paths)


def check_filter(glob: str) -> str:
    """A kunit.filter_glob: SUITE[.TEST], shell wildcards, one word."""
    if not glob or len(glob) > FILTER_MAX or any(c.isspace() or not c.isprintable() for c in glob):
        raise InputError(f"filter {glob!r}: expected SUITE[.TEST] (wildcards allowed), one word")
    return glob


def matrix(
    source: str | None,
    config_paths: tuple[str, ...],
    filters: Sequence[str],
    arch: str | None = None,
    profile: str = DEFAULT_PROFILE,
    options: tuple[tuple[str, object], ...] = (),
) -> Matrix:
    """The run as a matrix: one kernel (``source``: a tree, None: Debian's 6.12 source) and
    a boot per filter (none: one that runs every suite)."""
    kernel = KernelSpec(
        name="kunit",
        source=source,
        profile=profile,
        fragments=(FRAGMENT, *config_paths),
        arch=arch,
    )
    tests = [
        TestSpec(glob or "all", KUNIT_COMMAND, options, kunit=glob)
        for glob in ([check_filter(f) for f in filters] or [""])
    ]
    return Matrix([Cell(kernel, t) for t in tests], "qemubox kunit", [kernel])
