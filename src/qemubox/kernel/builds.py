"""Finished kernel builds in the cache: where they are, and which there are (read without
the builder's machinery, by every start that looks for qemubox's newest kernel)."""

from __future__ import annotations

from pathlib import Path

from qemubox.paths import cache_dir, read_json

BUILD_MARK = ".qemubox-build.json"  # a finished build's manifest, in its directory


def build_root() -> Path:
    path = cache_dir() / "kernel-build"
    path.mkdir(parents=True, exist_ok=True)
    return path


def list_builds() -> list[dict]:
    """Finished builds, newest first."""
    root = build_root()
    builds = [read_json(d / BUILD_MARK) for d in root.iterdir() if (d / BUILD_MARK).is_file()]
    return sorted(builds, key=lambda m: m.get("built_at", ""), reverse=True)
