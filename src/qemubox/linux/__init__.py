"""A Linux source tree and its make: below both kconfig/ and kernel/."""
