"""Shared test helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qemubox import arch as arches

# Every kernel the suite builds with `qemubox kernel build`, by the fixture of conftest.py
# that returns it: the build's options. Those the selected tests need are built in the
# background from the start of the run, in this order, in the idle scheduling class and the
# least-weighted scheduling group: with the CPU time nothing else wants (a test booting a
# TCG guest leaves a core free most of the time). A fixture then finds its kernel built, or
# waits on the builder's lock while it is finished. Modules run in the order of the last of
# these kernels they need, those needing none first.
BUILDS: dict[str, tuple[str, ...]] = {
    # qemubox's minimal kernel
    "kernel": (),
    # the debug profile (debug info, kallsyms) with the vm fragment and one module: for
    # vmcores, `vm run -k` (modules over 9p) and the matrix's second kernel, built once
    "debug_kernel": ("--profile", "debug", "-f", "vm", "--config-item", "CONFIG_ISO9660_FS=m"),
    # a cross build, with KUnit's example and list suites (the arm64 KUnit run's kernel)
    "minimal_arm64": ("--arch", "arm64", "-f", "kunit", "-f", "{kunitconfig}"),
    # Debian 12 has no riscv64 kernel
    "riscv64_kernel": ("--arch", "riscv64"),
}


# The suites the KUnit tests enable (the arm64 kernel the suite builds has them too).
KUNITCONFIG = "CONFIG_KUNIT_EXAMPLE_TEST=y\nCONFIG_LIST_KUNIT_TEST=y\n"


@dataclass
class Result:
    code: int
    out: str
    err: str


def as_at_a_terminal() -> None:
    """A child's ``preexec_fn``: Ctrl-C reaches it as it would at a terminal, whatever the
    test runner inherited (a runner started in the background ignores SIGINT, and so would
    its children)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def qemubox(*args: str, stdin: str = "", cwd=None, timeout: float = 600, env=None) -> Result:
    """Run the real command line in a subprocess, as a user would (``env``: variables on top
    of ours)."""
    proc = subprocess.run(
        [sys.executable, "-m", "qemubox", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return Result(proc.returncode, proc.stdout, proc.stderr)


def busybox_initramfs(path, script: str) -> None:
    """A tiny initramfs: static busybox, /dev/console, and /init running ``script``."""
    from qemubox.guest.cpio import CpioWriter

    with open(path, "wb") as fh:
        cpio = CpioWriter(fh)
        cpio.add_host_file("bin/busybox", Path("/bin/busybox"), 0o755)
        for d in ("proc", "sys", "dev", "tmp"):
            cpio.add_dir(d)
        cpio.add_char_device("dev/console", 5, 1)
        cpio.add_file("init", ("#!/bin/busybox sh\n" + script).encode(), 0o755)
        cpio.close()


def static_init_initramfs(path, init_binary) -> None:
    """A tiny initramfs whose /init is one static binary (for guests of another arch)."""
    from qemubox.guest.cpio import CpioWriter

    with open(path, "wb") as fh:
        cpio = CpioWriter(fh)
        cpio.add_char_device("dev/console", 5, 1)
        cpio.add_host_file("init", Path(init_binary), 0o755)
        cpio.close()


def boot_bare(arch, kernel, initrd=None, append="", timeout=120) -> str:
    """Boot a kernel under TCG with nothing but a serial console; returns the console text."""
    from qemubox.qemu.cmdline import bare_boot_args, host_tsc_khz

    khz = host_tsc_khz()  # see qemubox.qemu.cmdline.kernel_cmdline
    tsc = f"tsc_early_khz={khz}" if arch == "x86_64" and khz else ""
    line = " ".join(filter(None, [f"console={arches.get(arch).console}", "panic=-1", tsc, append]))
    args = bare_boot_args(arch, "tcg", kernel, line, "stdio", initrd=initrd)
    proc = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
    )
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def data_digest(path) -> str:
    """A digest of a file's bytes, as sha256 over the sha256 of each MiB: the same bytes
    give the same digest however the file system stores them, and the holes of a large
    sparse image are not read (a MiB with no data hashes as zeros)."""
    import hashlib

    step = 1 << 20
    zero = hashlib.sha256(bytes(step)).digest()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fd, end = fh.fileno(), os.fstat(fh.fileno()).st_size
        h.update(str(end).encode())
        for at in range(0, end, step):
            size = min(step, end - at)
            try:
                has_data = os.lseek(fd, at, os.SEEK_DATA) < at + size
            except OSError:  # only a hole from here to the end
                has_data = False
            if not has_data:
                h.update(zero if size == step else hashlib.sha256(bytes(size)).digest())
                continue
            fh.seek(at)
            h.update(hashlib.sha256(fh.read(size)).digest())
    return h.hexdigest()


def assert_sleeps(box) -> None:
    """A guest's sleep lasts its time: neither returning at once (a 32-bit user space
    whose time system calls the kernel lacks) nor never (a guest whose timer is lost)."""
    start = time.monotonic()
    r = box.exec(["sh", "-c", "sleep 1 && echo slept"], timeout=30)
    assert (r.exit_code, r.stdout) == (0, b"slept\n") and time.monotonic() - start >= 1


def wait_for(check, timeout: float = 20) -> bool:
    """Whether ``check()`` came true within ``timeout`` seconds (asked every 50 ms)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_clock_is_now(box, script: str = "date +%s") -> list[bytes]:
    """The guest's clock reads the host's time (within the second `date` truncates to) while
    the command runs, whatever time its snapshot or pool member was taken at; the window is
    the host's time before and after the call, so a slow emulated guest cannot fail it.
    Returns the lines the script printed; its last line is the guest's time."""
    before = time.time()
    lines = box.exec(["sh", "-c", script]).stdout.split()
    after = time.time()
    assert before - 1 <= int(lines[-1]) <= after + 1, (before, lines[-1], after)
    return lines


def borrowed_source_cache(tmp_path) -> tuple[Path, Path]:
    """A scratch cache that borrows the extracted 6.12 source from the user cache:
    (the source tree, the scratch cache)."""
    from qemubox.kernel.source import debian_source, source_cache

    src = debian_source("6.12")
    cache = tmp_path / "cache"
    (cache / "kernel-source").mkdir(parents=True)
    (cache / "kernel-source" / src.name).symlink_to(src)
    (cache / "kernel-source" / "hashes.json").write_text(
        (source_cache() / "hashes.json").read_text()
    )
    return src, cache


# make's stand-in, for tests of what surrounds a build: configuration goes to the real make;
# `vmlinux` hands over a real, bootable build ($REAL, of release $RELEASE).
STAND_IN_MAKE = """\
#!/bin/bash
for a in "$@"; do [[ $a == O=* ]] && out=${a#O=}; done
case " $* " in
  *" vmlinux "*)
    echo "$*" >> "$LOG"
    mkdir -p "$out/include/config"
    cp "$REAL/vmlinux" "$out/vmlinux"; cp "$REAL/System.map-$RELEASE" "$out/System.map"
    echo "$RELEASE" > "$out/include/config/kernel.release"; exit 0;;
  *" modules_install "*)
    mkdir -p "$INSTALL_MOD_PATH/lib/modules/$RELEASE"; exit 0;;
esac
exec make "$@"
"""


# --- a kernel tree's git history -----------------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Q",
    "GIT_AUTHOR_EMAIL": "q@example.com",
    "GIT_COMMITTER_NAME": "Q",
    "GIT_COMMITTER_EMAIL": "q@example.com",
}
BAD_BOOT_MESSAGE = "qemubox-bisect: a bad boot message"


def rewrite(path: Path, text: str) -> None:
    """A file of its own with ``text`` (a tree of hard links to the extracted source, which
    writing in place would change)."""
    path.unlink()
    path.write_text(text)


def git(tree: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(tree), *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **GIT_ENV},
    )
    return proc.stdout.strip()


def commit(tree: Path, message: str) -> str:
    git(tree, "commit", "-q", "-a", "-m", message)
    return git(tree, "rev-parse", "HEAD")
