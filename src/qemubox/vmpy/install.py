"""``vm install``: an unattended Debian install onto a VM's disk, as one bash script.

The script is rendered from plain data (every value shell-quoted at its top) and does it
all as root on the host: a raw disk with one partition on a loop device, ext4,
debootstrap, the system configured in a chroot (user, sudo, sshd, serial autologin,
networking, the modules mounter), GRUB, then the qcow2 written. A finished install is
cached by the script's text, so the same inputs install again in seconds; ``-e`` writes
the script for editing instead, and ``--script`` runs an edited one."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qemubox import arch as arches
from qemubox import paths
from qemubox.errors import InputError, ToolError
from qemubox.image.recipe import parse_packages
from qemubox.model.net import DNS
from qemubox.vmpy import control, guestfiles
from qemubox.vmpy.layout import VmDir

SCRIPT_VERSION = 1  # bumped whenever the script's steps change what comes out
DEFAULT_RELEASE = "bookworm"
DEFAULT_USER = "vmuser"
BASE_PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "openssh-server",
    "sudo",
    "iproute2",
    "iputils-ping",
    "procps",
    "less",
    "tzdata",
    "ca-certificates",
    "grub-pc-bin",
    "grub2-common",
)
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_HOST_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_TZ_RE = re.compile(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*")
_LOCALE_RE = re.compile(r"[A-Za-z]{1,8}(_[A-Za-z]{2})?\.(UTF-8|utf8)|C\.UTF-8")
_RELEASE_RE = re.compile(r"[a-z][a-z0-9-]*")
_START_SECTOR = 2048  # the partition starts at 1 MiB: room for GRUB's core image before it


@dataclass(frozen=True)
class InstallSpec:
    release: str
    mirror: str
    arch: str  # Debian's architecture name
    user: str
    hostname: str
    packages: tuple[str, ...]  # what is installed besides minbase, sorted
    timezone: str
    locale: str
    size: int  # the disk's bytes
    console: str  # the guest's serial console (ttyS0)


def default_hostname(name: str) -> str:
    host = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63].strip("-")
    return host or "vm"


def make_spec(
    name: str,
    size: int,
    arch: arches.Arch,
    release: str,
    mirror: str,
    user: str,
    hostname: str | None,
    packages: str,
    timezone: str,
    locale: str,
) -> InstallSpec:
    """The install's inputs, each checked (a bad one is an error naming it)."""
    if arch.name != "x86_64":
        raise InputError(
            f"vm install makes x86_64 systems (GRUB for PC BIOS); this VM is {arch.uname}: "
            "boot it with -k BUILD on a disk you prepared"
        )
    if arches.host().name != arch.name:
        raise InputError(
            f"vm install runs the guest's package scripts: it needs a {arch.uname} host"
        )
    if not _RELEASE_RE.fullmatch(release):
        raise InputError(f"--release {release!r}: not a Debian release name")
    if not re.fullmatch(r"(https?|file)://\S+", mirror):
        raise InputError(f"--mirror {mirror!r}: expected an http(s):// or file:// URL")
    if not _USER_RE.fullmatch(user) or user == "root":
        raise InputError(f"--user {user!r}: a lower-case login name other than root")
    host = hostname if hostname is not None else default_hostname(name)
    if not _HOST_RE.fullmatch(host):
        raise InputError(f"--hostname {host!r}: letters, digits and '-' (at most 63)")
    if not _TZ_RE.fullmatch(timezone) or ".." in timezone:
        raise InputError(f"--timezone {timezone!r}: a zone such as Etc/UTC or Europe/Paris")
    if not _LOCALE_RE.fullmatch(locale):
        raise InputError(f"--locale {locale!r}: a UTF-8 locale such as en_US.UTF-8 or C.UTF-8")
    extra = parse_packages(packages) if packages else ()
    wanted = {*BASE_PACKAGES, arch.debian_kernel, *extra}
    if locale != "C.UTF-8":
        wanted.add("locales")
    return InstallSpec(
        release,
        mirror.rstrip("/"),
        arch.debian_arch,
        user,
        host,
        tuple(sorted(wanted)),
        timezone,
        locale,
        size,
        arch.console,
    )


def generated(
    vm: VmDir,
    release: str,
    mirror: str | None,
    user: str,
    hostname: str | None,
    packages: str,
    timezone: str,
    locale: str,
) -> tuple[InstallSpec, str]:
    """The install of ``vm`` as asked (checked) and its script: for the VM's disk size and
    architecture, from ``mirror`` or the one the host's apt sources name."""
    from qemubox.guest.initramfs import agent_binary
    from qemubox.image import sources
    from qemubox.image.debian import debs_dir
    from qemubox.vmpy import config as vmconfig

    arch = vmconfig.load(vm.config).arch
    size = control.disk_info(vm.disk).get("virtual-size")
    if not size:
        raise InputError(f"cannot read VM {vm.name!r}'s disk {vm.disk}")
    mirror = mirror or sources.mirror(release)
    choices = (release, mirror, user, hostname, packages, timezone, locale)
    spec = make_spec(vm.name, size, arch, *choices)
    return spec, render(spec, str(debs_dir(release, spec.arch)), str(agent_binary(arch)))


def mbr_entry(size: int) -> bytes:
    """The partition table's one entry: bootable, Linux, from 1 MiB to the disk's end
    (CHS fields say "use LBA")."""
    sectors = size // 512
    if sectors <= _START_SECTOR + 2048:
        raise InputError(f"a {size}-byte disk is too small to install on")
    count = min(sectors - _START_SECTOR, 0xFFFFFFFF)
    chs = b"\xfe\xff\xff"
    return struct.pack("<B3sB3sII", 0x80, chs, 0x83, chs, _START_SECTOR, count)


def _printf_bytes(data: bytes) -> str:
    return "".join(f"\\x{b:02x}" for b in data)


def _heredoc(path: str, text: str, mode: str = "644") -> str:
    """A shell fragment writing ``text`` to ``$mnt/path`` (no expansion inside)."""
    marker = "QEMUBOX_EOF"
    assert marker not in text
    return (
        f"install -D -m {mode} /dev/stdin \"$mnt{path}\" <<'{marker}'\n{text}"
        f"{'' if text.endswith(chr(10)) else chr(10)}{marker}\n"
    )


def render(spec: InstallSpec, debs: str | None, agent: str) -> str:
    """The install script: values first, then the steps; run as ``bash install.sh DISK``.
    ``agent``: the guest agent's binary, copied in for ``vm exec``."""
    values = {
        "release": spec.release,
        "mirror": spec.mirror,
        "arch": spec.arch,
        "user": spec.user,
        "hostname": spec.hostname,
        "packages": ",".join(spec.packages),
        "timezone": spec.timezone,
        "locale": spec.locale,
        "size_bytes": str(spec.size),
        "console": spec.console,
        "dns": DNS,
        "debs": debs or "",
        "agent": agent,
    }
    head = [
        "#!/bin/bash",
        f"# qemubox VM install (script version {SCRIPT_VERSION}): Debian {spec.release} for "
        f"{spec.user}@{spec.hostname}.",
        "# Run it as root: bash install.sh DISK.qcow2 (the disk is written at the end).",
        "# Edit anything below; every value the steps use is here.",
        "",
        *(f"{k}={shlex.quote(v)}" for k, v in values.items()),
        f"mbr_entry='{_printf_bytes(mbr_entry(spec.size))}'",
        "",
    ]
    files = "".join(
        [
            _heredoc("/usr/local/sbin/qemubox-modules", guestfiles.MODULES_SCRIPT, "755"),
            _heredoc("/etc/systemd/system/qemubox-modules.service", guestfiles.MODULES_UNIT),
            _heredoc("/usr/local/sbin/qemubox-keys", guestfiles.KEYS_SCRIPT, "755"),
            _heredoc(
                "/etc/systemd/system/qemubox-keys.service",
                guestfiles.KEYS_UNIT.format(user=spec.user),
            ),
            _heredoc(
                "/etc/systemd/system/ssh.service.d/qemubox-host-keys.conf",
                guestfiles.HOST_KEYS_DROPIN,
            ),
            _heredoc(
                "/etc/systemd/system/serial-getty@.service.d/qemubox-autologin.conf",
                guestfiles.SERIAL_AUTOLOGIN.format(user=spec.user),
            ),
            _heredoc("/etc/systemd/network/80-qemubox.network", guestfiles.NETWORK),
            _heredoc("/etc/udev/rules.d/60-qemubox-agent.rules", guestfiles.AGENT_RULE),
            _heredoc("/etc/systemd/system/qemubox-agent.service", guestfiles.AGENT_UNIT),
        ]
    )
    return "\n".join(head) + _STEPS.replace("@FILES@\n", files)


_STEPS = r"""
set -euo pipefail
umask 022
step() { echo "### $*"; }
target=${1:?usage: bash install.sh DISK.qcow2 (as root)}
[ "$(id -u)" = 0 ] || { echo "install.sh: run it as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
work=$(mktemp -d "${TMPDIR:-/var/tmp}/qemubox-install.XXXXXX")
raw=$work/disk.raw
mnt=$work/root
loop=
cleanup() {
    set +e
    if mountpoint -q "$mnt"; then umount -R "$mnt" || umount -R -l "$mnt"; fi
    if [ -n "$loop" ]; then partx -d "$loop" 2>/dev/null; losetup -d "$loop"; fi
    rm -rf "$work"
}
trap cleanup EXIT
in_root() {
    chroot "$mnt" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 HOME=/root "$@"
}

step "1/7 partitioning the disk"
truncate -s "$size_bytes" "$raw"
printf "$mbr_entry" | dd of="$raw" bs=1 seek=446 conv=notrunc status=none
printf '\x55\xaa' | dd of="$raw" bs=1 seek=510 conv=notrunc status=none
loop=$(losetup --show -f -P "$raw")
part=${loop}p1
[ -b "$part" ] || partx -a "$loop" 2>/dev/null || true
for _ in $(seq 50); do [ -b "$part" ] && break; sleep 0.1; done
[ -b "$part" ] || { echo "no device for the partition ($part)" >&2; exit 1; }
mkfs.ext4 -q -L root "$part"
mkdir "$mnt"
mount "$part" "$mnt"
uuid=$(blkid -s UUID -o value "$part")

step "2/7 debootstrap $release ($arch) from $mirror"
debootstrap --arch="$arch" --variant=minbase --components=main --include="$packages" \
    ${debs:+--cache-dir="$debs"} "$release" "$mnt" "$mirror"
for d in dev dev/pts proc sys; do mount --bind "/$d" "$mnt/$d"; done

step "3/7 configuring the system"
printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$uuid" > "$mnt/etc/fstab"
echo "$hostname" > "$mnt/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    "$hostname" > "$mnt/etc/hosts"
echo "deb $mirror $release main" > "$mnt/etc/apt/sources.list"
echo "nameserver $dns" > "$mnt/etc/resolv.conf"
[ -e "$mnt/usr/share/zoneinfo/$timezone" ] || { echo "unknown time zone $timezone" >&2; exit 1; }
ln -sf "/usr/share/zoneinfo/$timezone" "$mnt/etc/localtime"
echo "$timezone" > "$mnt/etc/timezone"
if [ "$locale" != C.UTF-8 ]; then
    grep -q "^# *$locale " "$mnt/etc/locale.gen" || { echo "unknown locale $locale" >&2; exit 1; }
    sed -i "s/^# *\($locale \)/\1/" "$mnt/etc/locale.gen"
    in_root locale-gen
fi
echo "LANG=$locale" > "$mnt/etc/default/locale"
echo "kernel.sysrq = 1" > "$mnt/etc/sysctl.d/50-qemubox-sysrq.conf"
@FILES@
install -m 755 "$agent" "$mnt/usr/local/sbin/qemubox-agent"
in_root systemctl enable systemd-networkd.service qemubox-modules.service qemubox-keys.service
in_root systemctl mask systemd-firstboot.service

step "4/7 user $user"
in_root useradd --create-home --shell /bin/bash --groups sudo "$user"
echo "$user:$user" | in_root chpasswd
echo "$user ALL=(ALL) NOPASSWD: ALL" > "$mnt/etc/sudoers.d/qemubox-$user"
chmod 440 "$mnt/etc/sudoers.d/qemubox-$user"
in_root passwd --lock root

step "5/7 boot loader"
cat > "$mnt/etc/default/grub" <<EOF
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=$console,115200"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_DISABLE_OS_PROBER=true
GRUB_DISABLE_RECOVERY=true
EOF
in_root grub-install --target=i386-pc --modules="part_msdos ext2" "$loop"
in_root update-grub
# Without udev here, grub-mkconfig names the root by this host's device: name it by UUID.
sed -i "s|root=$part |root=UUID=$uuid |g" "$mnt/boot/grub/grub.cfg"
if ! grep -q "root=UUID=$uuid" "$mnt/boot/grub/grub.cfg"; then
    echo "grub.cfg names no root" >&2
    exit 1
fi

step "6/7 cleaning up"
in_root apt-get clean
rm -f "$mnt"/etc/ssh/ssh_host_*
: > "$mnt/etc/machine-id"
rm -f "$mnt/var/lib/dbus/machine-id"
fstrim "$mnt" 2>/dev/null || true
umount -R "$mnt"
partx -d "$loop" 2>/dev/null || true
losetup -d "$loop"
loop=

step "7/7 writing $target"
qemu-img convert -f raw -O qcow2 -o nocow=on "$raw" "$target.part"
mv -f "$target.part" "$target"
echo "### installed"
"""


# --- running it --------------------------------------------------------------------------


def _cache() -> Path:
    return paths.cache_dir() / "vm-installs"


def check_can_install() -> None:
    if os.geteuid() != 0:
        raise InputError(
            "vm install needs root (debootstrap, a loop device, mount): run it with sudo"
        )
    from qemubox.apt import apt_install

    for tool, package in (
        ("debootstrap", "debootstrap"),
        ("losetup", "mount"),
        ("partx", "util-linux"),
        ("mkfs.ext4", "e2fsprogs"),
        ("qemu-img", "qemu-utils"),
    ):
        if shutil.which(tool) is None:
            apt_install(package, f"vm install needs {tool}")


def _describe():
    """The script's "### step" lines, with debootstrap's progress within its step."""
    from qemubox.image.debian import debootstrap_progress

    step = "starting"
    deb = debootstrap_progress()

    def describe(line: str) -> str | None:
        nonlocal step
        if line.startswith("### "):
            step = line[4:].strip()
            return step
        words = deb(line)
        return f"{step}: {words}" if words else None

    return describe


def script_key(script: str) -> str:
    return hashlib.sha256(script.encode()).hexdigest()[:20]


def cached_disk(script: str, label: str, console=None) -> Path:
    """The disk ``script`` makes, made once per script text."""
    from qemubox.progress import run_logged

    key = script_key(script)
    target = _cache() / f"{key}.qcow2"

    def make(tmp: Path) -> None:
        run = _cache() / f".{key}.sh"
        run.write_text(script)
        try:
            run_logged(
                ["bash", str(run), str(tmp)],
                _cache() / f"{key}.log",
                label,
                _describe(),
                console=console,
                interrupted=f"{label}: interrupted; nothing was kept",
            )
        finally:
            run.unlink(missing_ok=True)
        if not tmp.is_file():
            raise ToolError(f"{label}: the install script made no disk")

    paths.fill(target, make)
    return target


def place(vm: VmDir, disk: Path, keep_old: bool) -> list[str]:
    """Copy an installed disk over the VM's, first setting the old one aside if asked."""
    notes = []
    if keep_old:
        notes.append(f"kept the old disk as {paths.set_aside(vm.disk)}")
    tmp = paths.temp_beside(vm.disk)
    try:
        paths.copy_sparse(disk, tmp)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ToolError(f"copying the installed disk failed: {err.strerror}: {disk}") from None
    os.chmod(tmp, 0o644)
    os.replace(tmp, vm.disk)
    vm.known_hosts.unlink(missing_ok=True)  # the new system makes new host keys
    return notes


def remember(vm: VmDir, spec: InstallSpec | None, script: str, seconds: float) -> None:
    facts = asdict(spec) if spec else {"user": DEFAULT_USER, "script": "edited"}
    facts |= {"key": script_key(script), "seconds": round(seconds, 1), "at": time.time()}
    facts["agent"] = "/usr/local/sbin/qemubox-agent" in script
    paths.write_json(vm.install_record, facts)


def land_in_shell(vm: VmDir, script: Path, error: Exception) -> None:
    """After a failed step, on a terminal: a shell beside the script, to mend and retry."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return
    print(
        f"qemubox: the install failed: {error}\n"
        f"qemubox: a shell in {vm.root}; the script is {script.name} here. Mend it and run\n"
        f"    bash {script.name} {vm.disk}\n"
        "qemubox: then `exit` (the VM is ready when it succeeded).",
        file=sys.stderr,
    )
    subprocess.run([os.environ.get("SHELL", "/bin/bash")], cwd=vm.root, check=False)


def install(vm: VmDir, script: str, spec: InstallSpec | None, force: bool) -> list[str]:
    """Run ``script`` (or reuse what it made before) and put its disk in the VM. On failure
    the script is left in the VM's directory, and on a terminal the user gets a shell."""
    check_can_install()
    if control.running(vm) is not None:
        raise InputError(f"VM {vm.name!r} is running: stop it before installing")
    holds_data = vm.disk.exists() and control.disk_has_data(vm.disk)
    if holds_data and not force:
        raise InputError(
            f"VM {vm.name!r}'s disk already holds data: --force installs anew, keeping it "
            "as a backup"
        )
    what = f"Debian {spec.release}" if spec else "the edited script"
    start = time.monotonic()
    try:
        disk = cached_disk(script, f"installing {what} for {vm.name}")
    except ToolError as exc:
        paths.write_keeping_old(vm.install_script, script)
        land_in_shell(vm, vm.install_script, exc)
        tail = getattr(exc, "log_tail", "")
        raise type(exc)(f"{exc}; the script is {vm.install_script}", tail) from None
    notes = place(vm, disk, keep_old=holds_data)
    remember(vm, spec, script, time.monotonic() - start)
    return notes
