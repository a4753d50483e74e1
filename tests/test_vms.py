"""Persistent VMs for real: a Debian install booted with its own kernel and reached over
ssh; the same VM booted with a kernel built on the host whose module is loaded from the
9p-shared build; an aarch64 VM; stop, list, rm.

The install is cached by its inputs (the first run of this file takes a minute or two
more); every boot is a real one under this machine's accelerator."""

import json
import os
import re
import shlex
import time
from pathlib import Path

import pytest

from helpers import qemubox
from qemubox import paths

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]

BOOT = 900  # seconds for a Debian guest to boot far enough for ssh, under TCG on 2 cores

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="vm install needs root")


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    """A vmpy.conf of the module's own: VMs and Builds in a temporary directory; the cache
    is the usual one (installs and kernels are reused across runs)."""
    top = tmp_path_factory.mktemp("vms")
    (top / "config").mkdir()
    (top / "builds").mkdir()
    (top / "config/vmpy.conf").write_text(
        f"[Paths]\n# a test's own\nVMs = {top}/vms\nBuilds = {top}/builds\n"
    )
    env = {"XDG_CONFIG_HOME": str(top / "config"), "QEMUBOX_CACHE_DIR": str(paths.cache_dir())}
    yield top, env
    for name in os.listdir(top / "vms") if (top / "vms").is_dir() else []:
        qemubox("vm", "rm", "--force", name, env=env)


def vm(env, *args, **kw):
    return qemubox("vm", *args, env=env, **kw)


def console_log(top: Path, name: str) -> str:
    """What the detached VM's serial console has printed so far."""
    from qemubox.vmpy.layout import VmDir

    try:
        return VmDir(name, top / "vms" / name).console_log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_console(top: Path, name: str, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = console_log(top, name)
        if re.search(pattern, text):
            return text
        time.sleep(1)
    raise AssertionError(f"{pattern!r} not on {name}'s console:\n{console_log(top, name)[-3000:]}")


def test_dry_run_k_names_the_build_directory_exactly(where, kernel):
    """-k against a real kernel build directory (looked up under Builds): its vmlinux
    (qemubox builds have a PVH entry, and no bzImage), the whole directory over 9p,
    config.py's command line and every -a."""
    top, env = where
    build = Path(json.loads((Path(kernel).parent / "manifest.json").read_text())["work_dir"])
    (top / "builds" / "mine").symlink_to(build)
    assert vm(env, "create", "dry", "-s", "1G").code == 0
    r = vm(env, "run", "dry", "-k", "mine", "-a", "quiet", "-a", "x=1 2", "-n", "--accel", "tcg")
    assert r.code == 0, r.err
    args = shlex.split(r.out)
    assert args[args.index("-kernel") + 1] == str(build / "vmlinux")
    assert args[args.index("-virtfs") + 1] == (
        f"local,path={build},security_model=none,readonly=on,mount_tag=modules"
    )
    assert args[args.index("-append") + 1] == "root=/dev/vda1 console=ttyS0,115200 quiet x=1 2"
    # a relative -k is the caller's
    r = vm(env, "run", "dry", "-k", build.name, "-n", "--accel", "tcg", cwd=build.parent)
    assert r.code == 0 and f"-kernel {build}/vmlinux" in r.out
    # --gdb: a free port, and how to attach with the build's vmlinux
    r = vm(env, "run", "dry", "-k", str(build), "--gdb", "-n", "--accel", "tcg")
    port = re.search(r"-gdb tcp:127\.0\.0\.1:(\d+)", r.out).group(1)
    assert f"gdb {build}/vmlinux -ex 'target remote 127.0.0.1:{port}'" in r.err
    assert "nokaslr" in r.out
    assert not any((top / "vms/dry").glob("*.log"))  # a dry run starts nothing


@pytest.fixture(scope="module")
def debian(where):
    """VM "deb" with Debian installed (the install is cached by its inputs)."""
    top, env = where
    assert vm(env, "create", "deb", "-m", "1G", "-s", "4G").code == 0
    r = vm(env, "install", "deb", timeout=3000)
    assert r.code == 0, r.err[-3000:]
    assert "installed deb" in r.out
    return top, env


@needs_root
def test_installed_debian_boots_with_its_own_kernel_and_answers_ssh(debian):
    top, env = debian
    r = vm(env, "run", "deb", "-d")
    assert r.code == 0, r.err
    facts = vm(
        env, "exec", "deb", "--wait", str(BOOT), "--",
        "sh", "-c", "systemctl is-system-running --wait; "
        "id -un; hostname; sudo -n id -u; sudo -n passwd -S root; "
        "systemctl is-active ssh qemubox-modules; uname -r; "
        "ls /lib/modules/$(uname -r)/kernel >/dev/null && echo own-modules",
        timeout=BOOT + 60,
    )  # fmt: skip
    assert facts.code == 0, facts.err
    system, *lines = facts.out.splitlines()
    assert system == "running"  # booted, no unit failed
    assert lines[:3] == ["vmuser", "deb", "0"]
    assert lines[3].startswith("root L ")  # root's password is locked
    assert lines[4:6] == ["active", "active"]
    assert lines[6].endswith("-amd64") and lines[7] == "own-modules"  # Debian's kernel
    # the command's real exit status, its words kept as they are, through the guest agent
    # (vm install puts it in) or ssh alike, as the VM's user
    for via in ("agent", "ssh"):
        assert vm(env, "exec", "deb", "--via", via, "--", "sh", "-c", "exit 7").code == 7
        r = vm(env, "exec", "deb", "--via", via, "--", "printf", "%s|", "a b", "$HOME", "'")
        assert r.out == "a b|$HOME|'|"
        r = vm(env, "exec", "deb", "--via", via, "--", "sh", "-c", "id -un; wc -c", stdin="12345")
        assert (r.code, r.out.split()) == (0, ["vmuser", "5"]), r.err
        r = vm(env, "exec", "deb", "--via", via, "--", "no-such-command")
        assert r.code == 127, (via, r.code, r.err)
    # ssh: the command goes through the guest's shell, as ssh's does
    r = vm(env, "ssh", "deb", "--", "echo $((40 + 2)) $USER", timeout=60)
    assert (r.code, r.out) == (0, "42 vmuser\n"), r.err
    # autologin on the serial console, as vmuser
    wait_console(top, "deb", r"vmuser@deb:~\$", 60)
    r = vm(env, "console", "deb", stdin="echo console-$((6*7))\n", timeout=60)
    assert r.code == 0 and "console-42" in r.out
    (row,) = [x for x in json.loads(vm(env, "list", "--json").out) if x["name"] == "deb"]
    assert row["running"] and row["mode"] == "detached" and row["installed"]
    assert row["disk_size"] == 4 << 30 and 300 << 20 < row["disk_used"] < 3 << 30
    # a running VM is not removed, nor started twice, nor installed over
    r = vm(env, "rm", "deb")
    assert r.code == 2 and "is running" in r.err
    r = vm(env, "run", "deb", "-d")
    assert r.code == 2 and "already running" in r.err
    r = vm(env, "stop", "deb")
    assert r.code == 0 and "powered off" in r.out, r.out + r.err
    assert not json.loads(vm(env, "list", "--json").out)[0]["running"]


@needs_root
def test_a_host_built_kernel_loads_its_module_over_9p(debian, debug_kernel):
    """The seed's killer feature: the VM boots a kernel from the host's build directory,
    and modprobe finds the module in that directory, shared read-only over 9p (the suite's
    debug kernel: the vm fragment, and iso9660 as a module)."""
    top, env = debian
    installed = debug_kernel
    manifest = json.loads((installed / "manifest.json").read_text())
    release = manifest["version"]
    for build in (manifest["work_dir"], str(installed)):  # a build tree; an install dir
        r = vm(env, "run", "deb", "-k", build, "-d")
        assert r.code == 0, r.err
        check = vm(
            env, "exec", "deb", "--wait", str(BOOT), "--",
            "sh", "-c",
            "systemctl is-system-running --wait; systemctl --failed --plain --no-legend; "
            "uname -r; sudo -n modprobe isofs && grep -w iso9660 /proc/filesystems; "
            f"findmnt -n -o FSTYPE,OPTIONS /lib/modules/{release}/build; "
            "sudo -n systemctl reload qemubox-modules && echo reloaded; "
            "sudo -n systemctl stop qemubox-modules; "
            f"mountpoint -q /lib/modules/{release} || echo unmounted",
            timeout=BOOT + 60,
        )  # fmt: skip
        system, *out = check.out.splitlines()
        assert check.code == 0, (check.out, check.err, console_log(top, "deb")[-3000:])
        assert system == "running", check.out  # booted, no unit failed
        assert out[0] == release
        assert out[1].split() == ["iso9660"]
        assert out[2].startswith("9p ") and "ro" in out[2].split()[1].split(",")
        assert out[3:] == ["reloaded", "unmounted"]
        r = vm(env, "stop", "deb")  # the vm fragment has the power button
        assert r.code == 0 and "powered off" in r.out, r.out + r.err


@needs_root
def test_install_refuses_a_disk_with_data_and_keeps_it_with_force(debian):
    top, env = debian
    r = vm(env, "install", "deb")
    assert r.code == 2 and "already holds data" in r.err
    before = (top / "vms/deb/deb.qcow2").stat()
    r = vm(env, "install", "deb", "--force", timeout=3000)  # cached: a copy
    assert r.code == 0, r.err
    backup = top / "vms/deb/deb.qcow2.bak"
    assert backup.stat().st_ino == before.st_ino and "kept the old disk" in r.err
    backup.unlink()


@needs_root
def test_install_script_edited_and_failing(debian, tmp_path):
    """-e writes the script, --script runs it (the same text: the cached install); a script
    that fails leaves the disk alone and says where the script and its log are."""
    top, env = debian
    script = top / "vms/deb/install.sh"
    script.unlink(missing_ok=True)
    assert vm(env, "install", "deb", "-e").code == 0
    r = vm(env, "install", "deb", "--script", str(script), "--force", timeout=3000)
    assert r.code == 0, r.err
    record = json.loads((top / "vms/deb/installed.json").read_text())
    assert (record["script"], record["user"], record["agent"]) == ("edited", "vmuser", True)
    (top / "vms/deb/deb.qcow2.bak").unlink()
    disk = (top / "vms/deb/deb.qcow2").stat()
    bad = tmp_path / "bad.sh"
    bad.write_text("echo '### 1/1 trying'\necho 'no such mirror' >&2\nexit 3\n")
    r = vm(env, "install", "deb", "--script", str(bad), "--force")
    assert r.code != 0
    last = r.err.strip().splitlines()[-1]
    assert last.startswith("qemubox: error: bash failed (exit 3)")
    assert last.endswith(f"; the script is {script}") and "no such mirror" in r.err
    assert script.read_text() == bad.read_text()  # at hand to mend; the old one kept
    assert script.with_name("install.sh.old").is_file()
    assert (top / "vms/deb/deb.qcow2").stat().st_ino == disk.st_ino
    assert not (top / "vms/deb/deb.qcow2.bak").exists()


def test_aarch64_vm_boots_a_host_built_arm64_kernel(where, minimal_arm64, tmp_path):
    top, env = where
    out = minimal_arm64
    assert vm(env, "create", "arm", "--arch", "aarch64", "-m", "512M", "-s", "1G").code == 0
    assert "qemu_arch = 'aarch64'" in (top / "vms/arm/config.py").read_text()
    r = vm(env, "run", "arm", "-k", str(out), "-n")
    args = shlex.split(r.out)
    assert args[0] == "qemu-system-aarch64" and args[args.index("-machine") + 1] == "virt"
    assert args[args.index("-cpu") + 1] == "max"
    assert "console=ttyAMA0,115200" in args[args.index("-append") + 1]
    r = vm(env, "run", "arm", "-k", str(out), "-d")
    assert r.code == 0, r.err
    # its blank disk has no root file system: the kernel boots, then says so
    text = wait_console(top, "arm", r"VFS: Unable to mount root fs|Kernel panic", 300)
    assert "Linux version" in text and "Machine model: linux,dummy-virt" in text
    r = vm(env, "run", "arm", "-k", str(out), "-d")
    assert r.code == 2 and "already running" in r.err
    r = vm(env, "stop", "arm", "--timeout", "3")  # a panicked kernel ignores the button
    assert r.code == 0 and re.search(r"powered off|killed", r.out)
    # in the foreground the console is this process's output; options after -- are QEMU's
    r = vm(env, "run", "arm", "-k", str(out), "-a", "panic=-1", "--", "-no-reboot", timeout=300)
    assert r.code == 0, r.err
    assert "Linux version" in r.out and "Kernel panic" in r.out
    r = vm(env, "run", "arm", "-k", str(tmp_path), "-n")  # a directory that is no build
    assert r.code == 2 and "neither a kernel build directory" in r.err
    r = vm(env, "stop", "arm")  # not running any more
    assert r.code == 2 and "is not running" in r.err
    assert vm(env, "rm", "arm").code == 0
    assert not (top / "vms/arm").exists()
