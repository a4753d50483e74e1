import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def kernel(tmp_path_factory):
    """qemubox's minimal kernel (built once, cached), used by path."""
    from helpers import qemubox

    out = tmp_path_factory.mktemp("sandbox-kernel")
    r = qemubox("kernel", "build", "-o", out, timeout=3000)
    assert r.code == 0, r.err[-2000:]
    return str(out / "vmlinuz")


@pytest.fixture(scope="session")
def debug_kernel(tmp_path_factory):
    """A kernel of the debug profile (debug info, kallsyms): its build directory, with
    ``vmlinuz`` to boot and ``vmlinux`` for debuggers."""
    from helpers import qemubox

    out = tmp_path_factory.mktemp("debug-kernel")
    r = qemubox("kernel", "build", "--profile", "debug", "-o", out, timeout=3000)
    assert r.code == 0, r.err[-2000:]
    return out


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A state directory of the test's own (the CLI in subprocesses inherits it); named
    sandboxes left in it are removed."""
    from helpers import qemubox

    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("QEMUBOX_STATE_DIR", str(d))
    yield d
    for name in os.listdir(d / "sandboxes") if (d / "sandboxes").is_dir() else []:
        qemubox("rm", "-f", name)


@pytest.fixture(autouse=True)
def no_qemu_unless_marked(request, tmp_path_factory, monkeypatch):
    """A test of the fast selection (marked neither ``kernel`` nor ``qemu``) starts no
    QEMU: QEMU is found on PATH, and here it is a stand-in that leaves a trace and fails."""
    if any(request.node.get_closest_marker(m) for m in ("kernel", "qemu")):
        yield
        return
    shims = tmp_path_factory.mktemp("no-qemu")
    trace = shims / "started"
    from qemubox.arch import ARCHES

    for arch in ARCHES.values():
        shim = shims / arch.qemu_binary
        shim.write_text(f'#!/bin/sh\necho "$0 $*" >> {trace}\nexit 1\n')
        shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}:{os.environ['PATH']}")
    yield
    assert not trace.exists(), f"a test of the fast selection started QEMU: {trace.read_text()}"
