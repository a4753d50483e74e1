"""Real kernel builds from Debian's 6.12 source, booted under TCG.

The builds are cached by configuration in the user cache, so only the first run compiles
(about 5 minutes each on 2 cores).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from helpers import boot_bare, busybox_initramfs, qemubox, static_init_initramfs
from qemubox.kernel.requirements import REQUIRED

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="session")
def minimal_x86(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel-x86")
    r = qemubox("kernel", "build", "--kernel-version", "6.12", "-o", out, timeout=3000)
    assert r.code == 0, r.err[-3000:]
    return out


def test_build_installs_the_seed_layout(minimal_x86):
    manifest = json.loads((minimal_x86 / "manifest.json").read_text())
    release = manifest["version"]
    assert release.startswith("6.12.")
    assert manifest["arch"] == "x86_64" and manifest["profile"] == "minimal"
    assert manifest["fragments"] == ["sandbox", "x86_64", "vmcore"]
    assert manifest["source"] == "Debian linux-source-6.12"
    assert len(manifest["config_sha256"]) == 64 and manifest["build_seconds"] >= 0
    for name in (f"vmlinuz-{release}", f"config-{release}", f"System.map-{release}", "vmlinux"):
        assert (minimal_x86 / name).is_file(), name
    assert (minimal_x86 / "vmlinuz").resolve() == (minimal_x86 / f"vmlinuz-{release}")
    assert (minimal_x86 / "config").resolve() == (minimal_x86 / f"config-{release}")
    assert (minimal_x86 / "lib" / "modules" / release / "modules.order").exists()
    assert (minimal_x86 / "vmlinux").read_bytes()[:4] == b"\x7fELF"


@pytest.mark.qemu
def test_built_kernel_boots_and_reports_its_version(minimal_x86, tmp_path):
    manifest = json.loads((minimal_x86 / "manifest.json").read_text())
    initrd = tmp_path / "init.cpio"
    busybox_initramfs(
        initrd,
        textwrap.dedent("""\
        /bin/busybox mount -t proc proc /proc
        echo "UNAME=$(/bin/busybox uname -r) $(/bin/busybox uname -m)"
        /bin/busybox poweroff -f
    """),
    )
    console = boot_bare("x86_64", minimal_x86 / "vmlinuz", initrd)
    assert f"UNAME={manifest['version']} x86_64" in console, console[-2000:]


def test_kernel_check_passes_on_the_build(minimal_x86):
    r = qemubox("kernel", "check", minimal_x86)
    assert r.code == 0, r.out
    assert "✗" not in r.out
    assert r.out.count("✓") == sum(len(names) for names in REQUIRED.values())


def test_no_change_build_does_not_run_make(minimal_x86, tmp_path, monkeypatch):
    trap = tmp_path / "make"
    trap.write_text(f"#!/bin/sh\ntouch {tmp_path}/make-ran\nexit 1\n")
    trap.chmod(0o755)
    monkeypatch.setenv("QEMUBOX_MAKE", str(trap))
    r = qemubox("kernel", "build", "--kernel-version", "6.12", "-o", minimal_x86)
    assert r.code == 0, r.err
    assert "up to date, nothing to build" in r.err
    assert not (tmp_path / "make-ran").exists()
    # A different output directory gets the same kernel, still without make.
    other = tmp_path / "other"
    r = qemubox("kernel", "build", "-o", other)
    assert r.code == 0, r.err
    assert (other / "vmlinux").read_bytes() == (minimal_x86 / "vmlinux").read_bytes()
    assert not (tmp_path / "make-ran").exists()
    # vmlinux is a hard link into the cache (when on its file system); the config a copy.
    manifest = json.loads((other / "manifest.json").read_text())
    stored = Path(manifest["build_dir"]) / "vmlinux"
    same_fs = stored.stat().st_dev == other.stat().st_dev
    assert (other / "vmlinux").samefile(stored) == same_fs
    assert not (other / f"config-{manifest['version']}").samefile(
        Path(manifest["build_dir"]) / ".config"
    )


def test_unwritable_output_is_one_line(minimal_x86):
    r = qemubox("kernel", "build", "-o", "/proc/qemubox-kernel")
    assert r.code == 2
    assert r.err == "qemubox: error: /proc/qemubox-kernel: No such file or directory\n"


def test_kernel_list(minimal_x86):
    r = qemubox("kernel", "list", "--json")
    assert r.code == 0
    builds = json.loads(r.out)
    manifest = json.loads((minimal_x86 / "manifest.json").read_text())
    assert manifest["build_dir"] in [b["build_dir"] for b in builds]
    r = qemubox("kernel", "list")
    assert r.out.splitlines()[0].split() == ["VERSION", "ARCH", "PROFILE", "BUILT", "PATH"]
    assert manifest["version"] in r.out


def test_mismatch_stops_before_compiling(tmp_path, monkeypatch):
    trap = tmp_path / "make"
    # Configuration steps go to the real make; compiling would leave a trace.
    trap.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        case " $* " in *" vmlinux "*) touch {tmp_path}/compiled; exit 1;; esac
        exec make "$@"
    """)
    )
    trap.chmod(0o755)
    monkeypatch.setenv("QEMUBOX_MAKE", str(trap))
    r = qemubox(
        "kernel", "build", "--config-item", "# CONFIG_PCI is not set", "-o", tmp_path / "out"
    )
    assert r.code == 1
    assert "CONFIG_VIRTIO_PCI: wanted y, got n" in r.out
    assert "unmet dependency: depends on PCI" in r.out
    assert "nothing was compiled" in r.err
    assert not (tmp_path / "compiled").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.qemu
def test_doctor_on_a_real_config_and_a_real_boot_log(minimal_x86, tmp_path):
    config = tmp_path / "no9p.config"
    text = (minimal_x86 / "config").read_text()
    config.write_text(text.replace("CONFIG_9P_FS=y", "# CONFIG_9P_FS is not set"))
    r = qemubox("kernel", "doctor", config)
    assert r.code == 1
    assert '"Cannot mount 9p filesystem"' in r.out and "CONFIG_9P_FS=y" in r.out
    # Boot asking for a root disk that is not there: the kernel panics without a virtio disk.
    log = tmp_path / "boot.log"
    log.write_text(boot_bare("x86_64", minimal_x86 / "vmlinuz", append="root=/dev/vda"))
    assert "Unable to mount root fs" in log.read_text()
    r = qemubox("kernel", "doctor", "--boot-log", log)
    assert r.code == 1
    assert '"No virtio block device detected"' in r.out
    assert "Unable to mount root fs" in r.out


def test_menuconfig_saves_changes_as_a_fragment(tmp_path, monkeypatch):
    editor = tmp_path / "make"
    # Stands in for the interactive session: turns IPv6 off in the config it is given.
    editor.write_text(
        textwrap.dedent("""\
        #!/bin/bash
        if [[ " $* " == *" menuconfig "* ]]; then
            for a in "$@"; do [[ $a == O=* ]] && dir=${a#O=}; done
            sed -i 's/^CONFIG_IPV6=y/# CONFIG_IPV6 is not set/' "$dir/.config"
            exit 0
        fi
        exec make "$@"
    """)
    )
    editor.chmod(0o755)
    monkeypatch.setenv("QEMUBOX_MAKE", str(editor))
    r = qemubox("kernel", "menuconfig", "--save", tmp_path / "mine.config")
    assert r.code == 1  # IPv6 is required by the sandbox fragment
    assert "CONFIG_IPV6: wanted y, got n" in r.out
    saved = (tmp_path / "mine.config").read_text()
    assert "# CONFIG_IPV6 is not set\n" in saved


@pytest.mark.qemu
def test_arm64_cross_build_boots_on_virt(minimal_arm64, tmp_path):
    manifest = json.loads((minimal_arm64 / "manifest.json").read_text())
    assert manifest["arch"] == "arm64" and manifest["image"] == "arch/arm64/boot/Image"
    assert manifest["fragments"][:4] == ["sandbox", "arm64", "vmcore", "kunit"]
    source = tmp_path / "init.c"
    source.write_text(
        textwrap.dedent("""\
        #include <stdio.h>
        #include <sys/reboot.h>
        #include <sys/utsname.h>
        #include <unistd.h>
        int main(void) {
            struct utsname u;
            uname(&u);
            printf("UNAME=%s %s\\n", u.release, u.machine);
            fflush(stdout);
            sync();
            reboot(RB_POWER_OFF);
            return 0;
        }
    """)
    )
    gcc = shutil.which("aarch64-linux-gnu-gcc")
    assert gcc, "the arm64 build installs the cross compiler"
    subprocess.run([gcc, "-static", "-O2", "-o", tmp_path / "init", source], check=True)
    initrd = tmp_path / "init.cpio"
    static_init_initramfs(initrd, tmp_path / "init")
    console = boot_bare("arm64", minimal_arm64 / "vmlinuz", initrd, timeout=180)
    assert f"UNAME={manifest['version']} aarch64" in console, console[-2000:]


@pytest.mark.qemu
def test_arm64_sandbox_runs_commands(minimal_arm64, tmp_path):
    """The runtime is one arch-table row away from arm64: cross-compiled agent, Debian's
    arm64 busybox, the virt machine — under TCG on this host."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("from the host\n")
    r = qemubox(
        "run", "--kernel", minimal_arm64 / "vmlinuz", "-v", f"{share}:/mnt:ro", "--",
        "sh", "-c", "uname -m; cat /mnt/hello; exit 7",
        timeout=600,
    )  # fmt: skip
    assert (r.code, r.out) == (7, "aarch64\nfrom the host\n"), r.err[-2000:]


def test_an_unchanged_directory_source_is_not_configured_again(tmp_path, monkeypatch):
    """A directory source (no fingerprint: its tree is walked) keeps its resolved
    configuration while its Kconfig files and the fragments stay as they were."""
    import os

    from qemubox.kernel import build
    from qemubox.linux.tree import KernelTree

    tree = build.resolve_source("6.12", None).path
    source = build.Source(tree, "dir-test", str(tree), None)
    kconf = KernelTree.open(tree, tmp_path / "kconf", "x86_64")
    base, merged, _ = build.request_fragments(build.BuildRequest(), "x86_64")
    first = build._configure(source, kconf, merged, base, "key-1")
    assert "CONFIG_VIRTIO_CONSOLE=y" in first

    def configured(*args):
        raise AssertionError("configured again")

    monkeypatch.setattr(build, "apply_fragments", configured)
    assert build._configure(source, kconf, merged, base, "key-1") == first
    with pytest.raises(AssertionError, match="configured again"):  # other fragments
        build._configure(source, kconf, merged, base, "key-2")
    kconfig = tree / "drivers" / "virtio" / "Kconfig"
    st = kconfig.stat()
    os.utime(kconfig, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:  # an edited Kconfig file
        with pytest.raises(AssertionError, match="configured again"):
            build._configure(source, kconf, merged, base, "key-1")
    finally:
        os.utime(kconfig, ns=(st.st_atime_ns, st.st_mtime_ns))
