"""A sandbox: a machine booted for commands, with the session's shares, disks and network
set up after boot."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from qemubox import paths
from qemubox.errors import (  # noqa: F401 - the sandbox's errors, importable from here
    BootError,
    GuestError,
    HostIOError,
    InputError,
    KernelError,
    KernelPanic,
    ProtocolViolation,
    SandboxError,
    TimedOut,
    VMDied,
)
from qemubox.guest.client import AgentClient, AgentGone, SendTimeout, exec_exit_code
from qemubox.guest.protocol import own_shell
from qemubox.model.net import DNS, GATEWAY, GUEST_IP, PREFIX
from qemubox.model.plan import KernelPlan, MachinePlan, SnapshotPlan
from qemubox.model.session import ValidSession
from qemubox.model.size import parse_size
from qemubox.qemu.accel import tcg_warning
from qemubox.qemu.cmdline import qemu_args
from qemubox.sandbox.spec import Session
from qemubox.vm import pool, prepare, snapshot
from qemubox.vm.machine import Machine, State

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TERM": "dumb",
    "LANG": "C.UTF-8",
}
MS_RDONLY = 1
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288,cache=none"
KILL_GRACE = 3  # seconds a killed command has to report its end


def random_mac() -> str:
    """A locally administered unicast MAC address, random."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


class AccelWarning(UserWarning):
    pass


class SnapshotWarning(UserWarning):
    """A snapshot could not be recorded or restored: the sandbox booted instead."""


@dataclass
class ExecResult:
    exit_code: int  # 128+N when killed by signal N
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    timed_out: bool = False
    truncated: bool = False  # output past max_output was dropped


class Sandbox:
    """A VM booted for commands. Use as a context manager, or call start() and close()."""

    _claim: tuple[SnapshotPlan, int] | None = None  # while recording its key's snapshot
    _pooled: MachinePlan | None = None  # the plan it took a pool's member for

    def __init__(self, session: Session | None = None, **kw) -> None:
        self.session = session or Session(**kw)
        self.spec: ValidSession | None = self.session.validate()
        self.plan: MachinePlan | None = None
        self.machine: Machine | None = None
        self.name: str | None = None  # a named sandbox's
        self._terminals: set[int] = set()  # ids of running tty commands
        self._closed = False
        # Where the time went: (phase, seconds), in order (see phase()).
        self.timings: list[tuple[str, float]] = []
        self._since = time.monotonic()

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def make_plan(self, dry_run: bool = False) -> MachinePlan:
        """The machine plan (pure data) for this session. With ``dry_run`` nothing is
        fetched, probed, compiled or created."""
        machine_id = paths.new_machine_id()
        self.plan = prepare.plan_session(
            self.spec, paths.machine_runtime_dir(machine_id), dry_run=dry_run
        )
        return self.plan

    def start(self, detach: bool = False) -> Sandbox:
        """Boot; returns when the guest is ready. With ``detach`` the VM does not die with
        this process: :meth:`detach` then leaves it running for :meth:`attach`. A sandbox
        already started is returned as it is (``with`` on one started by a pool, say)."""
        if self.machine is not None and not self._closed:
            return self
        if self._closed:
            raise SandboxError("this sandbox was closed: make another")
        try:
            self._start(detach)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, detach: bool) -> None:
        self._launch(detach)
        self._get_ready()

    def phase(self, name: str) -> None:
        """Close the current phase of :attr:`timings` as ``name``."""
        now = time.monotonic()
        self.timings.append((name, now - self._since))
        self._since = now

    def _launch(self, detach: bool, idle: int = 0, on_idle: str = "") -> None:
        """Plan, make what the plan needs, start QEMU (see :meth:`Machine.launch`) — from a
        snapshot when the session asks and allows it; a snapshot that cannot be restored is
        dropped and the machine boots."""
        for use_snapshot in (self.spec.snapshot, False):
            plan = self.make_plan()
            with Machine.runtime_dir(plan) as alive_lock:
                plan = self.plan = prepare.realize(plan)
                first = use_snapshot == self.spec.snapshot
                if plan.accel_note and first:  # said once the VM is sure to start
                    warnings.warn(
                        tcg_warning(plan.accel_note),
                        AccelWarning,
                        stacklevel=5,
                    )
                if use_snapshot:
                    plan = self.plan = self._with_snapshot(plan)
                member = self._from_pool(plan) if use_snapshot and not detach else None
                if member is not None:  # a QEMU started ahead, waiting for this snapshot
                    shutil.rmtree(plan.runtime_dir, ignore_errors=True)
                    self.machine, plan = member, member.plan
                    self.plan = plan
                    self.phase("prepare")
                else:
                    snapshot.seed_console(plan)
                    self.phase("prepare")
                    self.machine = Machine.launch(plan, alive_lock, detach, idle, on_idle)
            self.phase("taken from the pool" if member is not None else "QEMU start")
            if member is not None or plan.snapshot is None or plan.snapshot.role == "record":
                return  # a member is restored already
            try:
                snapshot.load(plan, alive=self.machine.alive)
                self.phase("restore")
                return
            except snapshot.SnapshotError as err:
                self.machine.kill()
                self.machine.stop(1)
                self.machine = None
                snapshot.remove(plan.snapshot.key)
                warnings.warn(f"{err}; booting instead", SnapshotWarning, stacklevel=5)

    def _from_pool(self, plan: MachinePlan) -> Machine | None:
        """A machine of the warm pool for ``plan``, if one waits (see vm/pool.py)."""
        if not pool.fits(plan):
            return None
        member = pool.take(plan)
        if member is not None:
            self._pooled = plan
        return member

    def _with_snapshot(self, plan: MachinePlan) -> MachinePlan:
        """The plan restoring its snapshot, or, when there is none yet, recording it (see
        :meth:`_record`); unchanged when the session cannot be held in one, or another
        process is recording it now."""
        if snapshot.unfit(plan):
            return plan
        try:
            k = snapshot.key(plan)
            found = snapshot.find(plan, k)
            if found is None:
                self._claim = snapshot.claim(plan, k)
                found = self._claim[0] if self._claim else None
        except OSError as err:
            warnings.warn(f"no snapshot recorded: {err}", SnapshotWarning, stacklevel=6)
            return plan
        return replace(plan, snapshot=found)

    def _get_ready(self) -> None:
        """Wait for the guest, set it up; a detached one then outlives us."""
        assert self.machine is not None and self.spec is not None
        agent = self.machine.attach(self.spec.boot_timeout)
        role = self.plan.snapshot.role if self.plan and self.plan.snapshot else None
        if role == "restore":
            self.phase("agent ready")
            agent.renew()  # a clone's own clock and randomness, before anything runs
        else:
            self.phase("kernel boot to agent ready")
        if role == "record":
            self._record()
        self._setup()
        self.phase("session setup")
        if self.machine.detached:
            self.machine.release()

    def _record(self) -> None:
        """Save the freshly booted machine as its key's snapshot, then go on with it."""
        assert self.machine is not None and self._claim is not None
        self.machine.hang_up()  # the snapshot holds no client
        try:
            snapshot.take(self.machine, self._claim[0])
        except snapshot.SnapshotError as err:
            warnings.warn(str(err), SnapshotWarning, stacklevel=6)
        finally:
            self._drop_claim()
        self.machine.reconnect(self.spec.boot_timeout)
        self.phase("record the snapshot")

    def _drop_claim(self) -> None:
        if self._claim is not None:
            claim, self._claim = self._claim, None
            snapshot.release(claim)

    def _setup(self) -> None:
        """Mount disks and shares, configure the network: steps the agent performs after
        boot (so a saved, booted guest can later be pointed at other disks and shares)."""
        agent = self._agent()
        assert self.plan is not None
        try:
            for disk in self.plan.disks:
                agent.mount(f"serial:{disk.serial}", disk.mount_point, "ext4")
            for share in self.plan.shares:
                flags = MS_RDONLY if share.read_only else 0
                if share.fs == "virtiofs":
                    agent.mount(share.tag, share.mount_point, "virtiofs", "", flags)
                else:
                    agent.mount(share.tag, share.mount_point, "9p", NINEP_OPTIONS, flags)
        except GuestError as err:
            raise SandboxError(f"the guest cannot mount: {err}", self.console_tail()) from None
        if self.plan.network != "none":
            # A MAC of its own: clones of one snapshot would otherwise share the template's.
            script = (
                f"ip link set eth0 address {random_mac()} && "
                f"ip link set eth0 up && ip addr add {GUEST_IP}/{PREFIX} "
                f"dev eth0 && ip route add default via {GATEWAY}"
            )
            if self.plan.root.kind == "share":  # the host's resolver is not the guest's
                script += f" && rm -f /etc/resolv.conf && echo nameserver {DNS} > /etc/resolv.conf"
            r = self.exec(own_shell(script), timeout=30)
            if r.exit_code != 0:
                raise SandboxError(
                    f"network setup failed: {r.stderr.decode().strip()}", self.console_tail()
                )

    def detach(self) -> str:
        """Leave the VM running (it must have been started with ``detach=True``, or be
        named); returns its name or id, for :meth:`attach` from any process."""
        if self.machine is None or not self.machine.detached:
            raise SandboxError("only a sandbox started with detach=True can be left running")
        self._leave()
        return self.name or self.machine.id

    @classmethod
    def attach(cls, name: str, timeout: float = 10) -> Sandbox:
        """A sandbox for a VM that another process (or this one) left running: a named
        sandbox's name, or the id :meth:`detach` returned."""
        from qemubox.sandbox import named

        if named.SANDBOXES.exists(name):
            return named.attach(name, timeout)
        machine_id = name
        machine = Machine.open(machine_id)
        if machine.state is not State.RUNNING:
            raise SandboxError(f"sandbox {machine_id} is {machine.state.value}")
        machine.attach(timeout)
        box = cls.__new__(cls)  # no session: the machine's plan says what it is
        box.session, box.spec = None, None
        box.plan, box.machine, box._closed = machine.plan, machine, False
        box.name, box._terminals = None, set()
        return box

    # --- named sandboxes ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        session: Session | None = None,
        ttl: float | None = None,
    ) -> Sandbox:
        """Make the named sandbox ``name`` and start it; it lives on after this process
        (:meth:`detach` to leave it, :meth:`stop` to power it off, :meth:`remove` to
        delete it). ``ttl``: stop it after that many seconds with no client."""
        from qemubox.sandbox import named

        return named.create(name, session or Session(), ttl)

    @staticmethod
    def list() -> list:
        """The named sandboxes, as :class:`qemubox.sandbox.named.Status` records."""
        from qemubox.sandbox import named

        return named.list_all()

    def stop(self, timeout: float = 10) -> None:
        """Power a named sandbox off (it can be started again); any other sandbox is
        closed."""
        if self.name is None:
            self.close()
            return
        from qemubox.sandbox import named

        self._leave()
        named.stop(self.name, timeout)

    def remove(self, force: bool = False) -> None:
        """Delete a named sandbox: stopped first, or killed with ``force``."""
        if self.name is None:
            raise SandboxError("only a named sandbox can be removed")
        from qemubox.sandbox import named

        self._leave()
        if not force:
            named.stop(self.name)
        named.remove(self.name, force)

    def _leave(self) -> None:
        if self.machine is not None and not self._closed:
            self.machine.detach()
        self._closed = True

    def close(self) -> None:
        """Power the guest off (syncing its disks), stop QEMU, remove the runtime files;
        a guest that holds nothing the host keeps (no disk with a path, no writable share)
        has nothing to sync, and its QEMU is killed at once. A named sandbox is left
        running (:meth:`stop` powers it off)."""
        self._drop_claim()
        if self._pooled is not None:  # another member takes the one we took's place
            plan, self._pooled = self._pooled, None
            threading.Thread(target=pool.top_up, args=(plan,), daemon=False).start()
        if self.name is not None:
            self._leave()
            return
        if self._closed:
            return
        self._closed = True
        if self.machine is None:
            return
        self.machine.stop(console_to=self.spec.console_log if self.spec else None)
        self._raise_host_io(self.machine.io_errors)

    def _raise_host_io(self, errors: list[str]) -> None:
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise HostIOError(errors[0] + more, self.console_tail())

    # --- what the first API offered -------------------------------------------------------------

    @property
    def id(self) -> str | None:
        return self.machine.id if self.machine else None

    @property
    def state(self) -> State | None:
        return self.machine.state if self.machine else None

    @property
    def pid(self) -> int | None:
        return self.machine.pid if self.machine else None

    @property
    def kernel(self) -> KernelPlan | None:
        """The kernel the machine boots (as its plan records it)."""
        return self.plan.kernel if self.plan else None

    @property
    def accel(self) -> str:
        return self.plan.accel if self.plan else ""

    @property
    def qemu_args(self) -> list[str]:
        return qemu_args(self.plan) if self.plan else []

    @property
    def dir(self) -> Path | None:
        return Path(self.plan.runtime_dir) if self.plan else None

    @property
    def ports(self) -> list[tuple[int, int]]:
        return [(p.host, p.guest) for p in self.plan.ports] if self.plan else []

    def console_tail(self) -> str:
        return self.machine.console_tail() if self.machine else ""

    def _agent(self) -> AgentClient:
        if self.machine is None or self.machine.agent is None or self._closed:
            raise SandboxError("the sandbox is not running")
        return self.machine.agent

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
        max_output: int | None = None,
        tty: tuple[int, int] | None = None,
    ) -> ExecResult:
        """Run argv in the guest; returns its exit code and output.

        Output goes to ``on_stdout``/``on_stderr`` as it comes when given (and is then not
        kept); otherwise it is kept, up to ``max_output`` bytes when given (the result then
        says ``truncated``). ``stdin`` is fed and closed; ``stdin_stream`` (a binary file)
        is forwarded as it is read, at the pace the command reads it. On ``timeout``
        (default: the session's) the command's process group is killed and ``timed_out``
        is set. With ``tty`` (rows, columns) the command runs on a pseudo-terminal of that
        size: its stdin, stdout and stderr are the terminal (all output comes as stdout;
        :meth:`resize_terminals` changes the size).
        """
        agent = self._agent()
        if not argv:
            raise InputError("exec needs a command")
        if timeout is None and self.spec is not None:
            timeout = self.spec.timeout
        full_env = {**DEFAULT_ENV, **(env or {})}
        with_stdin = stdin is not None or stdin_stream is not None or tty is not None
        stop_pump = threading.Event()
        ident = -1
        try:
            try:
                ident, pend = agent.start(
                    argv, full_env, cwd, with_stdin, on_stdout, on_stderr, max_output, tty
                )
            except ValueError as err:
                raise InputError(str(err)) from None
            if tty is not None:
                self._terminals.add(ident)
            if stdin_stream is not None:
                threading.Thread(
                    target=self._pump_stdin,
                    args=(agent, ident, pend, stdin_stream, stop_pump),
                    daemon=True,
                ).start()
            elif stdin is not None:
                threading.Thread(
                    target=self._feed_stdin,
                    args=(agent, ident, pend, stdin, stop_pump),
                    daemon=True,
                ).start()
            timed_out = False
            if not agent.wait(ident, pend, timeout):
                timed_out = True
                stop_pump.set()
                self._kill_command(agent, ident, pend)
        except GuestError as err:
            message = f"qemubox: {err}\n".encode()
            if on_stderr:
                on_stderr(message)
            return ExecResult(exec_exit_code(err), b"", b"" if on_stderr else message)
        except ProtocolViolation as err:
            self._fail()
            raise ProtocolViolation(
                f"protocol violation by the guest: {err}", self.console_tail()
            ) from None
        except AgentGone:
            self._wait_for_exit()
            assert self.machine is not None
            self.machine.check_alive("while running a command")
            raise VMDied("the guest agent went away", self.console_tail()) from None
        finally:
            stop_pump.set()
            self._terminals.discard(ident)
        assert self.machine is not None
        self._raise_host_io(self.machine.host_io_errors())
        status = pend.status
        assert status is not None
        return ExecResult(
            status.code,
            b"".join(pend.stdout),
            b"".join(pend.stderr),
            status.signal,
            timed_out,
            pend.truncated,
        )

    def resize_terminals(self, rows: int, columns: int) -> None:
        """Give the terminals of this client's running ``tty`` commands a new size."""
        agent = self._agent()
        for ident in list(self._terminals):
            with contextlib.suppress(SendTimeout, AgentGone):
                agent.resize(ident, rows, columns)

    def _kill_command(self, agent: AgentClient, ident: int, pend) -> None:
        """SIGKILL a timed-out command; a guest that does not let it go within seconds (it
        stopped reading its port, say) loses the VM."""
        try:
            agent.signal(ident, signal.SIGKILL, timeout=2)
            if agent.wait(ident, pend, KILL_GRACE):
                return
        except (SendTimeout, TimeoutError):
            pass
        self._fail()
        raise TimedOut(
            "the command timed out and the guest did not end it; the VM was stopped",
            self.console_tail(),
        )

    def _fail(self) -> None:
        """Stop a VM that can no longer be trusted to answer."""
        if self.machine is not None:
            with contextlib.suppress(Exception):
                self.machine.kill()

    @staticmethod
    def _feed_stdin(agent: AgentClient, ident: int, pend, data: bytes, stop) -> None:
        with contextlib.suppress(AgentGone, OSError, SendTimeout):
            if agent.write_stdin(ident, pend, data, stop):
                agent.close_stdin(ident)

    @staticmethod
    def _pump_stdin(agent: AgentClient, ident: int, pend, stream, stop) -> None:
        with contextlib.suppress(AgentGone, OSError, ValueError, SendTimeout):
            while not stop.is_set():
                chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
                if not chunk:
                    agent.close_stdin(ident)
                    return
                if not agent.write_stdin(ident, pend, chunk, stop):
                    return

    def _wait_for_exit(self) -> None:
        if self.machine is not None:
            self.machine.wait_gone(5)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        r = self.exec(own_shell('cat > "$1" && chmod "$2" "$1"', path, f"{mode:o}"), stdin=data)
        if r.exit_code != 0:
            raise SandboxError(
                f"cannot write {path} in the guest: {r.stderr.decode(errors='replace').strip()}"
            )

    def read_file(self, path: str) -> bytes:
        r = self.exec(own_shell('cat -- "$1"', path))
        if r.exit_code != 0:
            raise SandboxError(
                f"cannot read {path} in the guest: {r.stderr.decode(errors='replace').strip()}"
            )
        return r.stdout

    # --- memory (virtio-balloon over QMP) -------------------------------------------------------

    def _qmp_cmd(self, name: str, **args):
        if self.machine is None or self._closed:
            raise SandboxError("the sandbox is not running")
        return self.machine.monitor().command(name, **args)

    def set_memory(self, size: str | int) -> None:
        """Ask the guest to give memory back (or take it again) through the balloon."""
        assert self.plan is not None
        if not self.plan.balloon:
            raise InputError("set_memory needs a session with balloon=True")
        target = parse_size(size, "memory")
        if target > self.plan.memory_mib << 20:
            raise InputError(f"cannot grow memory beyond the session's {self.plan.memory_mib}M")
        self._qmp_cmd("balloon", value=target)

    def memory(self) -> int:
        """The guest's current memory in bytes, as the balloon reports it."""
        assert self.plan is not None
        if not self.plan.balloon:
            return self.plan.memory_mib << 20
        return int(self._qmp_cmd("query-balloon")["actual"])

    def wait_memory(self, at_most: int, timeout: float = 30) -> int:
        """Wait for the balloon to bring the guest to ``at_most`` bytes (QMP's
        BALLOON_CHANGE events); returns the last size reported."""
        monitor = self.machine.monitor() if self.machine else None
        if monitor is None:
            raise SandboxError("the sandbox is not running")
        actual = self.memory()
        deadline = time.monotonic() + timeout
        while actual > at_most and (left := deadline - time.monotonic()) > 0:
            event = monitor.wait_event({"BALLOON_CHANGE"}, left)
            if event is None:
                break
            actual = int(event["data"]["actual"])
        return actual
