"""Explanations for verification mismatches, computed from the kernel's Kconfig files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qemubox.errors import ToolError, last_line
from qemubox.kconfig.verify import Mismatch
from qemubox.linux.tree import KernelTree


def explain_mismatches(
    tree: KernelTree, config: Path, mismatches: Sequence[Mismatch]
) -> dict[str, list[str]]:
    """For each mismatch, the reasons (one line each) why the option did not stick."""
    if not mismatches:
        return {}
    request = {
        "kconfig": str(tree.src / "Kconfig"),
        "config": str(Path(config).resolve()),
        "arch": tree.arch,
        "items": [{"name": m.name, "wanted": m.wanted} for m in mismatches],
    }
    # Kconfig's compiler probes write scratch files into the current directory.
    with tempfile.TemporaryDirectory(prefix="qemubox-explain-") as scratch:
        proc = subprocess.run(
            [sys.executable, "-m", "qemubox.kconfig.explain_worker"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            cwd=scratch,
            env={**os.environ, **tree.kconfig_env()},
            check=False,
        )
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        last = last_line(proc.stderr)
        raise ToolError(f"cannot explain the mismatches: {last}") from None
    if "error" in answer:
        raise ToolError(answer["error"])
    return answer["reasons"]
