"""Persistent VMs without booting: vmpy.conf, config.py, the QEMU command, the install
script, and the command line's refusals."""

import json
import os
import shlex
import struct
import subprocess
from pathlib import Path

import pytest

from helpers import qemubox
from qemubox import arch as arches
from qemubox.errors import InputError
from qemubox.vmpy import conf, install
from qemubox.vmpy import config as vmconfig
from qemubox.vmpy.command import RunPlan, detached, qemu_command
from qemubox.vmpy.kernel import HostKernel, config_arch, find_build, host_kernel

X86 = arches.get("x86_64")
ARM = arches.get("arm64")

# --- vmpy.conf ----------------------------------------------------------------------------


def test_conf_defaults_and_keys():
    p = conf.parse("", Path("/c/vmpy.conf"), "/home/u")
    assert (p.vms, p.isos, p.builds) == (Path("/home/u/vms"), Path("/home/u/vms/iso"), None)
    text = "# mine\n[Paths]\nvms = ~/v\n; builds\nBUILDS: /b\n"
    p = conf.parse(text, Path("/c/vmpy.conf"), "/home/u")
    assert (p.vms, p.isos, p.builds) == (Path("/home/u/v"), Path("/home/u/v/iso"), Path("/b"))
    p = conf.parse("[Paths]\nISOs=/isos\n", Path("/c"), "/h")
    assert p.isos == Path("/isos")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[Paths]\nVMs=vms\n", "/c/vmpy.conf:2: VMs=vms: a relative path"),
        ("[Paths]\n\nColour=/x\n", "/c/vmpy.conf:3: unknown key 'Colour' in [Paths]"),
        ("[Other]\n", "/c/vmpy.conf:1: unknown section [Other]"),
        ("VMs=/x\n", "/c/vmpy.conf:1: VMs is outside any section"),
        ("[Paths]\nVMs\n", "/c/vmpy.conf:2: expected KEY=VALUE"),
        ("[Paths]\nBuilds=\n", "/c/vmpy.conf:2: Builds is empty"),
        ("[Paths\n", "/c/vmpy.conf:1: a section header must end with ']'"),
    ],
)
def test_conf_errors_name_file_and_line(text, message):
    with pytest.raises(InputError) as err:
        conf.parse(text, Path("/c/vmpy.conf"), "/h")
    assert str(err.value).startswith(message)


def test_conf_file_location():
    assert conf.config_file({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == Path("/x/vmpy.conf")
    assert conf.config_file({"HOME": "/h"}) == Path("/h/.config/vmpy.conf")


# --- config.py ----------------------------------------------------------------------------


def test_rendered_config_loads(tmp_path):
    path = tmp_path / "config.py"
    path.write_text(vmconfig.render("box", 3, "1536M", X86, 40022))
    cfg = vmconfig.load(path)
    assert (cfg.cpus(), cfg.memory_bytes(), cfg.arch, cfg.ssh_port) == (3, 1536 << 20, X86, 40022)
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22" in cfg.qemu_options
    drive = cfg.option("-drive")
    assert drive.startswith(f"file={tmp_path / 'box.qcow2'},format=qcow2,if=virtio")
    assert cfg.kernel_cmdline == ("root=/dev/vda1", "console=ttyS0,115200")
    path.write_text(vmconfig.render("a", 1, "1G", ARM, 1))
    cfg = vmconfig.load(path)
    assert (cfg.arch, cfg.kernel_cmdline[1]) == (ARM, "console=ttyAMA0,115200")


def test_config_path_with_a_comma_is_escaped(tmp_path):
    d = tmp_path / "a,b"
    d.mkdir()
    (d / "config.py").write_text(vmconfig.render("v", 1, "1G", X86, 2222))
    assert vmconfig.load(d / "config.py").option("-drive").startswith(f"file={tmp_path}/a,,b/")


@pytest.mark.parametrize(
    "text, message",
    [
        ("qemu_options = [\n", ":1: syntax error: '[' was never closed"),
        ("x = 1\nqemu_options = [1 / 0]\nkernel_cmdline = []\n", ":2: ZeroDivisionError"),
        ("qemu_options = []\n", "must define qemu_options and kernel_cmdline"),
        ("qemu_options = ['-m', 2]\nkernel_cmdline = []\n", "qemu_options must be a list of"),
        ("qemu_options = []\nkernel_cmdline = []\nqemu_arch = 'mips'\n", "qemu_arch: unknown"),
        ("qemu_options = []\nkernel_cmdline = []\nssh_port = 'x'\n", "ssh_port must be a port"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path, text, message):
    path = tmp_path / "config.py"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        vmconfig.load(path)
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)


def test_config_may_hold_logic(tmp_path):
    path = tmp_path / "config.py"
    path.write_text(
        "import os\nmem = '1G' if os.cpu_count() else '2G'\n"
        "qemu_options = ['-m', mem, '-smp', 'cpus=4,sockets=1']\nkernel_cmdline = ['ro']\n"
        "qemu_arch = 'aarch64'\n"
    )
    cfg = vmconfig.load(path)
    assert (cfg.memory_bytes(), cfg.cpus(), cfg.arch.name, cfg.ssh_port) == (
        1 << 30,
        4,
        "arm64",
        None,
    )


# --- the QEMU command -------------------------------------------------------------------


def _cfg(options=("-m", "1G", "-nographic", "-serial", "mon:stdio"), cmdline=("root=/dev/vda1",)):
    return vmconfig.VmConfig(tuple(options), tuple(cmdline), X86, 2222)


def _kernel(tmp_path):
    return HostKernel(
        tmp_path, tmp_path / "bzImage", tmp_path / "b,uild", tmp_path / "vmlinux", "x86_64"
    )


def test_command_adds_machine_accel_cpu_only_when_missing():
    args = qemu_command(RunPlan(_cfg(), accel="tcg"))
    assert args[:6] == ["qemu-system-x86_64", "-m", "1G", "-nographic", "-serial", "mon:stdio"]
    assert args[6:12] == ["-machine", "q35", "-accel", "tcg", "-cpu", "max"]
    own = _cfg(("-M", "pc,accel=kvm", "-cpu", "kvm64"))
    args = qemu_command(RunPlan(own, accel="tcg", extra=("-S",)))
    assert "-accel" not in args and "-machine" not in args and args.count("-cpu") == 1
    assert args[-1] == "-S"
    args = qemu_command(RunPlan(_cfg(("-enable-kvm",)), accel="kvm"))
    assert "-accel" not in args and args[args.index("-cpu") + 1] == "host"


def test_command_with_a_host_kernel(tmp_path):
    plan = RunPlan(_cfg(), kernel=_kernel(tmp_path), append=("quiet", "a=b c"), accel="tcg")
    args = qemu_command(plan)
    assert args[args.index("-kernel") + 1] == str(tmp_path / "bzImage")
    virtfs = args[args.index("-virtfs") + 1]
    assert virtfs == (
        f"local,path={tmp_path}/b,,uild,security_model=none,readonly=on,mount_tag=modules"
    )
    assert args[args.index("-append") + 1] == "root=/dev/vda1 quiet a=b c"
    # -append given after -- (or in config.py) wins
    args = qemu_command(RunPlan(_cfg(), kernel=_kernel(tmp_path), extra=("-append", "x")))
    assert args.count("-append") == 1 and args[-2:] == ["-append", "x"]


def test_command_without_a_kernel_has_no_append_and_firmware_for_arm(tmp_path):
    args = qemu_command(RunPlan(_cfg()))
    assert "-append" not in args and "-kernel" not in args and "-virtfs" not in args
    arm = vmconfig.VmConfig(("-m", "1G"), ("console=ttyAMA0",), ARM, None)
    args = qemu_command(RunPlan(arm, firmware=tmp_path / "fw.fd"))
    assert args[0] == "qemu-system-aarch64"
    assert args[args.index("-machine") + 1] == "virt" and args[args.index("-bios") + 1].endswith(
        "fw.fd"
    )


def test_command_gdb_key_monitor(tmp_path):
    plan = RunPlan(
        _cfg(),
        kernel=_kernel(tmp_path),
        gdb_port=4321,
        qmp=tmp_path / "q.sock",
        pidfile=tmp_path / "pid",
        ssh_key=tmp_path / "k,ey.pub",
        name="box",
    )
    args = qemu_command(plan)
    assert args[args.index("-gdb") + 1] == "tcp:127.0.0.1:4321"
    assert args[args.index("-append") + 1].endswith(" nokaslr")
    assert args[args.index("-qmp") + 1] == f"unix:{tmp_path}/q.sock,server=on,wait=off"
    assert args[args.index("-fw_cfg") + 1] == (
        f"name=opt/qemubox/authorized_keys,file={tmp_path}/k,,ey.pub"
    )
    assert args[args.index("-name") + 1] == "box"


def test_detached_moves_the_console_to_a_socket(tmp_path):
    options = ("-nodefaults", "-nographic", "-serial", "mon:stdio", "-m", "1G")
    out = detached(options, tmp_path / "c.sock", tmp_path / "log")
    assert out == (
        "-chardev",
        f"socket,id=console,path={tmp_path}/c.sock,server=on,wait=off,"
        f"logfile={tmp_path}/log,logappend=on",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "chardev:console",
        "-m",
        "1G",
    )
    # a config without a console on the terminal keeps its own
    assert detached(("-serial", "file:/x"), tmp_path / "c", None) == ("-serial", "file:/x")


# --- -k ------------------------------------------------------------------------------------


def test_config_arch():
    assert config_arch("CONFIG_A=y\nCONFIG_X86_64=y\n") == "x86_64"
    assert config_arch("CONFIG_ARM64=y\n") == "arm64"
    assert config_arch("CONFIG_RISCV=y\n") == "riscv64"
    assert config_arch("CONFIG_X86_32=y\n") == "i386"
    assert config_arch("CONFIG_SPARC=y\n") is None


def test_find_build_looks_in_builds_first(tmp_path):
    builds, cwd = tmp_path / "builds", tmp_path / "cwd"
    (builds / "linux").mkdir(parents=True)
    (cwd / "linux").mkdir(parents=True)
    (cwd / "other").mkdir()
    assert find_build("linux", builds, cwd) == builds / "linux"
    assert find_build("./linux", builds, cwd) == cwd / "linux"
    assert find_build("other", builds, cwd) == cwd / "other"
    assert find_build("linux", None, cwd) == cwd / "linux"
    with pytest.raises(InputError, match=f"-k nope: no kernel build directory at {builds}/nope or"):
        find_build("nope", builds, cwd)


def test_host_kernel_refusals(tmp_path):
    with pytest.raises(InputError, match="neither a kernel build directory"):
        host_kernel(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="not a qemubox kernel manifest"):
        host_kernel(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": "6.1", "arch": "x86_64"}))
    with pytest.raises(InputError, match=r"no kernel image vmlinuz-6\.1"):
        host_kernel(tmp_path)
    (tmp_path / "vmlinuz-6.1").write_text("")
    (tmp_path / "lib/modules/6.1").mkdir(parents=True)
    k = host_kernel(tmp_path)
    assert (k.image, k.modules, k.vmlinux, k.arch) == (
        tmp_path / "vmlinuz-6.1",
        tmp_path / "lib/modules/6.1",
        None,
        "x86_64",
    )


def test_a_build_tree_boots_its_pvh_vmlinux(tmp_path):
    """An x86_64 tree whose vmlinux has a PVH entry boots that (make is not asked); one
    without boots what ``make image_name`` names."""
    from test_pvh import vmlinux

    (tmp_path / ".config").write_text("CONFIG_X86_64=y\nCONFIG_PVH=y\n")
    (tmp_path / "Makefile").write_text("image_name:\n\t@echo arch/x86/boot/bzImage\n")
    (tmp_path / "vmlinux").write_bytes(vmlinux())
    k = host_kernel(tmp_path)
    assert (k.image, k.vmlinux, k.modules, k.arch) == (
        tmp_path / "vmlinux",
        tmp_path / "vmlinux",
        tmp_path,
        "x86_64",
    )
    (tmp_path / "vmlinux").write_bytes(vmlinux(pvh_entry=False) + b"\0" * 8)
    (tmp_path / "arch/x86/boot").mkdir(parents=True)
    (tmp_path / "arch/x86/boot/bzImage").write_bytes(b"")
    k = host_kernel(tmp_path)
    assert (k.image, k.vmlinux) == (tmp_path / "arch/x86/boot/bzImage", tmp_path / "vmlinux")


# --- the install script --------------------------------------------------------------------


def _spec(**kw):
    args = dict(
        name="My_VM",
        size=4 << 30,
        arch=X86,
        release="bookworm",
        mirror="http://deb.example/debian/",
        user="vmuser",
        hostname=None,
        packages="",
        timezone="Etc/UTC",
        locale="C.UTF-8",
    )
    return install.make_spec(**(args | kw))


def test_install_spec_defaults():
    spec = _spec()
    assert (spec.hostname, spec.mirror, spec.arch, spec.console) == (
        "my-vm",
        "http://deb.example/debian",
        "amd64",
        "ttyS0",
    )
    assert "linux-image-amd64" in spec.packages and "openssh-server" in spec.packages
    assert "locales" not in spec.packages
    spec = _spec(locale="en_US.UTF-8", packages="gdb,strace")
    assert {"locales", "gdb", "strace"} <= set(spec.packages)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"user": "root"}, "--user 'root'"),
        ({"user": "Bad User"}, "--user 'Bad User'"),
        ({"hostname": "-x"}, "--hostname '-x'"),
        ({"timezone": "../etc/passwd"}, "--timezone"),
        ({"locale": "en_US"}, "--locale 'en_US'"),
        ({"release": "Book worm"}, "--release"),
        ({"mirror": "deb.example"}, "--mirror"),
        ({"packages": "ok,Bad!"}, "invalid package name 'Bad!'"),
        ({"arch": ARM}, "vm install makes x86_64 systems"),
        ({"size": 1 << 20}, "too small to install on"),
    ],
)
def test_install_spec_refusals(change, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        spec = _spec(**change)
        install.render(spec, None, "/a")


def test_mbr_entry():
    entry = install.mbr_entry(4 << 30)
    boot, _, kind, _, start, count = struct.unpack("<B3sB3sII", entry)
    assert (boot, kind, start, count) == (0x80, 0x83, 2048, (4 << 30) // 512 - 2048)


def test_install_script_quotes_values_and_parses(tmp_path):
    spec = _spec(packages="gdb")
    script = install.render(spec, "/cache/debs dir", "/a")
    head = script.split("set -euo pipefail")[0]
    assert "hostname=my-vm\n" in head and "debs='/cache/debs dir'\n" in head
    assert f"size_bytes={4 << 30}\n" in head
    for unit in ("qemubox-modules.service", "qemubox-keys.service", "80-qemubox.network"):
        assert unit in script
    path = tmp_path / "install.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # the values block alone, run by a shell, gives back what was asked
    values = subprocess.run(
        ["bash", "-c", head + 'printf "%s|" "$packages" "$mirror" "$mbr_entry"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("|")
    assert values[0] == ",".join(spec.packages) and values[1] == spec.mirror
    assert values[2] == "".join(f"\\x{b:02x}" for b in install.mbr_entry(spec.size))
    assert install.script_key(script) == install.script_key(
        install.render(spec, "/cache/debs dir", "/a")
    )
    assert install.script_key(script) != install.script_key(install.render(_spec(), "/x", "/a"))


def test_the_modules_mounter_is_valid_shell(tmp_path):
    from qemubox.vmpy import guestfiles

    for text in (guestfiles.MODULES_SCRIPT, guestfiles.KEYS_SCRIPT):
        path = tmp_path / "s.sh"
        path.write_text(text)
        assert subprocess.run(["sh", "-n", str(path)]).returncode == 0


# --- the command line ----------------------------------------------------------------------


@pytest.fixture
def home(tmp_path):
    """A home of the test's own: ~/.config/vmpy.conf absent, so VMs go to ~/vms."""
    h = tmp_path / "home"
    h.mkdir()
    return {"HOME": str(h), "XDG_CONFIG_HOME": str(h / ".config")}


def test_create_list_refuse_force_rm(home, tmp_path):
    vms = Path(home["HOME"]) / "vms"
    r = qemubox("vm", "create", "box", "-c", "3", "-m", "1G", "-s", "2G", env=home)
    assert r.code == 0, r.err
    assert sorted(os.listdir(vms / "box")) == [
        "box.qcow2",
        "config.py",
        "id_ed25519",
        "id_ed25519.pub",
    ]
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(vms / "box/box.qcow2")],
            capture_output=True,
            text=True,
        ).stdout
    )
    assert (info["format"], info["virtual-size"]) == ("qcow2", 2 << 30)
    r = qemubox("vm", "list", "--json", env=home)
    (row,) = json.loads(r.out)
    assert (row["name"], row["cpus"], row["memory"], row["disk_size"], row["running"]) == (
        "box",
        3,
        1 << 30,
        2 << 30,
        False,
    )
    port = row["ssh_port"]
    # a second VM gets another ssh port
    assert qemubox("vm", "create", "two", env=home).code == 0
    ports = {r["ssh_port"] for r in json.loads(qemubox("vm", "list", "--json", env=home).out)}
    assert len(ports) == 2 and port in ports
    # never overwritten without --force; with it, the old disk and config are kept
    (vms / "box/box.qcow2").write_bytes(b"precious")
    r = qemubox("vm", "create", "box", env=home)
    assert r.code == 2 and "exists" in r.err and (vms / "box/box.qcow2").read_bytes() == b"precious"
    r = qemubox("vm", "create", "box", "--force", env=home)
    assert r.code == 0, r.err
    assert (vms / "box/box.qcow2.bak").read_bytes() == b"precious"
    assert (vms / "box/config.py.bak").is_file() and (vms / "box/config.py").is_file()
    r = qemubox("vm", "rm", "two", env=home)
    assert r.code == 0 and not (vms / "two").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["vm", "create", "../x"], "invalid VM name '../x'"),
        (["vm", "create", "a", "-m", "lots"], "invalid --memory 'lots'"),
        (["vm", "create", "a", "-c", "0"], "--cpu must be at least 1"),
        (["vm", "create", "a", "--arch", "mips"], "unknown architecture 'mips'"),
        (["vm", "run", "ghost"], "no VM 'ghost' in"),
        (["vm", "run", "box", "-a", "quiet"], "-a/--append needs -k BUILD"),
        (["vm", "run", "box", "-k", "/nonexistent"], "-k /nonexistent: no kernel build directory"),
        (["vm", "stop", "box"], "VM 'box' is not running"),
        (["vm", "exec", "box", "--", "true"], "VM 'box' is not running"),
        (["vm", "console", "box"], "VM 'box' is not running"),
        (["vm", "install", "box", "--user", "root"], "--user 'root'"),
        (["vm", "install", "box", "--locale", "xx"], "--locale 'xx'"),
    ],
)
def test_bad_input_is_one_line_exit_2(home, args, message):
    assert qemubox("vm", "create", "box", "-s", "1G", env=home).code == 0
    r = qemubox(*args, env=home)
    assert r.code == 2, (r.code, r.err)
    assert r.err.strip().splitlines() == [f"qemubox: error: {r.err.split('error: ', 1)[1].strip()}"]
    assert message in r.err


def test_vmpy_conf_is_read_and_its_errors_named(home, tmp_path):
    cfgdir = Path(home["XDG_CONFIG_HOME"])
    cfgdir.mkdir()
    (cfgdir / "vmpy.conf").write_text(f"[Paths]\nVMs = {tmp_path}/elsewhere\n")
    assert qemubox("vm", "create", "box", "-s", "1G", env=home).code == 0
    assert (tmp_path / "elsewhere/box/config.py").is_file()
    (cfgdir / "vmpy.conf").write_text("[Paths]\nVMs = here\n")
    r = qemubox("vm", "list", env=home)
    assert r.code == 2
    assert r.err.strip() == (
        f"qemubox: error: {cfgdir}/vmpy.conf:2: VMs=here: a relative path (start it with / or ~)"
    )


def test_install_edit_writes_the_script(home):
    assert qemubox("vm", "create", "box", "-s", "2G", env=home).code == 0
    r = qemubox("vm", "install", "box", "-e", "--mirror", "http://m.example/debian", env=home)
    assert r.code == 0, r.err
    script = Path(home["HOME"]) / "vms/box/install.sh"
    text = script.read_text()
    assert "mirror=http://m.example/debian\n" in text
    assert f"qemubox vm install box --script {script}" in r.out
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.qemu
def test_a_vm_qemu_cannot_start_is_one_line(home):
    """QEMU itself refusing the command: its own words, exit 125, nothing left running."""
    assert qemubox("vm", "create", "box", "-s", "1G", env=home).code == 0
    r = qemubox("vm", "run", "box", "-d", "--accel", "tcg", "--", "-no-such-option", env=home)
    assert r.code == 125, r.err
    assert r.err.strip() == (
        "qemubox: error: QEMU could not start VM 'box': "
        "qemu-system-x86_64: -no-such-option: invalid option"
    )
    (row,) = json.loads(qemubox("vm", "list", "--json", env=home).out)
    assert not row["running"]


def test_dry_run_prints_a_command_that_shell_splits_back(home, tmp_path):
    assert qemubox("vm", "create", "box", "-s", "1G", env=home).code == 0
    r = qemubox("vm", "run", "box", "-n", "--accel", "tcg", "--", "-S", "-name", "x y", env=home)
    assert r.code == 0, r.err
    args = shlex.split(r.out)
    assert args[0] == "qemu-system-x86_64" and args[-3:] == ["-S", "-name", "x y"]
    assert args.count("-name") == 1  # the user's own -name wins
    assert "-kernel" not in args and "-append" not in args
