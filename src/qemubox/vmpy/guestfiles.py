"""Files an installed guest gets from qemubox: the modules mounter (a host-built kernel's
modules over 9p), the ssh key handed in at every boot, host keys made at first boot."""

from __future__ import annotations

MODULES_SCRIPT = r"""#!/bin/sh
# qemubox-modules: the modules of a kernel booted with `qemubox vm run -k BUILD` come from
# the host's build directory, exported over 9p with the tag "modules".
#   start: mount them under /lib/modules/$(uname -r) and index them (depmod)
#   reload: index them again (after a rebuild on the host)
#   stop: unmount them
set -eu
release=$(uname -r)
dir=/lib/modules/$release

has_share() {
    for tag in /sys/bus/virtio/drivers/9pnet_virtio/virtio*/mount_tag; do
        [ -r "$tag" ] && [ "$(tr -d '\000' < "$tag")" = modules ] && return 0
    done
    return 1
}

case "${1:-start}" in
start)
    # Empty directories left by earlier kernels' mounts.
    find /lib/modules -mindepth 1 -maxdepth 1 -type d -empty -delete 2>/dev/null || true
    if [ -e "$dir/kernel" ] && ! mountpoint -q "$dir"; then
        exit 0  # this kernel's own modules are installed
    fi
    if ! has_share; then
        echo "qemubox-modules: no 9p share tagged 'modules'" >&2
        exit 0
    fi
    mkdir -p "$dir"
    mountpoint -q "$dir" || mount -t tmpfs -o mode=755,strictatime tmpfs "$dir"
    mkdir -p "$dir/build"
    if ! mountpoint -q "$dir/build"; then
        mount -t 9p -o trans=virtio,version=9p2000.L,ro modules "$dir/build"
    fi
    if [ -e "$dir/build/modules.dep" ]; then
        kernel=build/kernel  # an installed modules tree (qemubox kernel build -o DIR)
    else
        kernel=build  # a kernel build directory: modules sit beside their sources
    fi
    for f in modules.order modules.builtin modules.builtin.modinfo; do
        if [ -e "$dir/build/$f" ]; then ln -sfn "build/$f" "$dir/$f"; fi
    done
    ln -sfn "$kernel" "$dir/kernel"
    depmod "$release"
    ;;
reload)
    depmod "$release"
    ;;
stop)
    # Running programs keep depmod's index files mapped: those mounts go once unused.
    for m in "$dir/build" "$dir"; do
        if mountpoint -q "$m"; then umount "$m" 2>/dev/null || umount --lazy "$m"; fi
    done
    rmdir "$dir" 2>/dev/null || true
    ;;
*)
    echo "usage: qemubox-modules start|reload|stop" >&2
    exit 2
    ;;
esac
"""

MODULES_UNIT = """\
[Unit]
Description=Modules of a host-built kernel, over 9p (qemubox vm run -k)
DefaultDependencies=no
After=systemd-remount-fs.service
Before=sysinit.target systemd-modules-load.service systemd-udevd.service kmod-static-nodes.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/qemubox-modules start
ExecReload=/usr/local/sbin/qemubox-modules reload
ExecStop=/usr/local/sbin/qemubox-modules stop

[Install]
WantedBy=sysinit.target
"""

# The VM's ssh public key comes with every boot (QEMU's fw_cfg), so a cached install
# serves every VM and a re-created VM's new key works at once.
KEYS_NAME = "opt/qemubox/authorized_keys"
KEYS_SCRIPT = r"""#!/bin/sh
# qemubox-keys: authorize the ssh key qemubox hands the guest at boot (fw_cfg).
set -eu
user="$1"
modprobe qemu_fw_cfg 2>/dev/null || true
key=/sys/firmware/qemu_fw_cfg/by_name/opt/qemubox/authorized_keys/raw
[ -r "$key" ] || exit 0
home=$(getent passwd "$user" | cut -d: -f6)
keys="$home/.ssh/authorized_keys"
install -d -m 700 -o "$user" -g "$user" "$home/.ssh"
touch "$keys"
while IFS= read -r line; do
    grep -qxF "$line" "$keys" || printf '%s\n' "$line" >> "$keys"
done < "$key"
chown "$user:$user" "$keys"
chmod 600 "$keys"
"""

KEYS_UNIT = """\
[Unit]
Description=The ssh key qemubox hands the guest
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/qemubox-keys {user}

[Install]
WantedBy=multi-user.target
"""

# Host keys are made at first boot: a cached install must not give every VM the same ones.
HOST_KEYS_DROPIN = """\
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
"""

SERIAL_AUTOLOGIN = """\
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin {user} --keep-baud 115200,57600,38400,9600 - $TERM
"""

NETWORK = """\
[Match]
Name=en* eth*

[Network]
DHCP=yes
"""

# The guest agent (the one sandboxes boot with), for `vm exec` without ssh: udev starts it
# when `vm run`'s virtio-serial port appears, so a boot without that port has no failed unit.
AGENT_RULE = """\
SUBSYSTEM=="virtio-ports", ATTR{name}=="qemubox.agent.0-of-1", TAG+="systemd", \\
    ENV{SYSTEMD_WANTS}+="qemubox-agent.service"
"""

AGENT_UNIT = """\
[Unit]
Description=qemubox guest agent (qemubox vm exec)

[Service]
ExecStart=/usr/local/sbin/qemubox-agent
Restart=on-failure
"""
