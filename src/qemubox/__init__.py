"""qemubox: QEMU as a fast, scriptable sandbox for Linux kernels and untrusted commands."""

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

# The sandbox API, imported on first use so that the command line starts fast.
_LAZY = {
    "Session": "qemubox.sandbox.spec",
    "FSShare": "qemubox.sandbox.spec",
    "Disk": "qemubox.sandbox.spec",
    "MachinePlan": "qemubox.model.plan",
    "Sandbox": "qemubox.sandbox.api",
    "Pool": "qemubox.sandbox.pool",
    "ExecResult": "qemubox.sandbox.sandbox",
    "SandboxError": "qemubox.errors",
    "KernelPanic": "qemubox.errors",
    "BootError": "qemubox.errors",
    "VMDied": "qemubox.errors",
    "KernelError": "qemubox.errors",
    "ProtocolViolation": "qemubox.errors",
    "BusyError": "qemubox.errors",
    "AgentTimeout": "qemubox.errors",
    "GuestError": "qemubox.errors",
    "InputError": "qemubox.errors",
    "QemuboxError": "qemubox.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qemubox' has no attribute {name!r}")
