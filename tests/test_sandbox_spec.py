"""Session validation, the machine plan and the QEMU command line (pure functions, no VM)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from qemubox import arch
from qemubox.errors import InputError
from qemubox.model.plan import (
    DiskPlan,
    KernelPlan,
    MachinePlan,
    PortPlan,
    SharePlan,
    kernel_cmdline,
    make_plan,
)
from qemubox.model.size import parse_size
from qemubox.qemu import cmdline as qemu
from qemubox.qemu import virtiofs
from qemubox.sandbox.spec import Disk, FSShare, Session


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1024K", 1 << 20),
        ("64MiB", 64 << 20),
        ("256", 256 << 20),
        ("1T", 1 << 40),
        (4096, 4096),
    ],
)
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-5M", "1.5G", "0", "12Q", 0])
def test_bad_sizes(text):
    with pytest.raises(InputError):
        parse_size(text)


def test_valid_session(tmp_path):
    v = Session(
        memory="256M",
        cpus=2,
        balloon=True,
        shares=[FSShare(str(tmp_path), "/mnt/host", "host_share", True)],
        disks=[Disk("1G", "/data")],
        network="restricted",
        ports=[(0, 80)],
    ).validate()
    assert v.memory == 256 << 20 and v.cpus == 2
    assert v.shares[0].tag == "host_share" and v.shares[0].read_only
    assert v.shares[0].security_model == "mapped-xattr"
    assert v.disks[0].size == 1 << 30 and v.disks[0].serial == "qbxdisk0"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"memory": "32M"}, "too small"),
        ({"memory": "big"}, "invalid memory"),
        ({"cpus": 0}, "cpus must be"),
        ({"network": "wide"}, "network must be none, restricted, user"),
        ({"accel": "hvf"}, "accel must be one of"),
        ({"ports": [(8080, 80)]}, "need a network"),
        ({"ports": [(70000, 80)], "network": "user"}, "host port must be between"),
        ({"ports": [(1, 0)], "network": "user"}, "guest port must be between 1"),
        ({"shares": [FSShare("/nonexistent", "/mnt")]}, "not a directory: /nonexistent"),
        ({"shares": [FSShare("{tmp}", "relative")]}, "absolute guest path"),
        ({"shares": [FSShare("{tmp}", "/proc/x")]}, "would hide a system directory"),
        ({"shares": [FSShare("{tmp}", "/mnt", "bad tag!")]}, "invalid mount tag 'bad tag!'"),
        ({"shares": [FSShare("{tmp}", "/mnt", "t" * 32)]}, "invalid mount tag"),
        ({"shares": [FSShare("{tmp}", "/a", "t"), FSShare("{tmp}", "/b", "t")]}, "used twice"),
        ({"shares": [FSShare("{tmp}", "/a", security_model="open")]}, "security_model must"),
        ({"shares": [FSShare("{tmp}", "/a")], "disks": [Disk("1G", "/a/")]}, "two mounts at /a"),
        ({"disks": [Disk("1K", "/d")]}, "too small"),
        ({"disks": [Disk("1G", "/d", "/nonexistent/dir/x.img")]}, "directory does not exist"),
        ({"disks": [Disk("1G", "/d", "{tmp}")]}, "not a file"),
        ({"timeout": -1}, "timeout must be positive"),
        ({"modules": "{tmp}"}, "no modules.dep"),
    ],
)
def test_invalid_sessions(tmp_path, kw, message):
    def fill(value):
        if isinstance(value, str):
            return value.replace("{tmp}", str(tmp_path))
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, FSShare | Disk):
            return type(value)(*(fill(getattr(value, f)) for f in value.__dataclass_fields__))
        return value

    with pytest.raises(InputError, match=message):
        Session(**{k: fill(v) for k, v in kw.items()}).validate()


KERNEL = KernelPlan("/k/vmlinuz", "6.12.1", "x86_64", None, None, "a kernel", mmio=True)


def config(tmp_path, **kw) -> MachinePlan:
    base = dict(
        arch="x86_64",
        machine="microvm",
        accel="tcg",
        accel_note="",
        cpus=1,
        memory_mib=512,
        kernel=KERNEL,
        initrd=str(tmp_path / "initrd"),
        features=(),
        append="console=ttyS0",
        runtime_dir=str(tmp_path),
    )
    return MachinePlan(**{**base, **kw})


def option(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_escape():
    assert qemu.escape("/tmp/a,readonly=off") == "/tmp/a,,readonly=off"
    assert qemu.escape(Path("/x,,y")) == "/x,,,,y"


def test_a_comma_in_a_path_cannot_inject_options(tmp_path):
    evil = Path("/tmp/a,readonly=off,security_model=passthrough")
    args = qemu.qemu_args(
        config(tmp_path, shares=(SharePlan("t", str(evil), "/mnt", True, "mapped-xattr"),))
    )
    (fsdev,) = option(args, "-fsdev")
    assert fsdev == (
        "local,id=fs0,path=/tmp/a,,readonly=off,,security_model=passthrough,"
        "security_model=mapped-xattr,readonly=on"
    )
    # QEMU splits options at single commas only: the path stays one value.
    parts = fsdev.replace(",,", "\0").split(",")
    assert parts[2].replace("\0", ",") == f"path={evil}"
    assert parts[-1] == "readonly=on"


def test_microvm_uses_mmio_devices_and_q35_pci(tmp_path):
    share = SharePlan("host_share", str(tmp_path), "/mnt", True, "mapped-xattr")
    disk = DiskPlan(str(tmp_path / "d.img"), 1 << 30, "/d", "qbxdisk0", ephemeral=True)
    for machine, suffix in (("microvm", "device"), ("q35", "pci")):
        args = qemu.qemu_args(
            config(
                tmp_path,
                machine=machine,
                shares=(share,),
                disks=(disk,),
                network="user",
                balloon=True,
            )
        )
        devices = option(args, "-device")
        assert f"virtio-serial-{suffix}" in devices
        assert f"virtio-9p-{suffix},fsdev=fs0,mount_tag=host_share" in devices
        assert f"virtio-blk-{suffix},drive=disk0,serial=qbxdisk0" in devices
        assert f"virtio-net-{suffix},netdev=net0" in devices
        assert f"virtio-balloon-{suffix},id=balloon0" in devices
    assert option(args, "-machine") == ["q35"]


def test_base_command_line(tmp_path):
    args = qemu.qemu_args(config(tmp_path))
    assert args[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in args
    assert option(args, "-machine") == ["microvm,rtc=on"]
    assert option(args, "-accel") == ["tcg"] and option(args, "-cpu") == ["max"]
    assert not option(args, "-netdev") and not option(args, "-fsdev")
    chardevs, devices = option(args, "-chardev"), option(args, "-device")
    # One agent port and one monitor per client slot, each a socket QEMU owns: any
    # process can attach to the guest, several at once.
    for k in range(4):
        assert f"virtserialport,chardev=agent{k},name=qemubox.agent.{k}-of-4" in devices
        assert f"socket,id=qmp{k},path={tmp_path}/qmp{k}.sock,server=on,wait=off" in chardevs
        assert f"socket,id=agent{k},path={tmp_path}/agent{k}.sock,server=on,wait=off" in chardevs
        assert f"chardev=qmp{k},mode=control" in option(args, "-mon")
    assert "virtserialport,chardev=agent4,name=qemubox.agent.4-of-4" not in devices
    kvm = qemu.qemu_args(config(tmp_path, accel="kvm"))
    assert option(kvm, "-cpu") == ["host"]


def test_networks(tmp_path):
    restricted = qemu.qemu_args(
        config(tmp_path, network="restricted", ports=(PortPlan(8080, 80), PortPlan(2222, 22)))
    )
    assert option(restricted, "-netdev") == [
        "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80,"
        "hostfwd=tcp:127.0.0.1:2222-10.0.2.15:22"
    ]
    user = qemu.qemu_args(config(tmp_path, network="user"))
    assert option(user, "-netdev") == ["user,id=net0"]


def test_kernel_cmdline():
    x86, arm64 = arch.get("x86_64"), arch.get("arm64")
    line = kernel_cmdline(x86, "tcg", 2445432)
    assert line.split()[:3] == ["console=ttyS0", "panic=-1", "quiet"]
    assert "tsc_early_khz=2445432" in line
    assert "tsc_early_khz" not in kernel_cmdline(x86, "kvm", 2445432)
    assert kernel_cmdline(arm64, "tcg", None).startswith("console=ttyAMA0")


def test_plan_from_a_session_is_pure_and_round_trips(tmp_path):
    spec = Session(
        memory="256M",
        cpus=2,
        balloon=True,
        shares=[FSShare(str(tmp_path), "/mnt/host", "host_share", True)],
        disks=[Disk("64M", "/data"), Disk("16M", "/keep", str(tmp_path / "keep.img"))],
        network="restricted",
        ports=[(0, 80)],
    ).validate()
    run = tmp_path / "run"
    plan = make_plan(spec, KERNEL, "tcg", "no KVM", str(run), "/c/initrd", 2445432)
    assert not run.exists() and not (tmp_path / "keep.img").exists()  # nothing was made
    assert plan.machine == "microvm" and plan.memory_mib == 256 and plan.cpus == 2
    assert plan.features == ("disks", "shares", "network", "balloon")
    assert [d.path for d in plan.disks] == [f"{run}/disk0.img", str(tmp_path / "keep.img")]
    assert [d.ephemeral for d in plan.disks] == [True, False]
    assert plan.ports == (PortPlan(0, 80),)
    again = MachinePlan.from_json(plan.to_json())
    assert again == plan
    assert qemu.qemu_args(again) == qemu.qemu_args(plan)
    assert json.loads(plan.to_json())["schema"] == 4
    older = json.loads(plan.to_json())  # schema 1 lacked only fields with defaults
    older["schema"] = 1
    del older["root"]["source"], older["root"]["config"]
    assert MachinePlan.from_dict(older).root == plan.root
    older["schema"] = 99
    with pytest.raises(InputError, match="schema 99; this qemubox reads 1, 2"):
        MachinePlan.from_dict(older)


def test_plan_machine_follows_the_kernel_and_arch(tmp_path):
    spec = Session().validate()
    pci = make_plan(spec, replace(KERNEL, mmio=False), "tcg", "", str(tmp_path), "/i", None)
    assert pci.machine == "q35"
    arm = replace(KERNEL, arch="arm64", mmio=True)
    plan = make_plan(spec, arm, "tcg", "", str(tmp_path), "/i", None)
    assert (plan.machine, qemu.qemu_args(plan)[0]) == ("virt", "qemu-system-aarch64")
    assert "virtio-serial-pci" in option(qemu.qemu_args(plan), "-device")


def test_compat_key_follows_what_the_guest_sees(tmp_path):
    spec = Session().validate()
    plan = make_plan(spec, KERNEL, "tcg", "", str(tmp_path / "a"), "/i", None)
    elsewhere = make_plan(spec, KERNEL, "tcg", "", str(tmp_path / "b"), "/i", None)
    assert plan.compat_key() == elsewhere.compat_key()  # where it runs does not matter
    bigger = make_plan(Session(memory="1G").validate(), KERNEL, "tcg", "", "/r", "/i", None)
    assert bigger.compat_key() != plan.compat_key()
    disk = Session(disks=[Disk("16M", "/d")]).validate()
    small = make_plan(disk, KERNEL, "tcg", "", "/r", "/i", None)
    large = make_plan(replace(disk, disks=(replace(disk.disks[0], size=32 << 20),)), KERNEL,
                      "tcg", "", "/r", "/i", None)  # fmt: skip
    assert small.compat_key() != large.compat_key()  # the device says its size
    assert replace(plan, slots=2).compat_key() != plan.compat_key()


def test_what_a_guest_writes_that_outlives_it(tmp_path):
    def plan(**kw):
        return make_plan(Session(**kw).validate(), KERNEL, "tcg", "", "/r", "/i", None)

    assert not plan().keeps_writes
    assert not plan(disks=[Disk("16M", "/d")]).keeps_writes  # made for it, gone with it
    assert plan(disks=[Disk("16M", "/d", str(tmp_path / "d.img"))]).keeps_writes
    assert plan(shares=[FSShare(str(tmp_path), "/s")]).keeps_writes
    assert not plan(shares=[FSShare(str(tmp_path), "/s", read_only=True)]).keeps_writes
    root = replace(plan().root, kind="disk")
    assert replace(plan(), root=root).keeps_writes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "must be a JSON object"),
        ("{", "not JSON"),
        ('{"schema": 99}', "schema 99"),
        ('{"schema": 1, "arch": "x86_64"}', "malformed machine plan"),
    ],
)
def test_bad_plans(text, message):
    with pytest.raises(InputError, match=message):
        MachinePlan.from_json(text)


def test_virtiofs_command_line_and_daemons(tmp_path):
    shares = (
        SharePlan("a", "/srv/a,b", "/a", True, "mapped-xattr", "virtiofs"),
        SharePlan("n", "/srv/n", "/n", False, "mapped-xattr", "9p"),
    )
    plan = config(tmp_path, shares=shares)
    args = qemu.qemu_args(plan)
    assert option(args, "-object") == ["memory-backend-memfd,id=ram0,size=512M,share=on"]
    assert option(args, "-machine") == ["microvm,rtc=on,memory-backend=ram0"]
    assert "virtio-mmio.force-legacy=false" in option(args, "-global")
    assert f"socket,id=fs0,path={tmp_path}/fs0.sock" in option(args, "-chardev")
    assert "vhost-user-fs-device,chardev=fs0,tag=a" in option(args, "-device")
    assert any(d.startswith("virtio-9p-device,fsdev=fs1") for d in option(args, "-device"))
    ((command, socket),) = virtiofs.virtiofsd_commands(plan)
    assert socket == f"{tmp_path}/fs0.sock"
    view = f"{tmp_path}/ro0"
    assert command[1:5] == ["-m", "qemubox.qemu.readonly", "/srv/a,b", view]  # read-only
    assert f"source={view}" in command and "announce_submounts" in command
    ((command, _),) = virtiofs.virtiofsd_commands(
        config(tmp_path, shares=(replace(shares[0], read_only=False),))
    )
    assert "source=/srv/a\\,b" in command  # virtiofsd's option syntax, escaped
    plain = config(tmp_path, shares=(replace(shares[0], read_only=False),))
    ((command, _),) = virtiofs.virtiofsd_commands(plain)
    assert command[0].endswith("virtiofsd")
    assert option(qemu.qemu_args(config(tmp_path)), "-object") == []  # only when needed


def test_virtiofs_share_validation(tmp_path, monkeypatch):
    share = FSShare(str(tmp_path), "/mnt", fs="virtiofs")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(InputError, match="virtiofsd must run as root"):
        Session(shares=[share]).validate()
    with pytest.raises(InputError, match="share fs must be one of 9p, virtiofs"):
        Session(shares=[replace(share, fs="nfs")]).validate()


def test_the_sweep_removes_what_a_removal_left_behind(tmp_path):
    """Runtime directories: a dead machine's (its lock free) goes; one left without a lock
    file for longer than the grace (QEMU made sockets after a removal listed it) goes; one
    being made, a live one and qemubox's own directories stay."""
    import fcntl

    from qemubox.vm.machine import UNLOCKED_GRACE, sweep

    old = os.stat(tmp_path).st_mtime - UNLOCKED_GRACE - 5
    dirs = {n: tmp_path / n for n in ("0000dead", "0000beef", "0000cafe", "0000face", "pool")}
    for d in dirs.values():
        d.mkdir()
        (d / "agent0.sock").touch()
    (dirs["0000dead"] / "alive.lock").touch()
    (dirs["0000cafe"] / ".alive.lock").touch()
    (dirs["0000face"] / "alive.lock").touch()
    held = os.open(dirs["0000face"] / "alive.lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    for name in ("0000beef", "0000cafe", "0000face", "pool"):
        os.utime(dirs[name], (old, old))
    fresh = tmp_path / "0000fade"  # no lock file yet, but just made
    fresh.mkdir()
    try:
        sweep(tmp_path)
    finally:
        os.close(held)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "0000cafe",
        "0000face",
        "0000fade",
        "pool",
    ]
