"""qemubox as an ordinary user: an account of its own (made here when the tests run as root,
as CI does; else the user running them), Debian's default PATH without /usr/sbin, and an
empty cache, state and runtime of its own. Everything that needs no root works: run with a
share, a disk and a network, egress rules, named sandboxes with pause and resume, snapshot-
restored starts, a pool, the host's root as the user in its directory; what needs root says
so in one line with the way around."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import BUILDS, STAND_IN_MAKE, Result, qemubox

pytestmark = pytest.mark.qemu

USER = "qemubox-test"
PATH = "/usr/local/bin:/usr/bin:/bin"  # Debian's for an ordinary user: no /usr/sbin


class Account:
    """Runs qemubox as the ordinary user, with a Python and a qemubox it can read."""

    def __init__(self, home: Path, python: str, pythonpath: str, uid: int, name: str) -> None:
        self.home, self.python, self.pythonpath = home, python, pythonpath
        self.uid, self.name = uid, name

    def __call__(
        self, *args: str, cwd: Path | None = None, timeout: float = 900, env: dict | None = None
    ) -> Result:
        more = env or {}
        env = {
            "PATH": PATH,
            "HOME": str(self.home),
            "PYTHONPATH": self.pythonpath,
            "QEMUBOX_CACHE_DIR": str(self.home / "cache"),
            "QEMUBOX_STATE_DIR": str(self.home / "state"),
            "LANG": "C.UTF-8",
            **more,
        }
        command = [self.python, "-m", "qemubox", *map(str, args)]
        if os.getuid() == 0:
            command = ["runuser", "-u", self.name, "--", "env", "-i", *_pairs(env), *command]
        else:
            command = ["env", "-i", *_pairs(env), *command]
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=cwd or self.home,
            timeout=timeout,
            check=False,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return Result(proc.returncode, proc.stdout, proc.stderr)


def _pairs(env: dict) -> list[str]:
    return [f"{k}={v}" for k, v in env.items()]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The ordinary user, with an empty cache; when the tests run as root, an account made
    for the test (removed after), with this qemubox and its libraries copied where it can
    read them, run by a Python it can run (Debian's, when ours is out of its reach)."""
    src = Path(__file__).parent.parent / "src"
    if os.getuid() != 0:
        home = tmp_path_factory.mktemp("ordinary-user")
        yield Account(home, sys.executable, str(src), os.getuid(), pwd.getpwuid(os.getuid())[0])
        return
    subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], check=True, capture_output=True)
    entry = pwd.getpwnam(USER)
    home = Path(entry.pw_dir)
    try:
        shared = home / "qemubox"
        shutil.copytree(src, shared / "src")
        shutil.copytree(sysconfig.get_paths()["purelib"], shared / "site")
        subprocess.run(["chown", "-R", f"{USER}:{USER}", str(home)], check=True)
        python = sys.executable
        reach = subprocess.run(["runuser", "-u", USER, "--", python, "-c", "pass"], check=False)
        if reach.returncode != 0:  # ours lives under root's home: Debian's, of our version
            python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
            assert Path(python).exists(), f"the ordinary user needs {python}"
        yield Account(home, python, f"{shared}/src:{shared}/site", entry.pw_uid, USER)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True, check=False)
        subprocess.run(["userdel", "-r", USER], capture_output=True, check=False)
        shutil.rmtree(f"/dev/shm/qemubox-{entry.pw_uid}", ignore_errors=True)  # its RAM files


def test_an_ordinary_user_runs_sandboxes_from_an_empty_cache(user):
    assert not (user.home / "cache").exists()
    r = user("run", "--", "echo", "ok")  # Debian's kernel fetched, agent and initramfs built
    assert r.code == 0 and r.out == "ok\n", r.err
    kvm = Path("/dev/kvm")
    closed = kvm.exists() and not kvm.stat().st_mode & 0o006
    if closed and kvm.stat().st_gid not in os.getgrouplist(user.name, user.uid):
        assert "no permission to use /dev/kvm (join the kvm group)" in r.err, r.err
    work = user.home / "work"
    r = user("run", "--", "true")  # and it starts from a snapshot now
    assert r.code == 0, r.err
    assert any((user.home / "cache").rglob("*")), "nothing cached"
    # A share (written through), a disk (its file system made with mkfs.ext4 from /usr/sbin,
    # off the PATH), a network with the host reachable.
    subprocess.run(_as(user, ["mkdir", "-p", str(work)]), check=True)
    script = (
        "echo from-guest > /w/made; df -P /d | tail -1 | cut -d' ' -f1; "
        "ping -c 1 -W 5 10.0.2.2 >/dev/null && echo pinged; id -u"
    )
    r = user(
        "run", "-v", f"{work}:/w", "--disk", "64M:/d", "--net", "user", "--",
        "sh", "-c", script,
    )  # fmt: skip
    assert r.code == 0, r.err
    assert r.out.split() == ["/dev/vda", "pinged", "0"], r.out
    assert (work / "made").read_text() == "from-guest\n"
    assert (work / "made").stat().st_uid == user.uid  # the user's own file on the host
    # Egress rules: the proxy and QEMU's shim, as the user.
    r = user("run", "--net", "allow=a.test", "--", "sh", "-c", "nslookup b.test || echo refused")
    assert r.code == 0 and "refused" in r.out, r.out + r.err
    # A named sandbox, paused and resumed with its processes and files in memory.
    assert user("create", "box", "--net", "user").code == 0
    assert user("exec", "box", "--", "sh", "-c", "echo kept > /tmp/f").code == 0
    r = user("pause", "box")
    assert r.code == 0, r.err
    r = user("start", "box")
    assert r.code == 0, r.err
    r = user("exec", "box", "--", "cat", "/tmp/f")
    assert r.code == 0 and r.out == "kept\n", r.err
    assert user("rm", "-f", "box").code == 0
    # A pool, whose machine a run then takes.
    r = user("pool", "start", "--size", "1", "--ttl", "60s")
    assert r.code == 0, r.err
    r = user("run", "--timings", "--", "echo", "pooled")
    assert r.code == 0 and r.out == "pooled\n" and "taken from the pool" in r.err, r.err
    assert user("pool", "stop", "--all").code == 0
    # A matrix (a cell per kernel and test, in sandboxes of their own).
    matrix = work / "m.toml"
    matrix.write_text(
        '[[kernel]]\nname = "d"\npath = "debian"\n'
        '[[test]]\nname = "t"\ncommand = ["sh", "-c", "echo 1..1; echo ok 1 - hello"]\n'
    )
    if os.getuid() == 0:
        os.chown(matrix, user.uid, -1)
    r = user("matrix", matrix, "--json", work / "m.json")
    assert r.code == 0, r.err
    (cell,) = json.loads((work / "m.json").read_text())
    assert cell["status"] == "pass" and "ok 1 - hello" in cell["stdout"], cell
    # The host's root, as the user, in its directory.
    r = user("run", "--image", "host", "--", "sh", "-c", "id -u; id -g; echo $HOME; pwd", cwd=work)
    assert r.code == 0, r.err
    entry = pwd.getpwuid(user.uid)
    assert r.out.split() == [str(user.uid), str(entry.pw_gid), entry.pw_dir, str(work)], r.out
    r = user("run", "--image", "host", "-u", "root", "--", "id", "-u")
    assert r.code == 0 and r.out == "0\n", r.err  # --user says otherwise
    # What needs root says so, with the way around.
    r = user("run", "--share-fs", "virtiofs", "-v", f"{work}:/w", "--", "true")
    assert r.code == 2 and "share it over 9p instead" in r.err and r.err.count("\n") == 1
    r = user("image", "build", "mine", "--packages", "hello")
    assert r.code == 2 and "needs root" in r.err and r.err.count("\n") == 1, r.err
    listed = json.loads(user("ls", "--json", "-a").out)
    assert listed == []


def _as(user: Account, command: list[str]) -> list[str]:
    return ["runuser", "-u", user.name, "--", *command] if os.getuid() == 0 else command


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="Debian is installed on the user's VM by root")
def test_an_ordinary_user_builds_a_kernel_and_boots_it_in_its_vm(user, debug_kernel):
    """`kernel build` (configured by the real make, as the user, in its own cache; the
    compile handed over by make's stand-in) and `vm run -k` with that build, as the user,
    on a VM of its own (Debian installed by root, as `vm install` says it must be)."""
    from qemubox.kernel.source import debian_source

    # Root's part: the suite's debug kernel (the vm fragment: what systemd needs), the 6.12
    # source in the user's cache, Debian on the user's VM.
    real = debug_kernel
    release = json.loads((real / "manifest.json").read_text())["version"]
    shared = user.home / "real"
    shutil.copytree(real, shared, symlinks=True)
    src = debian_source("6.12")
    mine = user.home / "cache" / "kernel-source"
    mine.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", str(src), str(mine / src.name)], check=True)
    (mine / "hashes.json").write_text((src.parent / "hashes.json").read_text())
    make = user.home / "make"
    make.write_text(STAND_IN_MAKE)
    make.chmod(0o755)
    config = user.home / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "vmpy.conf").write_text(f"[Paths]\nVMs = {user.home}/vms\nBuilds = {user.home}\n")
    root_env = {"XDG_CONFIG_HOME": str(config)}
    assert qemubox("vm", "create", "deb", "-m", "1G", "-s", "4G", env=root_env).code == 0
    r = qemubox("vm", "install", "deb", env=root_env, timeout=3000)
    assert r.code == 0, r.err[-3000:]
    # Everything in its home is the user's (the source's files stay root's, read-only).
    subprocess.run(["chown", "-R", "--no-dereference", f"{user.name}:", str(user.home / "vms"),
                    str(config), str(shared), str(make)], check=True)  # fmt: skip
    subprocess.run(["find", str(mine), "-type", "d", "-exec", "chown", f"{user.name}:", "{}",
                    "+"], check=True)  # fmt: skip
    # ... and its cache, which root made when this test runs first
    owned = [str(mine / "hashes.json"), str(mine), str(mine.parent)]
    subprocess.run(["chown", f"{user.name}:", *owned], check=True)

    env = {"XDG_CONFIG_HOME": str(config), "QEMUBOX_MAKE": str(make), "REAL": str(shared),
           "RELEASE": release, "LOG": str(user.home / "make.log")}  # fmt: skip
    out = user.home / "built"
    r = user("kernel", "build", *BUILDS["debug_kernel"], "-o", out, env=env, timeout=1200)
    assert r.code == 0, r.err[-2000:]
    assert out.owner() == user.name and (out / "vmlinuz").is_file()
    r = user("vm", "install", "deb", env=env)
    assert r.code == 2 and "needs root" in r.err and r.err.count("\n") == 1, r.err
    r = user("vm", "run", "deb", "-k", out, "-d", env=env)
    assert r.code == 0, r.err
    try:
        r = user("vm", "exec", "deb", "--wait", "900", "--", "uname", "-r", env=env, timeout=1000)
        assert (r.code, r.out) == (0, f"{release}\n"), r.err
    finally:
        r = user("vm", "stop", "deb", env=env)
    assert r.code == 0, r.err
