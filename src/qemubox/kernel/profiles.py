"""Kernel profiles: the one table of what ``kernel build --profile``, matrix files and the
service offer. Pure data, light to import (the CLI's choices are read from it)."""

from __future__ import annotations

DEFAULT = "minimal"

# profile: (base config, shipped fragments applied on top of it)
PROFILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "minimal": ("tinyconfig", ("sandbox",)),
    "default": ("defconfig", ("sandbox",)),
    "small": ("tinyconfig", ("sandbox", "small")),
    "fastboot": ("tinyconfig", ("sandbox", "fastboot")),
    "debug": ("tinyconfig", ("sandbox", "debug")),
}
