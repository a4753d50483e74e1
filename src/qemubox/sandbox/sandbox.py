"""A sandbox: a machine booted for commands, with the session's shares, disks and network
set up after boot."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from qemubox import paths
from qemubox.egress import launch as egress
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
from qemubox.guest.client import AgentClient, AgentGone, SendTimeout
from qemubox.guest.protocol import own_shell
from qemubox.model.egress import Egress, parse_network
from qemubox.model.net import DNS, GATEWAY, GUEST_IP, PREFIX
from qemubox.model.phase import Phase, Timing
from qemubox.model.plan import KernelPlan, MachinePlan, SnapshotPlan
from qemubox.model.session import ValidSession
from qemubox.model.size import parse_size
from qemubox.model.state import State
from qemubox.qemu.accel import tcg_warning
from qemubox.qemu.cmdline import qemu_args
from qemubox.sandbox import commands, files, processes
from qemubox.sandbox.commands import ExecResult
from qemubox.sandbox.runstate import Runstate, require
from qemubox.sandbox.spec import Session, writable_file
from qemubox.vm import crash, pool, prepare, snapshot
from qemubox.vm.machine import Machine

MS_RDONLY = 1
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288,cache=none"


def random_mac() -> str:
    """A locally administered unicast MAC address, random."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


class AccelWarning(UserWarning):
    pass


class SnapshotWarning(UserWarning):
    """A snapshot could not be recorded or restored: the sandbox booted instead."""


def _vmcore_path(path: str | Path) -> Path:
    """A dump's path, checked as a console log's is (a file in a writable directory)."""
    checked = writable_file(str(path), "vmcore")
    assert checked is not None
    return checked


class Sandbox:
    """A VM booted for commands. Use as a context manager, or call start() and close().

    Its run state (:class:`Runstate`) guards every call that needs the guest. Names are
    not its business: ``sandbox/named.py`` keeps named sandboxes, through :meth:`launch`
    and :meth:`get_ready`; ``qemubox.Sandbox`` (``sandbox/api.py``) offers both."""

    _claim: tuple[SnapshotPlan, int] | None = None  # while recording its key's snapshot
    _pooled: MachinePlan | None = None  # the plan it took a pool's member for

    def __init__(self, session: Session | None = None, **kw) -> None:
        self.session = session or Session(**kw)
        self.spec: ValidSession | None = self.session.validate()
        self.plan: MachinePlan | None = None
        self.machine: Machine | None = None
        self.name: str | None = None  # a named sandbox's (set by sandbox/named.py)
        self.terminals: set[int] = set()  # ids of running tty commands
        self.runstate = Runstate.IDLE
        self.timings: list[Timing] = []  # where the time went, phase by phase
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
        if self.runstate in (Runstate.STARTING, Runstate.RUNNING):
            return self
        if self.runstate is not Runstate.IDLE:
            raise SandboxError(f"this sandbox is {self.runstate.value}: make another")
        try:
            self.launch(detach)
            self.get_ready()
        except BaseException:
            self.close()
            raise
        return self

    def _expect(self, state: Runstate) -> None:
        if self.runstate is not state:
            raise SandboxError(f"the sandbox is {self.runstate.value}, not {state.value}")

    def phase(self, phase: Phase) -> None:
        """Close the current phase of :attr:`timings` as ``phase``."""
        now = time.monotonic()
        self.timings.append(Timing(phase, now - self._since))
        self._since = now

    def launch(self, detach: bool, idle: int = 0, on_idle: str = "") -> None:
        """Plan, make what the plan needs, start QEMU (see :meth:`Machine.launch`) — from a
        snapshot when the session asks and allows it; a snapshot that cannot be restored is
        dropped and the machine boots. ``idle``/``on_idle``: what the VM's keeper runs once
        no client has been attached for ``idle`` seconds. Then :meth:`get_ready`."""
        self._expect(Runstate.IDLE)  # guarded here, not by @require: warnings' stacklevel
        self.runstate = Runstate.STARTING
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
                    self.phase(Phase.PREPARE)
                else:
                    snapshot.seed_console(plan)
                    self.phase(Phase.PREPARE)
                    self.machine = Machine.launch(plan, alive_lock, detach, idle, on_idle)
            self.phase(Phase.POOL if member is not None else Phase.QEMU_START)
            if member is not None or plan.snapshot is None or plan.snapshot.role == "record":
                return  # a member is restored already
            try:
                snapshot.load(plan, alive=self.machine.alive)
                self.phase(Phase.RESTORE)
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

    def get_ready(self) -> None:
        """Wait for the guest launched by :meth:`launch`, set it up; a detached one then
        outlives us."""
        self._expect(Runstate.STARTING)
        assert self.machine is not None and self.spec is not None
        agent = self.machine.attach(self.spec.boot_timeout)
        role = self.plan.snapshot.role if self.plan and self.plan.snapshot else None
        self.phase(Phase.AGENT_READY if role == "restore" else Phase.BOOT)
        if role == "record":
            agent = self._record()
        # Before anything runs, the host's time to the nanosecond and fresh randomness: a
        # clone has its snapshot's, and must not run on with them (the start waits for the
        # answer); a booted guest has the RTC's whole second (and a slow emulated boot behind
        # it), a recorded one a clock that stood still while it was saved: for them it is
        # sent ahead of the first command, which the agent takes after it.
        agent.renew(self.spec.boot_timeout, wait=role == "restore")
        self.runstate = Runstate.RUNNING
        self._setup()
        self.phase(Phase.SETUP)
        if self.machine.detached:
            self.machine.release()

    def _record(self) -> AgentClient:
        """Save the freshly booted machine as its key's snapshot, then go on with it: the
        agent it answers on again."""
        assert self.machine is not None and self._claim is not None
        self.machine.hang_up()  # the snapshot holds no client
        try:
            snapshot.take(self.machine, self._claim[0])
        except snapshot.SnapshotError as err:
            warnings.warn(str(err), SnapshotWarning, stacklevel=6)
        finally:
            self._drop_claim()
        agent = self.machine.reconnect(self.spec.boot_timeout)
        self.phase(Phase.RECORD)
        return agent

    def _drop_claim(self) -> None:
        if self._claim is not None:
            claim, self._claim = self._claim, None
            snapshot.release(claim)

    def _setup(self) -> None:
        """Mount disks and shares, configure the network: steps the agent performs after
        boot (so a saved, booted guest can later be pointed at other disks and shares)."""
        agent = self.agent()
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
            # Its driver, loaded at boot, may still be probing (seconds, under emulation).
            script = (
                "i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do "
                "sleep 0.1; i=$((i+1)); done; "
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
        self.leave()
        return self.name or self.machine.id

    @classmethod
    def attach(cls, machine_id: str, timeout: float = 10) -> Sandbox:
        """A sandbox for a VM that another process (or this one) left running, by the id
        :meth:`detach` returned."""
        return cls.attach_machine(machine_id, timeout)

    @classmethod
    def attach_machine(cls, machine_id: str, timeout: float = 10) -> Sandbox:
        """:meth:`attach` by a machine's id alone (what names resolve to)."""
        machine = Machine.open(machine_id)
        if machine.state is not State.RUNNING:
            raise SandboxError(f"sandbox {machine_id} is {machine.state.value}")
        machine.attach(timeout)
        box = cls.__new__(cls)  # no session: the machine's plan says what it is
        box.session, box.spec = None, None
        box.plan, box.machine, box.runstate = machine.plan, machine, Runstate.RUNNING
        box.name, box.terminals, box.timings = None, set(), []
        return box

    def leave(self) -> None:
        """Let go of the VM, which runs on: this client's commands end with it (but for
        kept ones: see :attr:`processes`)."""
        if self.machine is not None and self.runstate not in (Runstate.CLOSED, Runstate.LEFT):
            self.machine.detach()
        if self.runstate is not Runstate.CLOSED:
            self.runstate = Runstate.LEFT

    def close(self) -> None:
        """Power the guest off (syncing its disks), stop QEMU, remove the runtime files;
        a guest that holds nothing the host keeps (no disk with a path, no writable share)
        has nothing to sync, and its QEMU is killed at once. A named sandbox is left
        running (see ``stop``)."""
        self._drop_claim()
        if self._pooled is not None:  # another member takes the one we took's place
            plan, self._pooled = self._pooled, None
            threading.Thread(target=pool.top_up, args=(plan,), daemon=False).start()
        if self.name is not None:
            self.leave()
            return
        if self.runstate in (Runstate.CLOSED, Runstate.LEFT):
            return
        self.runstate = Runstate.CLOSED
        if self.machine is None:
            return
        self.machine.stop(console_to=self.spec.console_log if self.spec else None)
        self._raise_host_io(self.machine.io_errors)

    def _raise_host_io(self, errors: list[str]) -> None:
        """The host's failure, named with its file: one line, whatever the guest's kernel
        logged of the I/O errors it then saw (its console's tail, as timing has it, would
        only say the same again)."""
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise HostIOError(errors[0] + more)

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

    def set_egress(self, network: str, add_hosts: tuple[str, ...] | list[str] = ()) -> Egress:
        """Change a running sandbox's egress rules (it was started with allow=LIST or
        deny=LIST) to ``network``, another allow=LIST or deny=LIST, with ``add_hosts``
        (NAME:IP): in force for its next connection and lookup."""
        if self.plan is None or self.plan.egress is None:
            raise SandboxError("only a sandbox started with egress rules can change them")
        _, rules = parse_network(network, tuple(add_hosts))
        if rules is None:
            raise InputError(f"network {network!r}: egress rules are allow=LIST or deny=LIST")
        egress.write_rules(self.plan.runtime_dir, rules)
        return rules

    def vmcore_to(self, path: str | Path | None) -> None:
        """Should the guest kernel panic from now on, save its memory at ``path`` (None:
        where the session said, if it did). Named sandboxes can; others only when their
        session gave ``vmcore``."""
        if self.plan is None or not self.plan.crash_dumps:
            if self.plan is None:
                why = "it is not running"
            elif not self.plan.arch_record.vmcoreinfo:
                why = f"{self.plan.arch}'s machines have no vmcoreinfo device"
            else:  # a session without vmcore, or a sandbox made before named ones had it
                why = "it was started without crash dumps (stop and start it)"
            raise InputError(f"--vmcore: this sandbox cannot save a dump: {why}")
        if path is not None:
            path = _vmcore_path(path)
        crash.set_target(self.plan.runtime_dir, path)

    @require(Runstate.RUNNING)
    def dump(self, path: str | Path) -> dict:
        """Save the guest's memory now, as an ELF core (with the kernel's VMCOREINFO where
        the arch has the device), at ``path``; the guest is stopped meanwhile and then runs
        on. Returns ``path``, ``bytes`` and ``seconds``."""
        return crash.save(self._running().monitor(), _vmcore_path(path))

    def console_tail(self) -> str:
        return self.machine.console_tail() if self.machine else ""

    # --- what a command needs of its sandbox (sandbox/commands.py) --------------------------------

    @require(Runstate.RUNNING)
    def agent(self) -> AgentClient:
        """The guest agent's client of this sandbox's slot."""
        if self.machine is None or self.machine.agent is None:
            raise SandboxError("the sandbox is not running")
        return self.machine.agent

    def fail(self) -> None:
        """Stop a VM that can no longer be trusted to answer."""
        if self.machine is not None:
            with contextlib.suppress(Exception):
                self.machine.kill()

    def vm_gone(self, doing: str) -> None:
        """The agent went away: raise what QEMU's end says (a panic, a death)."""
        if self.machine is not None:
            self.machine.wait_gone(5)
            self.machine.check_alive(doing)

    def check_host_io(self) -> None:
        self._raise_host_io(self._running().host_io_errors())

    def _running(self) -> Machine:
        """The machine of a sandbox in use (the run state guards; this names the type)."""
        if self.machine is None or self.plan is None:
            raise SandboxError(f"the sandbox is {self.runstate.value}: it has no machine")
        return self.machine

    # --- commands -----------------------------------------------------------------------------

    @require(Runstate.RUNNING)
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
        user: str | tuple[int, int, tuple[int, ...]] | None = None,
    ) -> ExecResult:
        """Run argv in the guest; returns its exit code and output.

        Output goes to ``on_stdout``/``on_stderr`` as it comes when given (and is then not
        kept); otherwise it is kept, up to ``max_output`` bytes when given (the result then
        says ``truncated``). ``stdin`` is fed and closed; ``stdin_stream`` (a binary file)
        is forwarded as it is read, at the pace the command reads it. On ``timeout``
        (default: the session's) the command's process group is killed and ``timed_out``
        is set. With ``tty`` (rows, columns) the command runs on a pseudo-terminal of that
        size: its stdin, stdout and stderr are the terminal (all output comes as stdout;
        :meth:`resize_terminals` changes the size). ``user`` runs it as someone else than
        root: a name of the root's ``/etc/passwd``, ``UID[:GID]``, ``NAME:GROUP``, or
        (uid, gid, groups); a name also sets ``HOME`` unless ``env`` does.
        """
        if timeout is None and self.spec is not None:
            timeout = self.spec.timeout
        if isinstance(user, str):
            who = self.identity(user)
            env = {"HOME": who.home, **(env or {})}
            user = who.to_tuple()
        ids = self.ids_of(user)
        return commands.execute(
            self, argv, env, cwd, stdin, timeout, on_stdout, on_stderr,
            stdin_stream, max_output, tty, ids,
        )  # fmt: skip

    def ids_of(self, user: str | tuple[int, int, tuple[int, ...]] | None):
        """(uid, gid, groups) of ``user`` as :meth:`exec` takes it; None for root."""
        if isinstance(user, str):
            return self.identity(user).to_tuple()
        if user is not None:
            return (int(user[0]), int(user[1]), tuple(int(g) for g in user[2]))
        return None

    @require(Runstate.RUNNING)
    def identity(self, user: str):
        """``user`` (``NAME``, ``UID``, ``NAME:GROUP``, ``UID:GID``) as the ids it has in this
        guest's root (its ``/etc/passwd`` and ``/etc/group`` now)."""
        from qemubox.image.ociconfig import resolve_user

        return resolve_user(user, *self.accounts())

    @require(Runstate.RUNNING)
    def accounts(self) -> tuple[str, str]:
        """The guest root's ``/etc/passwd`` and ``/etc/group`` as they are now (one command;
        a missing file is empty)."""
        files = ("/etc/passwd", "/etc/group")
        r = self.exec(own_shell('for f; do cat -- "$f" 2>/dev/null; printf "\\0"; done', *files))
        texts = r.stdout.decode(errors="replace").split("\0")
        passwd, group = ([*texts, "", ""])[:2]
        return passwd, group

    @require(Runstate.RUNNING)
    def resize_terminals(self, rows: int, columns: int) -> None:
        """Give the terminals of this client's running ``tty`` commands a new size."""
        agent = self.agent()
        for ident in list(self.terminals):
            with contextlib.suppress(SendTimeout, AgentGone):
                agent.resize(ident, rows, columns)

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

    @property
    def files(self) -> files.Files:
        """File operations in the guest, one agent request each (no command run)."""
        return files.Files(self)

    @property
    def processes(self) -> processes.Processes:
        """Commands followed through handles; kept ones outlive this client."""
        return processes.Processes(self)

    # --- memory (virtio-balloon over QMP) -------------------------------------------------------

    def _qmp_cmd(self, name: str, **args):
        return self._running().monitor().command(name, **args)

    @require(Runstate.RUNNING)
    def set_memory(self, size: str | int) -> None:
        """Ask the guest to give memory back (or take it again) through the balloon."""
        self._running()
        if not self.plan.balloon:
            raise InputError("set_memory needs a session with balloon=True")
        target = parse_size(size, "memory")
        if target > self.plan.memory_mib << 20:
            raise InputError(f"cannot grow memory beyond the session's {self.plan.memory_mib}M")
        self._qmp_cmd("balloon", value=target)

    @require(Runstate.RUNNING)
    def memory(self) -> int:
        """The guest's current memory in bytes, as the balloon reports it."""
        self._running()
        if not self.plan.balloon:
            return self.plan.memory_mib << 20
        return int(self._qmp_cmd("query-balloon")["actual"])

    @require(Runstate.RUNNING)
    def wait_memory(self, at_most: int, timeout: float = 30) -> int:
        """Wait for the balloon to bring the guest to ``at_most`` bytes (QMP's
        BALLOON_CHANGE events); returns the last size reported."""
        monitor = self._running().monitor()
        actual = self.memory()
        deadline = time.monotonic() + timeout
        while actual > at_most and (left := deadline - time.monotonic()) > 0:
            event = monitor.wait_event({"BALLOON_CHANGE"}, left)
            if event is None:
                break
            actual = int(event["data"]["actual"])
        return actual
