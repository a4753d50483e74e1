"""A matrix file (TOML) as data: kernels, tests, further axes, include/exclude rules, and the
cells they make. Every error is one line naming the file, the key and what is wrong, raised
before anything runs.

    [defaults]                 # run options of every test
    memory = "512M"
    timeout = 120

    [[kernel]]                 # the options of `qemubox kernel build`, or a built `path`
    name = "base"              # (path = "debian": Debian's kernel package of its `arch`)
    profile = "minimal"
    config = ["CONFIG_LOG_BUF_SHIFT=16"]

    [[test]]                   # a command and the options of `qemubox run`
    name = "uname"
    command = ["uname", "-r"]  # or one string, run by sh -c; or instead
    # kunit = "list-kernel-test*"  # the KUnit suites the kernel runs as it boots (a
                               # kunit.filter_glob; "" all), their KTAP read from its log
    volumes = ["data:/mnt/data:ro"]
    network = "allow=pypi.org"     # egress rules, as --net; add_hosts = ["NAME:IP"]

    [matrix]                   # more axes: kernel config (lists of items), the kernel's
    config = [[], ["CONFIG_LOG_BUF_SHIFT=17"]]     # arch, or run options
    arch = ["x86_64", "arm64"]
    memory = ["256M", "1G"]

    [[exclude]]                # cells matching every key are dropped
    kernel = "base"
    test = "uname"

    [[include]]                # cells added (a kernel, a test, and axis values)
    kernel = "base"
    test = "uname"
    memory = "2G"

Relative paths (kernel sources, fragments and paths; volume and disk host paths) are the
file's directory's.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from typing import Any

from qemubox.errors import InputError
from qemubox.image import reference
from qemubox.kernel.profiles import DEFAULT as DEFAULT_PROFILE
from qemubox.kernel.profiles import PROFILES
from qemubox.model import session as defaults
from qemubox.model.egress import host_pin, parse_network
from qemubox.sandbox import notation
from qemubox.sandbox.spec import Session

KERNEL_KEYS = {"name", "version", "source", "sha256", "profile", "fragments", "config", "arch"}
KERNEL_KEYS |= {"path"}
RUN_KEYS = {
    "memory",
    "cpus",
    "timeout",
    "boot_timeout",
    "volumes",
    "disks",
    "image",
    "network",
    "add_hosts",
}
RUN_KEYS |= {"accel", "env", "workdir"}
TEST_KEYS = RUN_KEYS | {"name", "command", "kunit"}
KERNEL_AXES = {"config", "fragments", "arch"}  # axes that change the kernel; the others, the run
DEBIAN = "debian"  # a kernel's path naming Debian's kernel package of its arch
KUNIT_COMMAND = ("dmesg",)  # what a KUnit test runs: the kernel log, with the boot's KTAP


class MatrixError(InputError):
    """A matrix file that cannot run; its message names the file and the key."""


@dataclass(frozen=True)
class KernelSpec:
    """A kernel to build (or a built one, ``path``)."""

    name: str
    version: str | None = None
    source: str | None = None
    sha256: str | None = None
    profile: str = DEFAULT_PROFILE
    fragments: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    arch: str | None = None
    path: str | None = None

    def build_inputs(self) -> tuple:
        """What the build depends on: two kernels with the same inputs are built once."""
        return astuple(replace(self, name=""))


@dataclass(frozen=True)
class TestSpec:
    name: str
    command: tuple[str, ...]
    options: tuple[tuple[str, Any], ...] = ()  # run options, as (key, value) in key order
    # KUnit: the suites run as the kernel boots (a kunit.filter_glob; "": all), read from
    # its log; the command then reads that log
    kunit: str | None = None

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class Cell:
    kernel: KernelSpec
    test: TestSpec
    axes: tuple[tuple[str, str], ...] = ()  # the further axes' values, as shown

    @property
    def id(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.axes)
        return f"{self.kernel.name}/{self.test.name}" + (f"[{extra}]" if extra else "")

    def session(self, kernel: str, modules: str | None = None) -> Session:
        """The sandbox this cell runs in, booting ``kernel``."""
        o = dict(self.test.options)
        shares = [notation.volume(v) for v in o.get("volumes", ())]
        kunit = self.test.kunit
        return Session(
            # KUnit's suites run as the kernel boots: a restored guest would not run them
            snapshot=kunit is None,
            kernel_args=f"kunit.filter_glob={kunit}" if kunit else "",
            memory=o.get("memory", defaults.DEFAULT_MEMORY),
            cpus=o.get("cpus", defaults.DEFAULT_CPUS),
            shares=shares,
            disks=[notation.disk(d) for d in o.get("disks", ())],
            network=o.get("network", defaults.NETWORKS[0]),
            add_hosts=list(o.get("add_hosts", ())),
            kernel=kernel,
            modules=modules,
            timeout=o.get("timeout", 600),
            boot_timeout=o.get("boot_timeout", 120),
            accel=o.get("accel", defaults.ACCELS[0]),
            image=o.get("image", defaults.DEFAULT_IMAGE),
            arch=self.kernel.arch,
        )


@dataclass
class Matrix:
    cells: list[Cell]
    source: str = "<matrix>"
    kernels: list[KernelSpec] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: str | Path) -> Matrix:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as err:
            raise MatrixError(f"{path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise MatrixError(f"{path}: not TOML: {err}") from None
        return cls.from_data(data, path.parent, str(path))

    @classmethod
    def from_data(cls, data: dict, base: Path, source: str = "<matrix>") -> Matrix:
        return _Reader(data, base, source).matrix()


class _Reader:
    def __init__(self, data: dict, base: Path, source: str) -> None:
        self.data, self.base, self.source = data, base, source

    def fail(self, key: str, message: str) -> MatrixError:
        return MatrixError(f"{self.source}: {key}: {message}")

    # --- values -----------------------------------------------------------------------------

    def _str(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        return value

    def _each(self, key: str, value: object, parse):
        """Each string of the list ``value``, as (its place, itself, ``parse(it)``); an
        element ``parse`` refuses is an error naming that element."""
        for i, text in enumerate(self._strings(key, value)):
            try:
                parsed = parse(text)
            except InputError as err:
                raise self.fail(f"{key}[{i}]", str(err)) from None
            yield f"{key}[{i}]", text, parsed

    def _strings(self, key: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"expected a list of strings, got {value!r}")
        return tuple(value)

    def _path(self, value: str) -> str:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (self.base / p).resolve())

    def _table_list(self, name: str) -> list[dict]:
        items = self.data.get(name, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise self.fail(name, f"expected [[{name}]] tables")
        return items

    # --- kernels ------------------------------------------------------------------------------

    def kernel(self, i: int, t: dict) -> KernelSpec:
        where = f"kernel[{i}]"
        unknown = sorted(set(t) - KERNEL_KEYS)
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}", f"unknown key (known: {_known(KERNEL_KEYS)})")
        name = self._str(f"{where}.name", t.get("name"))
        where = f"kernel {name!r}"
        profile = t.get("profile", DEFAULT_PROFILE)
        if profile not in PROFILES:
            raise self.fail(f"{where}.profile", f"must be one of {', '.join(PROFILES)}")
        spec = KernelSpec(
            name=name,
            version=self._str(f"{where}.version", t["version"]) if "version" in t else None,
            source=self._path(self._str(f"{where}.source", t["source"])) if "source" in t else None,
            sha256=self._str(f"{where}.sha256", t["sha256"]) if "sha256" in t else None,
            profile=profile,
            fragments=tuple(
                self._fragment(f"{where}.fragments", f) for f in t.get("fragments", ())
            ),
            config=self._config(f"{where}.config", t.get("config", [])),
            arch=self._arch(f"{where}.arch", t["arch"]) if "arch" in t else None,
            path=self._kernel_path(f"{where}.path", t["path"]) if "path" in t else None,
        )
        given = {"name", "path", "arch"} if spec.path == DEBIAN else {"name", "path"}
        if spec.path and set(t) - given:
            raise self.fail(f"{where}.path", "a built kernel takes no build options")
        if spec.path and spec.path != DEBIAN and not Path(spec.path).is_file():
            raise self.fail(f"{where}.path", f"no such file: {spec.path}")
        if spec.source and not Path(spec.source).exists():
            raise self.fail(f"{where}.source", f"no such file or directory: {spec.source}")
        if spec.version and spec.source:
            raise self.fail(where, "version and source exclude each other")
        return spec

    def _arch(self, key: str, value: Any) -> str:
        from qemubox import arch as arches

        value = self._str(key, value)
        if arches.normalize(value) not in arches.ARCHES:
            raise self.fail(key, f"must be one of {', '.join(arches.ARCHES)}")
        return arches.normalize(value)

    def _kernel_path(self, key: str, value: Any) -> str:
        value = self._str(key, value)
        return value if value == DEBIAN else self._path(value)

    def _fragment(self, key: str, value: Any) -> str:
        value = self._str(key, value)
        if "/" in value or value.endswith(".config"):
            path = self._path(value)
            if not Path(path).is_file():
                raise self.fail(key, f"no such fragment: {path}")
            return path
        return value  # a shipped fragment's name

    def _config(self, key: str, value: Any) -> tuple[str, ...]:
        from qemubox.kernel.build import config_items

        items = self._strings(key, value)
        try:
            config_items(items)
        except InputError as err:
            raise self.fail(key, str(err)) from None
        return items

    # --- tests and run options ------------------------------------------------------------------

    def run_options(self, where: str, t: dict, allowed: set[str]) -> dict:
        unknown = sorted(set(t) - allowed)
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}", f"unknown key (known: {_known(allowed)})")
        out = {}
        for key, value in t.items():
            if key in ("name", "command", "kunit"):
                continue
            out[key] = self.run_value(f"{where}.{key}", key, value)
        return out

    def run_value(self, key: str, name: str, value: Any) -> Any:
        """One run option, checked and with its host paths made absolute."""
        if name in ("memory", "image", "workdir", "accel"):
            value = self._str(key, value)
            if name == "image" and reference.looks_like(value):
                try:  # a container image: its path is the matrix file's, like the others
                    return reference.parse(value, self.base).skopeo()
                except InputError as err:
                    raise self.fail(key, str(err)) from None
            if name == "image" and ("/" in value or value.startswith(".")):
                value = self._path(value)
            return value
        if name == "network":
            try:
                parse_network(self._str(key, value))
            except InputError as err:
                raise self.fail(key, str(err)) from None
            return value
        if name == "add_hosts":
            return tuple(text for _, text, _ in self._each(key, value, host_pin))
        if name == "cpus":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 64:
                raise self.fail(key, f"expected a whole number from 1 to 64, got {value!r}")
            return value
        if name in ("timeout", "boot_timeout"):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise self.fail(key, f"expected a positive number of seconds, got {value!r}")
            return float(value)
        if name == "env":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise self.fail(key, "expected a table of strings")
            return tuple(sorted(value.items()))
        if name == "volumes":
            out = []
            for where, _, share in self._each(key, value, notation.volume):
                host = self._path(share.host_path)
                if not Path(host).is_dir():
                    raise self.fail(where, f"no such directory: {host}")
                out.append(f"{host}:{share.mount_point}" + (":ro" if share.read_only else ""))
            return tuple(out)
        if name == "disks":
            out = []
            for where, text, d in self._each(key, value, notation.disk):
                if d.path:  # shared by cells running at once: refused
                    raise self.fail(where, "a matrix cell's disks are ephemeral: no PATH")
                out.append(text)
            return tuple(out)
        raise self.fail(key, "unknown key")  # pragma: no cover - RUN_KEYS lists the above

    def test(self, i: int, t: dict, defaults: dict) -> TestSpec:
        name = self._str(f"test[{i}].name", t.get("name"))
        where = f"test {name!r}"
        command = t.get("command")
        if "kunit" in t:
            if command is not None:
                raise self.fail(f"{where}.kunit", "a KUnit test has no command")
            glob = t["kunit"]
            if not isinstance(glob, str) or any(c.isspace() for c in glob) or len(glob) > 256:
                raise self.fail(f"{where}.kunit", f"expected a suite[.test] glob, got {glob!r}")
            options = {**defaults, **self.run_options(where, t, TEST_KEYS)}
            return TestSpec(name, KUNIT_COMMAND, tuple(sorted(options.items())), kunit=glob)
        if isinstance(command, str) and command:
            argv: tuple[str, ...] = ("sh", "-c", command)
        elif isinstance(command, list) and command and all(isinstance(c, str) for c in command):
            argv = tuple(command)
        else:
            raise self.fail(f"{where}.command", "expected a list of strings or one string")
        options = {**defaults, **self.run_options(where, t, TEST_KEYS)}
        return TestSpec(name, argv, tuple(sorted(options.items())))

    # --- the whole ------------------------------------------------------------------------------

    def matrix(self) -> Matrix:
        known = {"defaults", "kernel", "test", "matrix", "include", "exclude"}
        unknown = sorted(set(self.data) - known)
        if unknown:
            raise self.fail(unknown[0], f"unknown section (known: {_known(known)})")
        defaults_table = self.data.get("defaults", {})
        if not isinstance(defaults_table, dict):
            raise self.fail("defaults", "expected a table")
        defaults = self.run_options("defaults", defaults_table, RUN_KEYS)
        kernels = [self.kernel(i, t) for i, t in enumerate(self._table_list("kernel"))]
        tests = [self.test(i, t, defaults) for i, t in enumerate(self._table_list("test"))]
        if not kernels:
            raise self.fail("kernel", "no [[kernel]]: at least one is needed")
        if not tests:
            raise self.fail("test", "no [[test]]: at least one is needed")
        for what, items in (("kernel", kernels), ("test", tests)):
            names = [x.name for x in items]
            dup = next((n for n in names if names.count(n) > 1), None)
            if dup:
                raise self.fail(what, f"the name {dup!r} is used twice")
        axes = self.axes()
        by_kernel = {k.name: k for k in kernels}
        by_test = {t.name: t for t in tests}
        cells = []
        for k, t, *values in itertools.product(kernels, tests, *[v for _, v in axes]):
            chosen = dict(zip([a for a, _ in axes], values, strict=True))
            cells.append(self.cell(k, t, chosen))
        for i, rule in enumerate(self._table_list("exclude")):
            self.check_rule(f"exclude[{i}]", rule, by_kernel, by_test, axes)
            cells = [c for c in cells if not _matches(c, rule)]
        for i, rule in enumerate(self._table_list("include")):
            self.check_rule(f"include[{i}]", rule, by_kernel, by_test, axes)
            if "kernel" not in rule or "test" not in rule:
                raise self.fail(f"include[{i}]", "an included cell names its kernel and test")
            values = {a: rule[a] for a, _ in axes if a in rule}
            for a in set(rule) - {"kernel", "test"} - {a for a, _ in axes}:
                values[a] = rule[a]
            cell = self.cell(by_kernel[rule["kernel"]], by_test[rule["test"]], values)
            if cell not in cells:
                cells.append(cell)
        if not cells:
            raise self.fail("exclude", "every cell is excluded")
        return Matrix(cells, self.source, kernels)

    def axes(self) -> list[tuple[str, list]]:
        table = self.data.get("matrix", {})
        if not isinstance(table, dict):
            raise self.fail("matrix", "expected a table of axes")
        out = []
        for name, values in table.items():
            key = f"matrix.{name}"
            if name in ("kernel", "test"):
                raise self.fail(key, "kernels and tests are axes already: use [[kernel]]/[[test]]")
            if name not in KERNEL_AXES | RUN_KEYS:
                raise self.fail(key, f"unknown axis (known: {_known(KERNEL_AXES | RUN_KEYS)})")
            if not isinstance(values, list) or not values:
                raise self.fail(key, "expected a non-empty list of values")
            out.append((name, values))
        return out

    def cell(self, kernel: KernelSpec, test: TestSpec, values: dict) -> Cell:
        shown = []
        for name, value in values.items():
            key = f"matrix.{name}"
            # An axis value the kernel has already adds nothing: the same kernel, built once.
            if name == "config":
                extra = tuple(c for c in self._config(key, value) if c not in kernel.config)
                kernel = replace(kernel, config=kernel.config + extra)
            elif name == "fragments":
                extra = tuple(self._fragment(key, f) for f in self._strings(key, value))
                extra = tuple(f for f in extra if f not in kernel.fragments)
                kernel = replace(kernel, fragments=kernel.fragments + extra)
            elif name == "arch":
                if kernel.path and kernel.path != DEBIAN:
                    raise self.fail(f"kernel {kernel.name!r}", "a built kernel has its own arch")
                kernel = replace(kernel, arch=self._arch(key, value))
            else:
                options = {**dict(test.options), name: self.run_value(key, name, value)}
                test = replace(test, options=tuple(sorted(options.items())))
            shown.append((name, _show(value)))
        if kernel.path and (kernel.config or kernel.fragments):
            raise self.fail(f"kernel {kernel.name!r}", "a built kernel (path) takes no config axis")
        return Cell(kernel, test, tuple(shown))

    def check_rule(self, key: str, rule: dict, kernels: dict, tests: dict, axes) -> None:
        names = {"kernel", "test"} | {a for a, _ in axes}
        if key.startswith("include"):
            names |= RUN_KEYS | KERNEL_AXES
        unknown = sorted(set(rule) - names)
        if unknown:
            raise self.fail(f"{key}.{unknown[0]}", f"not an axis (axes: {_known(names)})")
        if "kernel" in rule and rule["kernel"] not in kernels:
            raise self.fail(f"{key}.kernel", f"no kernel named {rule['kernel']!r}")
        if "test" in rule and rule["test"] not in tests:
            raise self.fail(f"{key}.test", f"no test named {rule['test']!r}")


def _matches(cell: Cell, rule: dict) -> bool:
    shown = dict(cell.axes)
    for key, value in rule.items():
        if key == "kernel" and cell.kernel.name != value:
            return False
        if key == "test" and cell.test.name != value:
            return False
        if key not in ("kernel", "test") and shown.get(key) != _show(value):
            return False
    return True


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(map(str, value)) or "-"
    return str(value)


def _known(keys: set[str]) -> str:
    return ", ".join(sorted(keys))
