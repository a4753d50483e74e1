"""A running machine: one QEMU process running a plan, with an explicit state.

The machine's runtime directory holds its sockets, console log and record
(``machine.json``: the plan, QEMU's and its keeper's pid and start time). QEMU and its keeper
inherit a lock on ``alive.lock`` and hold it as long as they live (the keeper until it has
written QEMU's exit status to ``exit``), so a directory whose lock can be taken belongs to a
dead machine, whatever its pid says.

Any process can attach to a running machine, as many at once as the plan has client slots:
a client takes the first free slot K, holding ``attachK.lock``, the agent port
``agentK.sock`` and, when used, the QMP monitor ``qmpK.sock``. With every slot taken, a
client gets BusyError. A client that leaves without saying BYE (killed) leaves ``dirtyK``
behind, and the next one on that slot resynchronises the agent's stream first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from qemubox import paths
from qemubox.egress import launch as egress
from qemubox.errors import (
    BootError,
    BusyError,
    InputError,
    KernelError,
    KernelPanic,
    SandboxError,
    VMDied,
    printable,
)
from qemubox.guest.client import AgentClient, AgentGone
from qemubox.model.plan import MachinePlan
from qemubox.model.state import State
from qemubox.qemu import process
from qemubox.qemu.cmdline import qemu_args
from qemubox.qemu.virtiofs import virtiofsd_commands
from qemubox.vm import crash

CONSOLE_TAIL_LINES = 30
CONSOLE_KEEP = 4 << 20  # bytes of console log kept on disk; a guest may write without end
RECORD = "machine.json"
AGENT_GAVE_UP = "qemubox-agent: cannot "  # how the agent's fatal errors begin, on the console


_MOVES = {
    State.STARTING: {State.RUNNING, State.STOPPING, State.STOPPED, State.FAILED},
    State.RUNNING: {State.STOPPING, State.STOPPED, State.FAILED},
    State.STOPPING: {State.STOPPED, State.FAILED},
    State.STOPPED: set(),
    State.FAILED: {State.STOPPED},
}


OWNER = "owner"  # in a runtime directory: the record that settles the machine's end itself


UNLOCKED_GRACE = 60.0  # seconds a machine's directory may be seen without its lock file


def sweep(root: Path | None = None) -> None:
    """Remove the runtime directories of dead machines (provably dead: nobody holds their
    ``alive.lock``). Live ones are left, and so are those of machines whose owner's record
    still exists (a named sandbox keeps its machine's exit status and console log until it
    notices the end). A directory without a lock file is being made (it has one within
    microseconds) unless it is older than ``UNLOCKED_GRACE``: then it is what a removal
    left behind (a start cut short as QEMU came up makes sockets after the removal has
    listed the directory)."""
    root = root or paths.runtime_root()
    if not root.is_dir():
        return
    for d in root.iterdir():
        with contextlib.suppress(OSError):
            if Path((d / OWNER).read_text()).exists():
                continue
        fd = paths.try_lock(d / "alive.lock", create=False)
        if fd is not None:
            shutil.rmtree(d, ignore_errors=True)
            os.close(fd)
        elif _half_removed(d):
            shutil.rmtree(d, ignore_errors=True)


def _half_removed(d: Path) -> bool:
    if not paths.is_machine_id(d.name):  # not a machine's (pool/, vm/)
        return False
    try:
        if any((d / name).exists() for name in ("alive.lock", ".alive.lock")):
            return False
        return time.time() - d.stat().st_mtime > UNLOCKED_GRACE
    except OSError:
        return False


class Machine:
    """One QEMU process running a plan."""

    def __init__(self, plan: MachinePlan, pid: int, started: int | None, detached: bool):
        self.plan = plan
        self.pid = pid
        self.started = started
        self.detached = detached
        self.dir = Path(plan.runtime_dir)
        self.id = self.dir.name
        self._state = State.STARTING
        self._proc = None  # QEMU's keeper, when we started it
        self.keeper: tuple[int, int | None] | None = None  # its pid and start time
        self._attach_fd: int | None = None
        self.slot = 0  # the client slot this client holds, while attached
        self.agent: AgentClient | None = None
        self._monitor = None
        self.io_errors: list[str] = []  # host I/O errors QEMU reported as the guest stopped

    # --- the one place that moves the state ----------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def _move(self, new: State) -> None:
        if new is self._state:
            return
        if new not in _MOVES[self._state]:
            raise SandboxError(
                f"machine {self.id}: cannot go from {self._state.value} to {new.value}"
            )
        self._state = new

    # --- starting and finding -------------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def runtime_dir(plan: MachinePlan) -> Iterator[int]:
        """Create the machine's runtime directory holding its ``alive.lock`` for the block;
        yields the lock's fd, for :meth:`launch` to hand to QEMU (which then holds it as
        long as it lives)."""
        sweep()
        d = paths.make_private_dir(Path(plan.runtime_dir))
        # Locked before it takes its name: a sweeper never sees it unlocked.
        fd = paths.try_lock(d / ".alive.lock")
        if fd is None:  # only this process knows the new directory's name
            raise SandboxError(f"{d}: another process holds its lock")
        try:
            os.replace(d / ".alive.lock", d / "alive.lock")
            yield fd
        except BaseException:  # nothing started in it (a disk that cannot be made, say)
            shutil.rmtree(d, ignore_errors=True)
            raise
        finally:
            os.close(fd)

    @classmethod
    def launch(
        cls,
        plan: MachinePlan,
        lock_fd: int,
        detached: bool = False,
        idle: int = 0,
        on_idle: str = "",
    ) -> Machine:
        """Start QEMU on a prepared plan, inside :meth:`runtime_dir`; the machine is then
        STARTING, and dies with this process until :meth:`release` (when ``detached``).
        ``idle``, ``on_idle``: see :class:`qemubox.qemu.process.Keeping`."""
        binary = plan.arch_record.qemu_binary
        if shutil.which(binary) is None:
            raise KernelError(
                f"{binary} is not installed (apt-get install {plan.arch_record.qemu_package})"
            )
        helpers = tuple((tuple(command), socket) for command, socket in virtiofsd_commands(plan))
        environment = egress.qemu_prefix(plan)
        if (proxy := egress.proxy_helper(plan)) is not None:
            egress.write_rules(plan.runtime_dir, plan.egress_rules)
            helpers += (proxy,)
        if (dumper := crash.helper(plan)) is not None:
            helpers += (dumper,)
        keeping = process.Keeping(
            Path(plan.runtime_dir), CONSOLE_KEEP, lock_fd, idle, on_idle, helpers
        )
        command = environment + qemu_args(plan)
        proc = process.spawn(command, keeping, Path(plan.runtime_dir) / "qemu.log")
        pid = process.qemu_pid(proc, Path(plan.runtime_dir))
        machine = cls(plan, pid, process.start_time(pid), detached)
        machine._proc = proc
        machine.keeper = (proc.pid, process.start_time(proc.pid))
        machine._write_record()
        return machine

    def release(self) -> None:
        """Let a detached machine outlive this process (once it is ready for others)."""
        if not self.detached:
            raise SandboxError(f"machine {self.id} was not started detached")
        if self.keeper is not None:
            process.release(*self.keeper)

    def _write_record(self) -> None:
        record = {
            "plan": self.plan.to_dict(),
            "pid": self.pid,
            "started": self.started,
            "detached": self.detached,
            "keeper": list(self.keeper) if self.keeper else None,
        }
        paths.atomic_write(self.dir / RECORD, json.dumps(record, indent=2, sort_keys=True))

    @classmethod
    def open(cls, machine_id: str) -> Machine:
        """A machine another process started, by its id."""
        d = paths.machine_runtime_dir(machine_id)
        try:
            record = json.loads((d / RECORD).read_text())
        except (OSError, ValueError):
            raise InputError(f"no machine {machine_id!r} here") from None
        plan = MachinePlan.from_dict(record["plan"])
        machine = cls(plan, record["pid"], record.get("started"), record.get("detached", True))
        keeper = record.get("keeper")
        machine.keeper = (keeper[0], keeper[1]) if keeper else None
        machine._state = State.RUNNING if machine.alive() else State.STOPPED
        return machine

    def alive(self) -> bool:
        return process.alive(self.pid, self.started)

    def exit_status(self, wait: float = 1) -> int | None:
        """QEMU's exit status, once it has ended (its keeper writes it down)."""
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=wait)
        try:
            return int((self.dir / "exit").read_text())
        except (OSError, ValueError):
            return None

    # --- attaching --------------------------------------------------------------------------------

    def attach(self, timeout: float) -> AgentClient:
        """Become the machine's client; waits up to ``timeout`` for the agent (booting)."""
        if self.agent is not None:
            return self.agent
        if self._state not in (State.STARTING, State.RUNNING):
            raise SandboxError(f"machine {self.id} is {self._state.value}")
        for slot in range(self.plan.slots):
            self._attach_fd = paths.try_lock(self.dir / f"attach{slot}.lock")
            if self._attach_fd is not None:
                self.slot = slot
                break
        else:
            raise BusyError(
                f"sandbox {self.id} is in use by {self.plan.slots} clients, as many as it takes"
            )
        booting = self._state is State.STARTING
        when = "while booting" if booting else "while attaching"
        dirty = self.dir / f"dirty{self.slot}"
        try:
            resync = dirty.exists()
            dirty.touch()
            self._connect_agent(timeout, when, resync)
        except (TimeoutError, AgentGone) as err:
            self._release()
            if isinstance(err, AgentGone):
                self.wait_gone(2)  # QEMU hanging up is QEMU exiting: say why it did
            self.check_alive(when)
            if isinstance(err, AgentGone):
                why = f"the guest agent hung up {when}"
            elif booting:
                why = f"the guest did not start within {timeout:g} s"
            else:
                why = f"the guest agent of {self.id} did not answer within {timeout:g} s"
            error = BootError if booting else SandboxError
            raise error(why, self.console_tail()) from None
        except BaseException:
            self._release()
            raise
        self._move(State.RUNNING)
        if self.plan.disks:
            self.monitor()  # connected now, so that no disk's I/O error event is missed
        return self.agent

    def _connect_agent(self, timeout: float, when: str, resync: bool) -> AgentClient:
        self.agent = AgentClient.attach(
            Path(self.plan.agent_socket(self.slot)),
            timeout,
            alive=lambda: self.check_alive(when),
            resync=resync,
        )
        return self.agent

    def hang_up(self) -> None:
        """Close this client's agent connection, keeping its slot (and the monitor): a
        machine about to be saved holds no client. :meth:`reconnect` comes back."""
        if self.agent is not None:
            self.agent.close()
            self.agent = None

    def reconnect(self, timeout: float) -> AgentClient:
        """Connect to the agent again on the slot this client holds, after :meth:`hang_up`."""
        if self._attach_fd is None:
            raise SandboxError(f"attach to machine {self.id} before reconnecting")
        return self._connect_agent(timeout, "while attaching", resync=True)

    def detach(self) -> None:
        """Leave the machine running; the agent ends this client's commands."""
        if self.agent is not None:
            self.agent.bye()
            clean = not self.agent.closed
            self.agent.close()
            self.agent = None
            if clean:
                with contextlib.suppress(OSError):
                    (self.dir / f"dirty{self.slot}").unlink()
        self._release()

    def _release(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._attach_fd is not None:
            os.close(self._attach_fd)
            self._attach_fd = None

    def monitor(self):
        """The QMP monitor, connected on first use (only the attached client may)."""
        if self._attach_fd is None:
            raise SandboxError(f"attach to machine {self.id} before using its monitor")
        if self._monitor is None:
            from qemubox.qemu.qmp import Monitor

            self._monitor = Monitor(self.plan.qmp_socket(self.slot))
        return self._monitor

    def host_io_errors(self, settle: bool = True) -> list[str]:
        """What QEMU reported since the last call about disk images the host could not
        read or write (as one line each, naming the file)."""
        if self._monitor is None:
            return []
        found = []
        for event in self._monitor.take_events({"BLOCK_IO_ERROR"}, settle):
            data = event.get("data", {})
            drive = str(data.get("device", ""))
            index = int(drive[4:]) if drive[4:].isdigit() else -1
            name = self.plan.disks[index].path if 0 <= index < len(self.plan.disks) else drive
            what = "write" if data.get("operation") == "write" else "read"
            why = data.get("reason") or "I/O error"
            line = f"the host could not {what} disk image {name}: {why}"
            if line not in found:
                found.append(line)
        return found

    # --- health -------------------------------------------------------------------------------

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        path = Path(self.plan.console_log)
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 65536))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return printable("\n".join(text.rstrip().splitlines()[-lines:]))

    def qemu_log(self) -> str:
        """What QEMU (and its keeper) printed."""
        with contextlib.suppress(OSError):
            return (self.dir / "qemu.log").read_text(errors="replace").strip()
        return ""

    def check_alive(self, when: str) -> None:
        """Raise the right error if QEMU has exited."""
        if self.alive():
            return
        tail = self.console_tail()
        code = self.exit_status()
        self._move(State.FAILED)
        saved = crash.outcome(self.dir)
        if "Kernel panic" in tail:
            line = next(ln for ln in tail.splitlines() if "Kernel panic" in ln)
            panic = line[line.index("Kernel panic") :].strip()
            raise KernelPanic(panic + crash.describe(saved), tail, vmcore=saved)
        fatal = [ln for ln in tail.splitlines() if ln.startswith(AGENT_GAVE_UP)]
        if fatal:  # the agent said why it powered off (a root it could not mount...)
            raise BootError(f"the guest could not start: {fatal[-1].split(': ', 1)[1]}", tail)
        qemu_says = self.qemu_log().splitlines()
        if not tail and qemu_says:
            raise KernelError(f"QEMU failed: {qemu_says[-1]}", tail)
        status = f" (QEMU exit status {code})" if code is not None else ""
        raise VMDied(f"the VM stopped {when}{status}", tail)

    # --- stopping -----------------------------------------------------------------------------

    def wait_gone(self, timeout: float) -> bool:
        return process.wait_gone(self.pid, self.started, timeout)

    def stop(self, timeout: float = 5, console_to: Path | None = None) -> None:
        """Power the guest off (its disks synced), kill QEMU if it does not go within
        ``timeout`` seconds — or kill it at once when nothing the guest wrote outlives it
        (:attr:`MachinePlan.keeps_writes`) — and remove the runtime directory (the console
        log is copied to ``console_to`` first, when given)."""
        if self._state is State.STOPPED:
            return
        quick = not self.plan.keeps_writes  # nothing to sync: no poweroff to wait for
        agent = self.agent
        if agent is None and not quick and self._state is State.RUNNING and self.alive():
            with contextlib.suppress(SandboxError, AgentGone, OSError):
                agent = self.attach(timeout=2)
        if self._state is not State.FAILED:
            self._move(State.STOPPING)
        if self.alive():
            if quick:
                process.kill(self.pid, self.started)
            elif agent is not None and not agent.closed:
                with contextlib.suppress(Exception):
                    agent.poweroff(timeout=timeout)
                    if self._monitor is not None:  # the guest's last sync may fail on the host
                        self._monitor.wait_event({"SHUTDOWN"}, timeout)
                        self.io_errors += self.host_io_errors(settle=False)
            if not self.wait_gone(1 if agent is None else timeout):
                self.kill()
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        self._release()
        self.wait_keeper(2)
        if console_to is not None:
            with contextlib.suppress(OSError):
                paths.punch_head(Path(self.plan.console_log), CONSOLE_KEEP)
            if console_to.exists():
                with contextlib.suppress(OSError):
                    os.replace(console_to, console_to.with_name(console_to.name + ".old"))
            with contextlib.suppress(OSError):
                paths.copy_data(Path(self.plan.console_log), console_to)
        shutil.rmtree(self.dir, ignore_errors=True)
        sweep()  # and whatever dead machines left behind
        if self._state is State.STOPPING:
            self._move(State.STOPPED)

    def wait_keeper(self, timeout: float) -> bool:
        """Wait until QEMU's keeper is done (it has written QEMU's exit status and let go
        of ``alive.lock``)."""
        if self._proc is not None:
            try:  # woken by its end (Popen.wait with a timeout would poll)
                process.wait_gone(self._proc.pid, None, timeout)
                self._proc.wait(timeout=0.1)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while True:
            fd = paths.try_lock(self.dir / "alive.lock", create=False)
            if fd is not None:
                os.close(fd)
                return True
            if time.monotonic() > deadline or not self.dir.exists():
                return False
            time.sleep(0.02)

    def kill(self) -> None:
        """Kill QEMU now; a machine killed before it was being stopped has failed."""
        if self._state in (State.STARTING, State.RUNNING):
            self._move(State.FAILED)
        process.kill(self.pid, self.started)  # QEMU itself (a keeper then ends with it)
        self.wait_gone(5)
