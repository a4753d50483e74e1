import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import BUILDS


def _build_args(name: str, kunitconfig: Path) -> list[str]:
    return ["kernel", "build", *(a.format(kunitconfig=kunitconfig) for a in BUILDS[name])]


def _kunitconfig(tmp_path_factory) -> Path:
    from helpers import KUNITCONFIG

    path = tmp_path_factory.getbasetemp() / "suite.kunitconfig"
    if not path.exists():
        path.write_text(KUNITCONFIG)
    return path


def _built(name: str, tmp_path_factory) -> Path:
    """The kernel ``name`` installed in a directory of its own (built, or found built)."""
    from helpers import qemubox

    out = tmp_path_factory.mktemp(name)
    args = _build_args(name, _kunitconfig(tmp_path_factory))
    r = qemubox(*args, "-o", out, timeout=3000)
    assert r.code == 0, r.err[-3000:]
    return out


@pytest.fixture(scope="session")
def linux_history(tmp_path_factory):
    """The 6.12 source as a git repository (hard links to the extracted source: git replaces
    a file it checks out, never writes into it), with a .kunitconfig: base; a bad boot
    message; a broken build; the build fixed; a documentation change; a KUnit case made to
    fail (main). (tree, {name: commit}). The bisection's test and the KUnit run's share it,
    and with it the work directory of its KUnit configuration's builds."""
    from helpers import BAD_BOOT_MESSAGE, KUNITCONFIG, commit, git, rewrite
    from qemubox.kernel.source import debian_source

    tree = tmp_path_factory.mktemp("history") / "linux"
    subprocess.run(["cp", "-al", str(debian_source("6.12")), str(tree)], check=True)
    ignore = tree / ".gitignore"  # Debian's ignores every file at the top: not upstream's
    kept = ignore.read_text().split("# Debian packaging")[0]
    ignore.unlink()
    ignore.write_text(kept)
    (tree / ".kunitconfig").write_text(KUNITCONFIG)
    git(tree, "init", "-q", "-b", "main")
    git(tree, "add", "-A")
    commits = {"base": commit(tree, "base")}
    main_c = tree / "init" / "main.c"
    text = main_c.read_text()
    anchor = "\tsystem_state = SYSTEM_RUNNING;\n"
    assert text.count(anchor) == 1
    rewrite(main_c, text.replace(anchor, f'{anchor}\tpr_notice("{BAD_BOOT_MESSAGE}\\n");\n'))
    commits["bad"] = commit(tree, "init: print a bad boot message")
    version_c = tree / "init" / "version.c"
    original = version_c.read_text()
    rewrite(version_c, original + "\n#error qemubox-bisect: a broken build\n")
    commits["broken"] = commit(tree, "init: break the build")
    rewrite(version_c, original)
    commits["fixed"] = commit(tree, "init: fix the build")
    doc = tree / "Documentation" / "index.rst"
    rewrite(doc, doc.read_text() + "\n")
    commits["doc"] = commit(tree, "Documentation: a blank line")
    test = tree / "lib" / "list-test.c"
    text = test.read_text()
    line = "\tKUNIT_EXPECT_TRUE(test, list_empty_careful(&list1));\n"
    assert text.count(line) == 1
    rewrite(test, text.replace(line, line.replace("EXPECT_TRUE", "EXPECT_FALSE")))
    commits["kunit"] = commit(tree, "lib: a list test made to fail")
    return tree, commits


@pytest.fixture(scope="session")
def kernel(tmp_path_factory):
    """qemubox's minimal kernel, used by path."""
    return str(_built("kernel", tmp_path_factory) / "vmlinuz")


@pytest.fixture(scope="session")
def debug_kernel(tmp_path_factory):
    """A kernel of the debug profile (see BUILDS), installed: ``vmlinuz`` to boot, ``vmlinux``
    for debuggers, ``manifest.json`` and its modules."""
    return _built("debug_kernel", tmp_path_factory)


@pytest.fixture(scope="session")
def minimal_arm64(tmp_path_factory):
    return _built("minimal_arm64", tmp_path_factory)


@pytest.fixture(scope="session")
def riscv64_kernel(tmp_path_factory):
    return str(_built("riscv64_kernel", tmp_path_factory) / "vmlinuz")


def _needs(item) -> set[str]:
    """The kernels of BUILDS a test asks for: as fixtures, or lazily (``builds`` mark)."""
    lazy = {name for mark in item.iter_markers("builds") for name in mark.args}
    return (set(item.fixturenames) | lazy) & set(BUILDS)


def pytest_collection_modifyitems(session, config, items):
    order = list(BUILDS)
    rank: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        need = max((order.index(n) for n in _needs(item)), default=-1)
        rank[module] = max(rank.get(module, -1), need)
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])  # stable: files keep order


@pytest.fixture(scope="session", autouse=True)
def kernels_in_background(request, tmp_path_factory):
    """Build the kernels the selected tests need, one after the other, in the background
    (see BUILDS); stopped with the run."""
    wanted = [n for n in BUILDS if any(n in _needs(item) for item in request.session.items)]
    if not wanted:
        yield
        return
    kunitconfig = _kunitconfig(tmp_path_factory)
    log_path = tmp_path_factory.getbasetemp() / "kernels-in-background.log"
    commands = [
        [sys.executable, "-m", "qemubox", *_build_args(name, kunitconfig),
         "-o", str(tmp_path_factory.mktemp(f"background-{name}"))]
        for name in wanted
    ]  # fmt: skip
    env = dict(os.environ)  # as the run began (tests change theirs)
    lock = threading.Lock()
    stopped = False
    running: list[subprocess.Popen] = []

    def idle() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        # A session of its own is a scheduling group of its own where the kernel groups by
        # session (autogroup), and the idle class counts only within a group: the group's
        # share is lowered to the least too.
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text("19")

    def build_all() -> None:
        with open(log_path, "ab") as log:
            for command in commands:
                with lock:
                    if stopped:
                        return
                    proc = subprocess.Popen(
                        command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                        preexec_fn=idle, start_new_session=True,
                    )  # fmt: skip
                    running.append(proc)
                proc.wait()

    worker = threading.Thread(target=build_all, name="kernels-in-background", daemon=True)
    worker.start()
    yield
    with lock:
        stopped = True
        for proc in running:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
    worker.join(timeout=60)


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
