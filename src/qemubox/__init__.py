"""qemubox: QEMU as a fast, scriptable sandbox for Linux kernels and untrusted commands."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qemubox")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
