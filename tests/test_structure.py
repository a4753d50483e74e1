"""The structure holds: floors that only import downwards, no import circle, and a
machine plan whose every field was decided for the snapshot key. Pure: reads the source
and builds plans."""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import pytest

from qemubox.model import plan as plans
from qemubox.model.plan import (
    OUTSIDE_KEY,
    SCHEMA,
    Capability,
    DiskPlan,
    KernelPlan,
    MachinePlan,
    PortPlan,
    RootPlan,
    SharePlan,
    SnapshotPlan,
)

PACKAGE = Path(__file__).parent.parent / "src" / "qemubox"

# The floors, from the ground up. A module may import its own package and anything on a
# lower floor; never a package on its own floor or above.
FLOORS = [
    {"errors"},
    {"arch", "paths", "progress", "apt"},
    {"store", "model", "cc"},
    {"linux", "qemu", "egress"},
    {"kconfig", "guest", "image"},
    {"kernel"},
    {"vm"},
    {"sandbox"},
    {"matrix", "vmpy", "bisect"},
    {"service"},
    {"mcpserver", "serve"},
    {"cli"},
    {"__init__", "__main__"},
]
# The package's own module holds the version (anyone may read it) and names the public API,
# imported on first use: it imports nothing itself.
ROOT = "qemubox"
FLOOR = {unit: n for n, floor in enumerate(FLOORS) for unit in floor}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The package (or top-level module) of ``qemubox.X...``: what FLOORS names."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every qemubox module ``path`` imports, at any depth (a lazy import counts)."""
    module = _module(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qemubox")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package
                base = module.rsplit(".", node.level - (path.name == "__init__.py"))[0]
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if not name.startswith("qemubox"):
                continue
            submodules = {f"{name}.{a.name}" for a in node.names} & modules
            found |= submodules or {name}  # `from pkg import module`: the module alone
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {m: {i for i in _imports(p, modules) if i in files and i != m} for m, p in files.items()}


def test_the_root_module_imports_nothing_of_qemubox():
    assert _graph()[ROOT] == set()


def test_every_package_has_a_floor():
    units = {_unit(m) for m in _graph()}
    assert units <= set(FLOOR), f"packages without a floor: {sorted(units - set(FLOOR))}"


def test_no_import_runs_up_or_sideways():
    wrong = [
        f"{m} -> {i}"
        for m, imported in _graph().items()
        for i in imported
        if i != ROOT and _unit(i) != _unit(m) and FLOOR[_unit(i)] >= FLOOR[_unit(m)]
    ]
    assert not wrong, "imports that run up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for i in sorted(graph[m]):
            if state.get(i) == 1:
                circles.append(" -> ".join([*trail[trail.index(i) :], i]))
            elif i not in state:
                visit(i, [*trail, i])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles:\n" + "\n".join(circles)


# --- the plan's fields --------------------------------------------------------------------------


def _plan() -> MachinePlan:
    kernel = KernelPlan("/k/vmlinux", "6.12.1", "x86_64", "/m", "/c", "d", True, "/k/boot")
    return MachinePlan(
        arch="x86_64",
        machine="microvm",
        accel="tcg",
        accel_note="",
        cpus=1,
        memory_mib=256,
        kernel=kernel,
        initrd="/i.cpio",
        features=("disks",),
        append="console=ttyS0",
        runtime_dir="/run/x",
        shares=(SharePlan("t", "/h", "/g", False, "mapped-xattr"),),
        disks=(DiskPlan("/d.img", 1 << 20, "/data", "qbxdisk0", False),),
        network="user",
        ports=(PortPlan(8080, 80),),
        run_as="nobody",
        root=RootPlan(
            "disk", "debian", "/b.img", "raw", "/o.qcow2", "9p", {"r": 1}, "oci:/l", {"u": 1}
        ),
        snapshot=SnapshotPlan("restore", "k", "/ram", "/state"),
        egress={"mode": "allow", "items": ["a.test"], "hosts": []},
        egress_log="/egress.log",
    )


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return (*value, "x")
    if isinstance(value, dict):
        return {**value, "changed": True}
    raise AssertionError(f"no way to change {value!r}")


def _leaves(plan: MachinePlan):
    """(dotted name, the plan with that one field changed) for every field, nested ones
    (a share's, a disk's) by their first element."""
    for f in fields(plan):
        value = getattr(plan, f.name)
        if f.name == "schema":
            continue
        if is_dataclass(value):
            for g in fields(value):
                inner = replace(value, **{g.name: _changed(getattr(value, g.name))})
                yield f"{f.name}.{g.name}", replace(plan, **{f.name: inner})
        elif isinstance(value, tuple) and value and is_dataclass(value[0]):
            for g in fields(value[0]):
                first = replace(value[0], **{g.name: _changed(getattr(value[0], g.name))})
                yield f"{f.name}.{g.name}", replace(plan, **{f.name: (first, *value[1:])})
        else:
            yield f.name, replace(plan, **{f.name: _changed(value)})


def test_every_plan_field_is_in_the_key_or_said_not_to_be():
    base = _plan()
    key = base.compat_key()
    for name, changed in _leaves(base):
        outside = name in OUTSIDE_KEY or name.split(".")[0] in OUTSIDE_KEY
        moves = changed.compat_key() != key
        assert moves != outside, (
            f"plan field {name}: "
            + ("in OUTSIDE_KEY, yet it changes compat_key" if outside else "")
            + ("" if outside else "neither in compat_key nor in OUTSIDE_KEY: decide")
        )


# The shape of a plan as this qemubox writes it. When a test below fails, a field was
# added, removed or retyped: decide whether it belongs in compat_key (see OUTSIDE_KEY),
# raise model.plan.SCHEMA (a plan on disk of the old shape is then refused in one line,
# not misread, unless model.plan.READS says the new shape only adds fields with defaults),
# and put the new fingerprint and schema here.
FINGERPRINT = (4, "a74849d9dc9ae678")


def _shape(cls) -> list:
    return [(f.name, str(f.type)) for f in fields(cls)]


def test_the_plan_shape_is_the_one_its_schema_names():
    shape = {
        c.__name__: _shape(c)
        for c in (MachinePlan, KernelPlan, SharePlan, DiskPlan, PortPlan, RootPlan, SnapshotPlan)
    }
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    assert (SCHEMA, digest) == FINGERPRINT, (
        "the machine plan changed shape: decide its fields for compat_key, raise SCHEMA, "
        f"and set FINGERPRINT to ({SCHEMA + 1}, {digest!r})"
    )


@pytest.mark.parametrize(
    ("change", "cannot"),
    [
        ({}, set()),
        ({"balloon": True}, {Capability.SNAPSHOT}),
        ({"ports": (PortPlan(0, 80),)}, {Capability.SNAPSHOT}),
        ({"disks": (DiskPlan("/d", 1 << 20, "/d", "s", True),)}, {Capability.POOL}),
        (
            {"shares": (SharePlan("t", "/h", "/g", True, "none"),)},
            {Capability.POOL, Capability.PAUSE},
        ),
        (
            {"shares": (SharePlan("t", "/h", "/g", True, "none", "virtiofs"),)},
            {Capability.SNAPSHOT, Capability.POOL, Capability.PAUSE},
        ),
        (
            {"root": RootPlan("disk", "debian", "/b", "raw", "/o")},
            {Capability.SNAPSHOT, Capability.POOL},
        ),
        (
            {"root": RootPlan("share", "host", "/", fs="9p")},
            {Capability.SNAPSHOT, Capability.POOL, Capability.PAUSE},
        ),
        ({"egress": {"mode": "deny", "items": ["a.test"], "hosts": []}}, {Capability.POOL}),
    ],
)
def test_capabilities_come_from_one_table(change, cannot):
    plain = replace(
        _plan(), shares=(), disks=(), ports=(), root=RootPlan(), snapshot=None, egress=None
    )
    plan = replace(plain, **change)
    assert {c for c in Capability if plan.cannot(c)} == cannot
    assert all(why for cap, _, why in plans.LIMITS)
