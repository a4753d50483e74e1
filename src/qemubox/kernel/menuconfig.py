"""``qemubox kernel menuconfig``: interactive configuration, kept as a fragment."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from qemubox import arch as arches
from qemubox.errors import ToolError
from qemubox.kconfig.engine import apply_fragments, read_config
from qemubox.kconfig.explain import explain_mismatches
from qemubox.kconfig.fragment import Assignment, Location
from qemubox.kconfig.merge import merge
from qemubox.kconfig.verify import verify
from qemubox.kernel.build import BuildRequest, request_fragments, resolve_source
from qemubox.kernel.builds import build_root
from qemubox.linux.tree import KernelTree
from qemubox.paths import write_keeping_old


@dataclass
class MenuconfigOutcome:
    changed: dict[str, str]
    mismatch_lines: list[str] = field(default_factory=list)
    backup: Path | None = None  # the previous fragment, when one was replaced


def config_changes(before: dict[str, str], after: dict[str, str]) -> dict[str, str]:
    """Options whose value differs (an option that disappeared counts as n)."""
    changes = {name: value for name, value in after.items() if before.get(name) != value}
    for name in before:
        if name not in after and before[name] != "n":
            changes[name] = "n"
    return changes


def menuconfig(req: BuildRequest, save: Path) -> MenuconfigOutcome:
    arch = arches.normalize(req.arch)
    base, merged, _ = request_fragments(req, arch)
    source = resolve_source(req.kernel_version, req.source, req.sha256)
    tree = KernelTree.open(
        source.path, build_root() / f"{source.key}-{arch}-kconfig", arches.get(arch).karch
    )
    apply_fragments(tree, merged, base)
    before = read_config(tree.config_path)
    proc = subprocess.run(tree.make_args(["menuconfig"]), env=os.environ, check=False)
    if proc.returncode != 0:
        raise ToolError(f"make menuconfig failed (exit {proc.returncode})")
    after = read_config(tree.config_path)
    changes = config_changes(before, after)
    outcome = MenuconfigOutcome(changes)
    if changes:
        where = Location("menuconfig", 0)
        text = merge(Assignment(n, v, where) for n, v in sorted(changes.items())).text()
        outcome.backup = write_keeping_old(
            save, "# Changes made with qemubox kernel menuconfig\n" + text
        )
    mismatches = verify(merged, after)
    if mismatches:
        reasons = explain_mismatches(tree, tree.config_path, mismatches)
        for m in mismatches:
            outcome.mismatch_lines.append(str(m))
            outcome.mismatch_lines += [f"    {r}" for r in reasons.get(m.name, [])]
    return outcome
