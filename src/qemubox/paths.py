"""Where qemubox keeps its files."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """The user cache directory (``QEMUBOX_CACHE_DIR`` overrides it)."""
    override = os.environ.get("QEMUBOX_CACHE_DIR")
    path = Path(override) if override else Path(platformdirs.user_cache_dir("qemubox"))
    path.mkdir(parents=True, exist_ok=True)
    return path
