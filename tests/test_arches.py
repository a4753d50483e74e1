"""Every architecture of the arch table as a sandbox: the table itself and what is read from
it (fast), and each arch booted once under TCG — Debian's kernel package where Debian 12 has
one, qemubox's own build for riscv64 — with its snapshot, its pool, shares, disks and network."""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from pathlib import Path

import pytest

from helpers import assert_clock_is_now, assert_sleeps, qemubox
from qemubox import arch as arches
from qemubox.errors import InputError
from qemubox.kernel.artifacts import bzimage_arch
from qemubox.model.plan import Capability
from qemubox.sandbox.spec import Session

UNAME = {
    "x86_64": "x86_64",
    "arm64": "aarch64",
    "armhf": "armv7l",
    "i386": "i686",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "mips64el": "mips64",
}


# --- the table ----------------------------------------------------------------------------------


def test_the_table_has_every_arch_the_issue_names_with_its_uname():
    assert {name: a.uname for name, a in arches.ARCHES.items()} == UNAME


@pytest.mark.parametrize("name", list(arches.ARCHES))
def test_each_record_is_complete_and_consistent(name):
    a = arches.ARCHES[name]
    assert a.qemu_binary.startswith("qemu-system-") and a.qemu_package.startswith("qemu-system-")
    assert a.cross_prefix.endswith("-")
    if name != arches.host().name:
        assert shutil.which(a.cross_prefix + "gcc"), "setup.sh --dev installs it"
    assert a.fragments == (name,), "each arch's own build has its shipped fragment"
    assert a.tcg_cpu and a.console and a.pci_machine and a.bits in (32, 64)
    assert arches.normalize(a.debian_arch) == name, "Debian's name leads to the same record"
    assert arches.find(a.karch) is a
    assert a.debian_kernel is None or a.debian_kernel.startswith("linux-image-")


def test_setup_installs_every_arch_s_qemu_and_cross_compiler():
    """The Debian package names the table derives are the ones setup.sh installs (and the
    ones the runtime installs on demand)."""
    setup = re.findall(
        r"[a-z0-9][a-z0-9.+-]+", (Path(__file__).parent.parent / "setup.sh").read_text()
    )
    assert arches.get("x86_64").cross_package == "gcc-x86-64-linux-gnu"
    assert arches.get("armhf").cross_libc == "libc6-dev-armhf-cross"
    for a in arches.ARCHES.values():
        if a.name != arches.host().name:
            assert {a.qemu_package, a.cross_package, a.cross_libc} <= set(setup), a.name


def test_names_of_others_lead_to_the_record():
    for alias, name in [("aarch64", "arm64"), ("armv7l", "armhf"), ("i686", "i386")]:
        assert arches.get(alias).name == name
    for karch, name in [("arm", "armhf"), ("powerpc", "ppc64le"), ("s390", "s390x")]:
        assert arches.find(karch).name == name and arches.karch(name) == karch
    assert arches.karch("mips64el") == "mips" and arches.srcarch("riscv64") == "riscv"
    assert arches.karch("sparc64") == "sparc64" and arches.srcarch("sparc64") == "sparc"
    with pytest.raises(InputError, match="unknown architecture 'vax'"):
        arches.get("vax")


def test_devices_follow_the_machines_transport():
    assert arches.get("x86_64").device("blk", "microvm") == "virtio-blk-device"
    assert arches.get("x86_64").device("blk", "q35") == "virtio-blk-pci"
    assert arches.get("s390x").device("serial", "s390-ccw-virtio") == "virtio-serial-ccw"
    assert arches.get("ppc64le").machine_arg("pseries").startswith("pseries,x-vof=on,")
    assert arches.get("armhf").machine_arg("virt") == "virt,highmem=off"
    assert arches.get("arm64").machine_arg("virt") == "virt"


def test_boot_images_tell_their_arch(tmp_path):
    zimage = bytearray(64)
    zimage[0x24:0x28] = b"\x18\x28\x6f\x01"
    riscv = bytearray(64)
    riscv[0x38:0x3C] = b"RSC\x05"
    s390 = bytearray(0x10010)
    s390[0x10008:0x1000E] = b"S390EP"
    arm64 = bytearray(64)
    arm64[56:60] = b"ARM\x64"
    for head, name in [(zimage, "armhf"), (riscv, "riscv64"), (s390, "s390x"), (arm64, "arm64")]:
        assert arches.by_image(bytes(head)).name == name
    assert arches.by_image(bytes(64)) is None
    for flags, name in [(1, "x86_64"), (0, "i386")]:
        image = tmp_path / name
        header = bytearray(0x240)
        header[0x202:0x206] = b"HdrS"
        header[0x236] = flags  # xloadflags: XLF_KERNEL_64
        image.write_bytes(bytes(header))
        assert bzimage_arch(image) == name


def test_a_kernels_config_tells_its_arch():
    assert arches.by_config("CONFIG_X86_32=y\n").name == "i386"
    assert arches.by_config("CONFIG_PPC64=y\nCONFIG_PPC=y\n").name == "ppc64le"
    assert arches.by_config("CONFIG_S390=y\n").name == "s390x"


def test_bad_arch_is_one_line_exit_2():
    r = qemubox("run", "--arch", "vax", "--", "true")
    assert r.code == 2 and "'vax' is not one of" in r.err and "Traceback" not in r.err


def test_riscv64_without_a_kernel_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setenv("QEMUBOX_CACHE_DIR", str(tmp_path))  # no build of it here
    r = qemubox("run", "--arch", "riscv64", "--dry-run", "--", "true")
    assert r.code == 2, r.err
    assert r.err.strip().splitlines()[-1] == (
        "qemubox: error: Debian 12 has no kernel package for riscv64: build one with "
        "'qemubox kernel build --arch riscv64', or give --kernel"
    )


def test_a_kernel_of_another_arch_than_asked_is_refused(tmp_path):
    image = tmp_path / "Image-6.12.0"
    head = bytearray(64)
    head[56:60] = b"ARM\x64"
    image.write_bytes(bytes(head))
    r = qemubox("run", "--arch", "s390x", "--kernel", image, "--dry-run", "--", "true")
    assert r.code == 2 and f"--kernel {image} is a arm64 kernel, not s390x" in r.err


# --- each arch, booted --------------------------------------------------------------------------


FOREIGN = [a for a in arches.ARCHES if a != arches.host().name]


@pytest.mark.qemu
@pytest.mark.builds("riscv64_kernel")  # asked for below, by its riscv64 case
@pytest.mark.parametrize("name", FOREIGN)
def test_each_arch_runs_restores_pools_and_has_its_devices(name, request, tmp_path):
    """One arch end to end: a boot (which records the snapshot), a restored start, a start
    from a pool, then a booted run with a 9p share, an ext4 disk and a network."""
    from qemubox import Pool, Sandbox
    from qemubox.sandbox.spec import Disk, FSShare

    warnings.simplefilter("ignore")
    # Debian's kernel where Debian has one (whatever builds the cache holds), else ours.
    kernel = request.getfixturevalue("riscv64_kernel") if name == "riscv64" else "debian"
    session = Session(arch=name, kernel=kernel, memory="256M", boot_timeout=180)
    with Sandbox(session) as box:
        plan = box.machine.plan
        assert box.exec(["uname", "-m"]).stdout.decode() == UNAME[name] + "\n"
        assert box.exec(["sh", "-c", "echo out; echo err >&2; exit 7"]).exit_code == 7
        r = box.exec(["sh", "-c", "printf 12345 > /tmp/five; echo $$"])
        assert r.stdout == f"{r.pid}\n".encode()  # a pid, a size, a time: in any byte order
        (five,) = [e for e in box.files.list("/tmp") if e.name == "five"]
        assert (five.size, five.kind, abs(five.mtime_ns / 1e9 - time.time()) < 60) == (
            5, "file", True
        )  # fmt: skip
        assert_sleeps(box)
    migrates = arches.get(name).migrates
    assert plan.arch == name and (plan.cannot(Capability.SNAPSHOT) is None) == migrates
    start = "restore" if migrates else "kernel boot to agent ready"
    with Sandbox(session) as again:  # restored: the clock and the byte order still agree
        assert start in [phase for phase, _ in again.timings]
        assert_clock_is_now(again)
        r = again.exec(["cat"], stdin=b"x" * 100_000)
        assert (r.exit_code, len(r.stdout)) == (0, 100_000)
        assert_sleeps(again)  # its timer runs again: a restored tick is easily lost
    if migrates:
        with Pool(session, size=1) as warm, warm.sandbox() as taken:
            assert "taken from the pool" in [phase for phase, _ in taken.timings]
            assert taken.exec(["uname", "-m"]).stdout.decode() == UNAME[name] + "\n"
    else:  # it boots every time, and says why where only a restore would do
        with pytest.raises(InputError, match="cannot be pooled: QEMU does not restore this arch"):
            Pool(session, size=1).start()
        request.getfixturevalue("state")  # a named sandbox of its own, refusing a pause
        r = qemubox("create", "--arch", name, "--kernel", kernel, "-m", "256M", "p", timeout=300)
        assert r.code == 0, r.err[-2000:]
        r = qemubox("pause", "p")
        assert (r.code, r.err.strip()) == (2, "qemubox: error: sandbox 'p' cannot be paused: "
                                           "QEMU does not restore this arch's machines reliably: "
                                           "a restored guest may hang")  # fmt: skip
        assert qemubox("rm", "-f", "p").code == 0

    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("from the host\n")
    args = ["--kernel", kernel]
    r = qemubox(
        "run", "--arch", name, *args, "-m", "256M", "--boot-timeout", "180",
        "-v", f"{share}:/mnt:ro", "--disk", "16M:/data", "--net", "user", "--",
        "sh", "-c", "cat /mnt/hello; echo kept > /data/f && cat /data/f; "
        "ip -o -4 addr show eth0 | grep -o 'inet [0-9.]*'",
        timeout=400,
    )  # fmt: skip
    assert (r.code, r.out) == (0, "from the host\nkept\ninet 10.0.2.15\n"), r.err[-2000:]
    # The same devices again, restored whatever the run above did: the guest's NIC gets
    # its own MAC, its network answers and it sleeps (a lost timer once hung all three; a
    # restored Malta's lost PCI interrupts, its network).
    devices = Session(
        arch=name, kernel=kernel, memory="256M", boot_timeout=180, network="user",
        shares=[FSShare(str(share), "/mnt", read_only=True)], disks=[Disk("16M", "/data")],
    )  # fmt: skip
    macs = set()
    for _ in range(2):
        with Sandbox(devices) as netted:
            r = netted.exec(["sh", "-c", "cat /mnt/hello; cat /sys/class/net/eth0/address; "
                             "ping -c 1 -W 5 10.0.2.2 >/dev/null && echo answered"])  # fmt: skip
            out = r.stdout.decode().split("\n")
            assert (r.exit_code, out[0], out[2]) == (0, "from the host", "answered"), r
            macs.add(out[1])
            assert_sleeps(netted)
    assert start in [phase for phase, _ in netted.timings] and len(macs) == 2


@pytest.mark.qemu
def test_a_matrix_runs_its_test_on_each_arch_of_its_axis(tmp_path):
    (tmp_path / "m.toml").write_text(
        '[[kernel]]\nname = "debian"\npath = "debian"\n'
        '[[test]]\nname = "uname"\ncommand = ["uname", "-m"]\n'
        '[matrix]\narch = ["armhf", "s390x", "mips64el"]\n'
    )
    out = tmp_path / "out.json"
    r = qemubox("matrix", tmp_path / "m.toml", "--json", out, timeout=900)
    assert r.code == 0, r.err[-2000:]
    records = {rec["cell"]: rec for rec in json.loads(out.read_text())}
    for name in ("armhf", "s390x", "mips64el"):
        rec = records[f"debian/uname[arch={name}]"]
        assert (rec["status"], rec["stdout"]) == ("pass", UNAME[name] + "\n"), rec


def test_kvm_is_considered_only_where_the_hosts_kvm_runs_the_guest(monkeypatch, tmp_path):
    from qemubox.qemu import accel

    monkeypatch.setenv("QEMUBOX_CACHE_DIR", str(tmp_path))  # no verdict of this host's
    monkeypatch.setattr(accel.os.path, "exists", lambda path: True)
    monkeypatch.setattr(accel.os, "access", lambda path, mode: True)

    def choice(guest: str) -> accel.AccelChoice:
        record = arches.get(guest)
        return accel.choose_accel("auto", record.qemu_binary, "k", guest, "x86_64", probe=False)

    assert choice("s390x") == accel.AccelChoice("tcg", "")  # emulated: no KVM to try
    assert choice("armhf") == accel.AccelChoice("tcg", "")
    not_probed = accel.AccelChoice("tcg", "KVM not probed yet (a dry run boots nothing)")
    assert choice("i386") == not_probed == choice("x86_64")  # x86_64's KVM runs i386


def _args(name: str, session: Session, tmp_path) -> list[str]:
    from qemubox.model.plan import KernelPlan, make_plan
    from qemubox.qemu.cmdline import qemu_args

    kernel = KernelPlan("/k/vmlinuz", "6.1.0", name, None, None, "a kernel", mmio=False)
    return qemu_args(make_plan(session.validate(), kernel, "tcg", "", str(tmp_path), "/i", None))


def _devices(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "-device"]


def test_arches_qemu_does_not_restore_reliably_boot_every_start(tmp_path):
    from qemubox.model.plan import KernelPlan, make_plan

    for name in arches.ARCHES:
        kernel = KernelPlan("/k/vmlinuz", "6.1.0", name, None, None, "a kernel", mmio=False)
        plan = make_plan(Session().validate(), kernel, "tcg", "", str(tmp_path), "/i", None)
        why = {plan.cannot(capability) for capability in Capability}
        if name in ("ppc64le", "riscv64", "mips64el"):  # a restored guest may hang (QEMU 7.2)
            assert why == {"QEMU does not restore this arch's machines reliably: a restored "
                           "guest may hang"}, name  # fmt: skip
        else:
            assert why == {None}, name


def test_s390x_devices_are_on_channel_io(tmp_path):
    from qemubox.sandbox.spec import Disk

    args = _args("s390x", Session(network="user", disks=[Disk("16M", "/d")]), tmp_path)
    virtio = [d.split(",")[0] for d in _devices(args) if d.startswith("virtio-")]
    assert virtio == [
        "virtio-serial-ccw",
        "virtio-rng-ccw",
        "virtio-blk-ccw",
        "virtio-net-ccw",
    ]
    assert args[args.index("-machine") + 1] == "s390-ccw-virtio"
    assert args[args.index("-cpu") + 1] == "max"


def test_malta_puts_its_pci_devices_in_the_slots_its_kernel_routes(tmp_path):
    from qemubox.sandbox.spec import Disk

    disks = [Disk("16M", f"/d{i}") for i in range(3)]
    args = _args("mips64el", Session(network="user", disks=disks), tmp_path)
    pci = [d for d in _devices(args) if d.split(",")[0].endswith("-pci")]
    addresses = [d.split(",addr=")[1] for d in pci]
    assert addresses == [
        "0x12.0,multifunction=on",  # serial
        "0x13.0,multifunction=on",  # rng
        "0x14.0,multifunction=on",
        "0x15.0,multifunction=on",
        "0x12.1",  # the fifth device shares the first slot
        "0x13.1",
    ]
    assert all("addr=" not in d for d in _devices(args) if d.startswith("virtserialport"))
    assert args[args.index("-cpu") + 1] == "5KEc"
    too_many = [Disk("16M", f"/d{i}") for i in range(31)]
    with pytest.raises(InputError, match="more PCI devices than this machine has slots for"):
        _args("mips64el", Session(disks=too_many), tmp_path)
    x86 = _args("x86_64", Session(network="user", disks=disks), tmp_path)
    assert all(",addr=" not in d for d in _devices(x86)), "QEMU places them elsewhere"
