"""A running sandbox: QEMU, its QMP monitor, the guest agent, disks and shares."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qemubox.errors import InputError, QemuboxError
from qemubox.kernel.tree import host_arch
from qemubox.sandbox import guest, qemu
from qemubox.sandbox.accel import choose_accel
from qemubox.sandbox.agent import AgentClient, AgentGone, GuestError, exec_exit_code
from qemubox.sandbox.kernels import GuestKernel, choose_kernel
from qemubox.sandbox.spec import Session, ValidDisk, parse_size

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TERM": "dumb",
    "LANG": "C.UTF-8",
}
MS_RDONLY = 1
CONSOLE_TAIL_LINES = 30


# --- errors -----------------------------------------------------------------------------------


class SandboxError(QemuboxError):
    """The sandbox itself failed; ``console_tail`` holds the guest console's last lines."""

    exit_code = 125

    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(message)
        self.console_tail = console_tail


class KernelError(SandboxError):
    """The kernel or QEMU could not be started."""

    exit_code = 125


class BootError(SandboxError):
    """The guest never reached the agent within the boot timeout."""

    exit_code = 121


class KernelPanic(SandboxError):
    exit_code = 122


class VMDied(SandboxError):
    """QEMU exited while the sandbox was in use."""

    exit_code = 123


class AccelWarning(UserWarning):
    pass


@dataclass
class ExecResult:
    exit_code: int  # 128+N when killed by signal N
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    timed_out: bool = False


# --- helpers ----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the QEMU child: be killed when the process that started us dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent already died between fork and prctl
        os._exit(1)


def _runtime_root() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) if base and os.path.isdir(base) else Path(tempfile.gettempdir())


def _sweep_stale_dirs(root: Path) -> None:
    """Remove runtime directories whose owning process is gone (killed without cleanup)."""
    for stale in root.glob("qemubox-*"):
        try:
            pid = int((stale / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_disk(disk: ValidDisk, path: Path) -> None:
    """A new ext4 image of the disk's size (never called on an existing file)."""
    with open(path, "xb") as fh:
        fh.truncate(disk.size)
    proc = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        path.unlink(missing_ok=True)
        raise InputError(f"mkfs.ext4 {path} failed: {proc.stderr.strip()}")


def _is_ext4(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(1024 + 0x38)  # the superblock's magic
        return fh.read(2) == b"\x53\xef"


def _prepare_disk(disk: ValidDisk, path: Path) -> None:
    """Make a missing disk; an existing one is used as it is, and must be ext4."""
    if not path.exists():
        _make_disk(disk, path)
    elif not _is_ext4(path):
        raise InputError(
            f"disk {path} exists but is not an ext4 image; qemubox never reformats an existing disk"
        )


def _listen(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


# --- the sandbox ------------------------------------------------------------------------------


class Sandbox:
    """A VM booted for commands. Use as a context manager, or call start() and close()."""

    def __init__(self, session: Session | None = None, **kw) -> None:
        self.session = session or Session(**kw)
        self.spec = self.session.validate()
        self.kernel: GuestKernel | None = None
        self.accel = ""
        self.dir: Path | None = None
        self.ports: list[tuple[int, int]] = []
        self.qemu_args: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._agent: AgentClient | None = None
        self._qmp = None
        self._qmp_socket: Path | None = None
        self._qmp_lock = threading.Lock()
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def console_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "console.log"

    def features(self) -> set[str]:
        s = self.spec
        return {
            name
            for name, on in (
                ("disks", s.disks),
                ("shares", s.shares),
                ("network", s.network != "none"),
                ("balloon", s.balloon),
            )
            if on
        }

    def prepare(self, dry_run: bool = False) -> qemu.VMConfig:
        """Everything up to the QEMU command line: kernel, initramfs, disks, ports.

        With ``dry_run`` no disk is created and no KVM probe boots anything."""
        s = self.spec
        self.kernel = choose_kernel(s.kernel, s.modules)
        initrd = guest.initramfs(self.kernel, self.features())
        root = _runtime_root()
        _sweep_stale_dirs(root)
        self.dir = Path(tempfile.mkdtemp(prefix="qemubox-", dir=root))
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        disks = []
        for i, disk in enumerate(s.disks):
            path = disk.path or self.dir / f"disk{i}.img"
            if not dry_run:
                _prepare_disk(disk, path)
            disks.append(qemu.DiskDevice(path, disk.serial))
        self.ports = [(host or _free_port(), guest_port) for host, guest_port in s.ports]
        binary = qemu.QEMU_BINARY[self.kernel.arch]
        if shutil.which(binary) is None:
            raise KernelError(f"{binary} is not installed (apt-get install qemu-system-x86)")
        choice = choose_accel(
            s.accel, binary, self.kernel.image, self.kernel.arch, host_arch(), probe=not dry_run
        )
        if choice.reason:
            warnings.warn(
                f"using TCG (software emulation): {choice.reason}", AccelWarning, stacklevel=3
            )
        self.accel = choice.accel
        machine = "microvm" if self.kernel.supports_microvm() else "q35"
        return qemu.VMConfig(
            arch=self.kernel.arch,
            machine=machine,
            accel=choice.accel,
            cpus=s.cpus,
            memory_mib=s.memory >> 20,
            kernel=self.kernel.image,
            initrd=initrd,
            append=qemu.kernel_cmdline(self.kernel.arch, choice.accel, qemu.host_tsc_khz()),
            qmp_socket=self.dir / "qmp.sock",
            agent_socket=self.dir / "agent.sock",
            console_log=self.dir / "console.log",
            shares=tuple(
                qemu.ShareDevice(sh.tag, sh.host_path, sh.read_only, sh.security_model)
                for sh in s.shares
            ),
            disks=tuple(disks),
            network=s.network,
            forwards=tuple(self.ports),
            balloon=s.balloon,
        )

    def start(self) -> Sandbox:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        cfg = self.prepare()
        assert self.dir is not None
        agent_listener = _listen(cfg.agent_socket)
        self._qmp_socket = cfg.qmp_socket
        self.qemu_args = qemu.qemu_args(cfg)
        with open(self.dir / "qemu.log", "wb") as log:
            self._proc = subprocess.Popen(
                self.qemu_args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + self.spec.boot_timeout
        agent_sock = self._accept(agent_listener, deadline)
        agent_listener.close()
        self._agent = AgentClient(agent_sock)
        while not self._agent.ready.wait(0.05):
            self._check_alive("while booting")
            if time.monotonic() > deadline:
                raise BootError(
                    f"the guest did not start within {self.spec.boot_timeout:.0f} s",
                    self.console_tail(),
                )
        if self._agent.closed:
            self._check_alive("while booting")
            raise BootError("the guest agent hung up while booting", self.console_tail())
        self._setup()

    def _accept(self, listener: socket.socket, deadline: float) -> socket.socket:
        while True:
            ready, _, _ = select.select([listener], [], [], 0.05)
            if ready:
                conn, _ = listener.accept()
                return conn
            self._check_alive("while starting")
            if time.monotonic() > deadline:
                raise BootError("QEMU did not connect its sockets", self.console_tail())

    def _setup(self) -> None:
        """Mount disks and shares, configure the network: steps the agent performs after
        boot (so a saved, booted guest can later be pointed at other disks and shares)."""
        agent = self._agent
        assert agent is not None
        for disk in self.spec.disks:
            agent.mount(f"serial:{disk.serial}", disk.mount_point, "ext4")
        for share in self.spec.shares:
            options = "trans=virtio,version=9p2000.L,msize=524288,cache=none"
            agent.mount(
                share.tag, share.mount_point, "9p", options, MS_RDONLY if share.read_only else 0
            )
        if self.spec.network != "none":
            r = self.exec(
                [
                    "sh",
                    "-c",
                    f"ip link set eth0 up && ip addr add {qemu.GUEST_IP}/24 "
                    f"dev eth0 && ip route add default via {qemu.GATEWAY}",
                ],
                timeout=30,
            )
            if r.exit_code != 0:
                raise SandboxError(
                    f"network setup failed: {r.stderr.decode().strip()}", self.console_tail()
                )

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        if self.dir is None or not self.console_path.exists():
            return ""
        text = self.console_path.read_bytes()[-65536:].decode(errors="replace")
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def _qemu_log(self) -> str:
        if self.dir is None:
            return ""
        with contextlib.suppress(OSError):
            return (self.dir / "qemu.log").read_text(errors="replace").strip()
        return ""

    def _check_alive(self, when: str) -> None:
        """Raise the right error if QEMU has exited."""
        if self._proc is None or self._proc.poll() is None:
            return
        tail = self.console_tail()
        if "Kernel panic" in tail:
            line = next(ln for ln in tail.splitlines() if "Kernel panic" in ln)
            raise KernelPanic(line[line.index("Kernel panic") :].strip(), tail)
        qemu_says = self._qemu_log().splitlines()
        if not tail and qemu_says:
            raise KernelError(f"QEMU failed: {qemu_says[-1]}", tail)
        raise VMDied(f"the VM stopped {when} (QEMU exit status {self._proc.returncode})", tail)

    def close(self) -> None:
        """Power the guest off (syncing its disks), stop QEMU, remove the runtime files."""
        if self._closed:
            return
        self._closed = True
        if (
            self._agent is not None
            and not self._agent.closed
            and self._proc is not None
            and self._proc.poll() is None
        ):
            with contextlib.suppress(AgentGone, TimeoutError, GuestError):
                self._agent.poweroff(timeout=5)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=5)
        if self._agent is not None:
            self._agent.close()
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
        if self.dir is not None:
            if self.spec.console_log and self.console_path.exists():
                with contextlib.suppress(OSError):
                    shutil.copyfile(self.console_path, self.spec.console_log)
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # --- commands -----------------------------------------------------------------------------

    def exec(
        self,
        argv: Sequence[str | bytes],
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
        stdin: bytes | None = None,
        timeout: float | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        stdin_stream=None,
    ) -> ExecResult:
        """Run argv in the guest; returns its exit code and output.

        Output goes to ``on_stdout``/``on_stderr`` as it comes when given (and is then not
        kept). ``stdin`` is fed and closed; ``stdin_stream`` (a binary file) is forwarded as
        it is read. On ``timeout`` (default: the session's) the command's process group is
        killed and ``timed_out`` is set.
        """
        if self._agent is None or self._closed:
            raise SandboxError("the sandbox is not running")
        if not argv:
            raise InputError("exec needs a command")
        timeout = self.spec.timeout if timeout is None else timeout
        full_env = {**DEFAULT_ENV, **(env or {})}
        with_stdin = stdin is not None or stdin_stream is not None
        try:
            ident, pending = self._agent.start(
                argv, full_env, cwd, with_stdin, on_stdout, on_stderr
            )
            if stdin_stream is not None:
                threading.Thread(
                    target=self._pump_stdin, args=(ident, stdin_stream), daemon=True
                ).start()
            elif stdin is not None:
                if stdin:
                    self._agent.write_stdin(ident, stdin)
                self._agent.close_stdin(ident)
            timed_out = False
            if not self._agent.wait(ident, pending, timeout):
                timed_out = True
                self._agent.signal(ident, signal.SIGKILL)
                if not self._agent.wait(ident, pending, 10):
                    raise SandboxError(
                        "the guest did not stop a timed-out command", self.console_tail()
                    )
        except GuestError as err:
            message = f"qemubox: {err}\n".encode()
            if on_stderr:
                on_stderr(message)
            return ExecResult(exec_exit_code(err), b"", b"" if on_stderr else message)
        except AgentGone:
            self._wait_for_exit()
            self._check_alive("while running a command")
            raise VMDied("the guest agent went away", self.console_tail()) from None
        kind, value = pending.status or (0, 0)
        sig = value if kind == 1 else None
        return ExecResult(
            128 + value if kind == 1 else value,
            b"".join(pending.stdout),
            b"".join(pending.stderr),
            sig,
            timed_out,
        )

    def _pump_stdin(self, ident: int, stream) -> None:
        assert self._agent is not None
        with contextlib.suppress(AgentGone, OSError, ValueError):
            while True:
                chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
                if not chunk:
                    break
                self._agent.write_stdin(ident, chunk)
            self._agent.close_stdin(ident)

    def _wait_for_exit(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        r = self.exec(
            ["sh", "-c", 'cat > "$1" && chmod "$2" "$1"', "sh", path, f"{mode:o}"], stdin=data
        )
        if r.exit_code != 0:
            raise SandboxError(
                f"cannot write {path} in the guest: {r.stderr.decode(errors='replace').strip()}"
            )

    def read_file(self, path: str) -> bytes:
        r = self.exec(["cat", "--", path])
        if r.exit_code != 0:
            raise SandboxError(
                f"cannot read {path} in the guest: {r.stderr.decode(errors='replace').strip()}"
            )
        return r.stdout

    # --- memory (virtio-balloon over QMP) -------------------------------------------------------

    def _qmp_cmd(self, name: str, **args):
        """A QMP command; the monitor is connected on first use (QEMU listens on it)."""
        if self._proc is None or self._closed:
            raise SandboxError("the sandbox is not running")
        with self._qmp_lock:
            if self._qmp is None:
                from qemu.qmp.legacy import QEMUMonitorProtocol

                self._qmp = QEMUMonitorProtocol(str(self._qmp_socket))
                self._qmp.connect(negotiate=True)
            return self._qmp.cmd(name, **args)

    def set_memory(self, size: str | int) -> None:
        """Ask the guest to give memory back (or take it again) through the balloon."""
        if not self.spec.balloon:
            raise InputError("set_memory needs a session with balloon=True")
        target = parse_size(size, "memory")
        if target > self.spec.memory:
            raise InputError(f"cannot grow memory beyond the session's {self.spec.memory >> 20}M")
        self._qmp_cmd("balloon", value=target)

    def memory(self) -> int:
        """The guest's current memory in bytes, as the balloon reports it."""
        if not self.spec.balloon:
            return self.spec.memory
        return int(self._qmp_cmd("query-balloon")["actual"])
