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
