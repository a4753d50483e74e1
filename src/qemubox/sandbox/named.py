"""Named sandboxes: sandboxes that outlive the process that made them, kept as records under
the state directory (``sandboxes/<name>/``: ``record.json``, the console log of the last
run, the disks it was given without a path).

A record says what the sandbox is (its session, image, idle limit) and which machine runs it
now; whether that machine lives is never taken from the record but observed (its
``alive.lock``, which QEMU and its keeper hold) and the record is then brought up to date:
a VM that died, or a host that restarted, shows as stopped or failed, never as running.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from qemubox import arch as arches
from qemubox import paths
from qemubox.egress import launch as egress
from qemubox.errors import BusyError, InputError, QemuboxError, SandboxError, printable
from qemubox.model.egress import Egress, parse_network
from qemubox.model.plan import Capability
from qemubox.model.state import State
from qemubox.sandbox.sandbox import Sandbox
from qemubox.sandbox.spec import Session, session_from_dict, session_to_dict
from qemubox.store import Store
from qemubox.vm import crash
from qemubox.vm.machine import OWNER, Machine

SANDBOXES = Store("sandboxes", "sandbox")
ROOT_OVERLAY = "root.qcow2"  # a disk root's writes, in the sandbox's directory
EGRESS_LOG = "egress.log"  # its egress decisions, of every run
STOP_TIMEOUT = 10  # seconds a clean power-off may take before QEMU is killed

# What a sandbox is doing, as observed (see model/state.py).
STARTING, RUNNING, STOPPED, FAILED = State.STARTING, State.RUNNING, State.STOPPED, State.FAILED
PAUSED = State.PAUSED
PAUSED_STATE = "paused.state"
SAVE_TIMEOUT = 300  # seconds writing or reading a paused guest may take
DEADLINE = "deadline"  # in a machine's runtime directory: when its keeper removes the sandbox


@dataclass(frozen=True)
class Status:
    """One sandbox as ``ls`` shows it."""

    name: str
    state: State
    note: str  # why it stopped or failed
    image: str
    arch: str
    kernel: str
    memory: str
    cpus: int
    created: float
    started: float | None  # when the current run began
    ports: tuple[tuple[int, int], ...]  # (host, guest), of the current run
    ttl: float | None
    expires: float | None  # when an idle sandbox will be stopped
    in_use: bool  # a client is attached
    machine: str | None

    def to_dict(self) -> dict:
        from dataclasses import asdict

        data = asdict(self)
        data["ports"] = [list(p) for p in self.ports]
        return data


# --- observing ----------------------------------------------------------------------------------


def _observe(record: dict) -> tuple[State, str, int | None]:
    """(state, note, QEMU's exit status) of the record's current run, from the machine's
    runtime directory."""
    machine = record.get("machine")
    if not machine:
        return State(record.get("last", STOPPED)), record.get("note", ""), None
    d = paths.machine_runtime_dir(machine)
    if not (d / "machine.json").exists():
        return STOPPED, "its VM is gone (the host restarted, or its files were removed)", None
    fd = paths.try_lock(d / "alive.lock", create=False)
    if fd is None:
        return (RUNNING if record.get("ready") else STARTING), "", None
    os.close(fd)
    try:
        code: int | None = int((d / "exit").read_text())
    except (OSError, ValueError):
        code = None
    if not record.get("ready"):
        return FAILED, "it did not finish starting", code
    panic = _panic(d / "console.log")
    if panic:
        return FAILED, panic + crash.describe(crash.outcome(d)), code
    if code == 0:
        return STOPPED, "the guest powered off", code
    if code is not None and code > 128:
        return FAILED, f"QEMU was killed by signal {code - 128}", code
    return FAILED, f"QEMU ended with status {code}", code


def _panic(console_log: Path) -> str:
    """The panic line of a guest's last words, if it panicked."""
    with contextlib.suppress(OSError), open(console_log, "rb") as fh:
        fh.seek(max(0, fh.seek(0, os.SEEK_END) - 8192))
        for line in reversed(fh.read().decode(errors="replace").splitlines()):
            if "Kernel panic - not syncing" in line:
                return printable(line[line.index("Kernel panic") :].strip())
    return ""


def _settle(name: str, record: dict, state: State, note: str) -> dict:
    """Close the record's run: keep its console log, remove its runtime files. Under the
    sandbox's lock."""
    machine = record.get("machine")
    if machine:
        d = paths.machine_runtime_dir(machine)
        log = d / "console.log"
        if log.exists():
            kept = SANDBOXES.dir(name) / "console.log"
            with contextlib.suppress(OSError):
                if kept.exists():
                    os.replace(kept, kept.with_name("console.log.old"))
                paths.copy_data(log, kept)
        shutil.rmtree(d, ignore_errors=True)
    record = {
        **record,
        "machine": None,
        "ready": False,
        "last": state,
        "note": note,
        "ended": time.time(),
    }
    SANDBOXES.write(name, record)
    return record


def _up_to_date(name: str, mine: bool = True) -> tuple[dict, State, str]:
    """The record brought up to date with what is observed: (record, state, note). Only
    with the sandbox's lock held (``mine``) is the record written."""
    record = SANDBOXES.read(name)
    state, note, _ = _observe(record)
    if mine and record.get("machine") and state in (STOPPED, FAILED):
        record = _settle(name, record, state, note)
    return record, state, note


def _current(name: str, wait: bool = True) -> tuple[dict, State, str]:
    with SANDBOXES.locked(name, wait) as mine:
        return _up_to_date(name, mine)


def status(name: str) -> Status:
    record, state, note = _current(name, wait=False)
    session = session_from_dict(record["session"])
    machine = record.get("machine") if state.live else None
    ports: tuple[tuple[int, int], ...] = ()
    kernel = record.get("kernel") or session.kernel or ""
    in_use = False
    expires = None
    if machine:
        d = paths.machine_runtime_dir(machine)
        with contextlib.suppress(QemuboxError, OSError, KeyError, ValueError):
            plan = Machine.open(machine).plan
            ports = tuple((p.host, p.guest) for p in plan.ports)
        in_use = _attached(d)
        ttl = record.get("ttl")
        if ttl and not in_use:  # unused since its keeper last saw a client, or since it started
            with contextlib.suppress(OSError):
                expires = (d / "active").stat().st_mtime + ttl
            if expires is None and record.get("started"):
                expires = record["started"] + ttl
    if state.live and record.get("deadline"):
        expires = min(expires or record["deadline"], record["deadline"])
    return Status(
        name=name,
        state=state,
        note=note,
        image=session.image,
        arch=record.get("arch") or session.arch or arches.host().name,
        kernel=kernel,
        memory=str(session.memory),
        cpus=session.cpus,
        created=record["created"],
        started=record.get("started") if machine else None,
        ports=ports,
        ttl=record.get("ttl"),
        expires=expires,
        in_use=in_use,
        machine=machine,
    )


def _attached(runtime_dir: Path) -> bool:
    """Whether a client is attached to the machine."""
    return any(paths.is_locked(lock) for lock in runtime_dir.glob("attach*.lock"))


def list_all() -> list[Status]:
    found = []
    for name in SANDBOXES.names():
        with contextlib.suppress(InputError):  # removed meanwhile
            found.append(status(name))
    return found


def image_users() -> dict[str, list[str]]:
    """Which sandboxes boot from which image file (a disk root's base, which their overlay
    reads): image file -> sandbox names."""
    users: dict[str, list[str]] = {}
    for name in SANDBOXES.names():
        with contextlib.suppress(InputError):
            base = SANDBOXES.read(name).get("base")
            if base:
                users.setdefault(base, []).append(name)
    return users


def record(name: str) -> dict:
    """What ``inspect`` shows: the record as it is now, with the status and, while it runs,
    the machine's plan."""
    current = status(name)
    data = dict(SANDBOXES.read(name))
    data["status"] = current.to_dict()
    if current.machine:
        with contextlib.suppress(QemuboxError, OSError):
            machine = Machine.open(current.machine)
            data["plan"] = machine.plan.to_dict()
            if (rules := egress.read_rules(machine.dir)) is not None:  # as `network` left them
                data["plan"]["egress"] = rules.to_dict()
    return data


# --- making and starting ------------------------------------------------------------------------


def _own_session(name: str, session: Session, image: str) -> Session:
    """The session as the record keeps it: paths absolute, disks without a path given one in
    the sandbox's directory (so that they outlive a stop), and so is a disk root's overlay;
    the console log is the sandbox's own (``logs``)."""
    home = SANDBOXES.dir(name)
    shares = [replace(sh, host_path=str(Path(sh.host_path).absolute())) for sh in session.shares]
    disks = [
        replace(d, path=str(Path(d.path).absolute() if d.path else home / f"disk{i}.img"))
        for i, d in enumerate(session.disks)
    ]
    overlay = session.overlay or str(home / ROOT_OVERLAY)
    egress_log = session.egress_log
    if egress_log is None and "=" in session.network:  # rules: logged for `logs --net`
        egress_log = str(home / EGRESS_LOG)
    return replace(
        session,
        shares=shares,
        disks=disks,
        console_log=None,
        image=image,
        overlay=overlay,
        egress_log=egress_log,
        vmcore=str(Path(session.vmcore).absolute()) if session.vmcore else None,
    )


def exists(name: str) -> bool:
    return SANDBOXES.exists(name)


def create(
    name: str,
    session: Session,
    ttl: float | None = None,
    cls: type[Sandbox] = Sandbox,
    crash_dumps: bool = True,
):
    """Make a sandbox and start it; returns the started sandbox, a ``cls`` (attached, its
    machine released: detach or close it). A failed start leaves nothing. Without
    ``crash_dumps``, its runs are not ready for ``exec --vmcore`` (no helper process of its
    own waits for a panic: a service's many sandboxes each save one)."""
    SANDBOXES.check_name(name)
    if ttl is not None and ttl <= 0:
        raise InputError(f"ttl must be positive, got {ttl}")
    image = session.validate().image  # checked before anything is made
    SANDBOXES.make(name)
    try:
        kept = _own_session(name, session, image)
        SANDBOXES.write(
            name,
            {
                "name": name,
                "created": time.time(),
                "session": session_to_dict(kept),
                "ttl": ttl,
                "machine": None,
                "ready": False,
                "last": STOPPED,
                "note": "",
                "crash_dumps": crash_dumps,
            },
        )
        box = _boot(name, cls)
        assert box is not None  # nobody else knows the name yet
        return box
    except BaseException:
        SANDBOXES.remove(name)
        raise


def start(name: str, cls: type[Sandbox] = Sandbox):
    """Boot a stopped sandbox again (its disks as they were), or resume a paused one;
    returns the started sandbox (a ``cls``), or None when it was running already."""
    if _current(name)[1] == PAUSED:
        resume(name)
        return None
    return _boot(name, cls)


# --- pausing --------------------------------------------------------------------------------------


def pause(name: str) -> None:
    """Save the running sandbox whole — RAM, devices, its processes and files in memory —
    to a file in its directory, and end its QEMU: no CPU, no memory held."""
    from qemubox.vm import snapshot

    with SANDBOXES.locked(name):
        record, state, _ = _up_to_date(name)
        if state != RUNNING:
            raise InputError(f"sandbox {name!r} is {state}: only a running one can be paused")
        machine = Machine.open(record["machine"])
        why = machine.plan.cannot(Capability.PAUSE)
        if why:
            raise InputError(f"sandbox {name!r} cannot be paused: {why}")
        if _attached(machine.dir):
            raise BusyError(f"sandbox {name!r} is in use by a client: pause it when it is not")
        path = SANDBOXES.dir(name) / PAUSED_STATE
        machine.attach(timeout=10)
        machine.hang_up()  # the saved guest holds no client
        try:
            snapshot.save(machine.monitor(), str(path), whole=True, timeout=SAVE_TIMEOUT)
            with contextlib.suppress(Exception):
                machine.monitor().command("quit")
        except BaseException:
            with contextlib.suppress(Exception):
                machine.monitor().command("cont")  # as it was
            path.unlink(missing_ok=True)
            machine.detach()
            raise
        machine.detach()
        machine.wait_gone(10)
        machine.wait_keeper(5)
        plan = machine.plan.to_dict()
        if (rules := egress.read_rules(machine.dir)) is not None:  # as `network` left them
            plan["egress"] = rules.to_dict()
        record = _settle(name, record, PAUSED, "")
        SANDBOXES.write(name, {**record, "paused": {"plan": plan, "at": time.time()}})


def resume(name: str) -> None:
    """Bring a paused sandbox back as it was: processes, files, network; its clock set to
    the host's."""
    from qemubox.model.plan import MachinePlan, SnapshotPlan
    from qemubox.vm import prepare, snapshot

    with SANDBOXES.locked(name):
        record, state, _ = _up_to_date(name)
        if state != PAUSED:
            raise InputError(f"sandbox {name!r} is {state}: only a paused one can be resumed")
        paused = prepare.remade(MachinePlan.from_dict(record["paused"]["plan"]))
        path = SANDBOXES.dir(name) / PAUSED_STATE
        runtime_dir = paths.machine_runtime_dir(paths.new_machine_id())
        # The saved state holds every page; a machine restored from a snapshot had its RAM
        # in a file, so the resumed one has too (a file of its own, not the template: that
        # one may be pruned meanwhile).
        ram = f"{runtime_dir}/ram" if paused.snapshot and paused.snapshot.ram else ""
        plan = replace(
            paused,
            runtime_dir=str(runtime_dir),
            snapshot=SnapshotPlan("resume", "", ram, str(path)),
        )
        with Machine.runtime_dir(plan) as alive_lock:
            with contextlib.suppress(OSError):  # the console as it was
                paths.copy_data(SANDBOXES.dir(name) / "console.log", Path(plan.console_log))
            machine = Machine.launch(plan, alive_lock, True, *_idle_action(name, record))
        try:
            snapshot.load(plan, timeout=SAVE_TIMEOUT, alive=machine.alive)
            agent = machine.attach(timeout=30)
            agent.renew()  # the time that passed; fresh randomness
        except BaseException as err:
            said = [] if machine.alive() else machine.qemu_log().splitlines()[-1:]
            machine.kill()
            machine.stop(1)
            if said and isinstance(err, QemuboxError):  # QEMU's own words say more
                raise SandboxError(f"cannot resume {name!r}: {said[0]}") from None
            raise
        paths.atomic_write(machine.dir / OWNER, str(SANDBOXES.dir(name) / "record.json"))
        _tell_keeper(name, machine.dir, record.get("deadline"))
        machine.release()
        machine.detach()
        record = {k: v for k, v in record.items() if k != "paused"}
        record |= {"machine": machine.id, "ready": True, "started": time.time(), "note": ""}
        SANDBOXES.write(name, record)
        path.unlink(missing_ok=True)


def _idle_action(name: str, record: dict) -> tuple[int, str]:
    """What the keeper of the sandbox's QEMU does once it has been unused for its ttl
    (seconds; 0: never): stop it, as `qemubox stop --expired` does."""
    ttl = record.get("ttl")
    if not ttl:
        return 0, ""
    return int(ttl), shlex.join([sys.executable, "-m", "qemubox", "stop", "--expired", name])


def _tell_keeper(name: str, runtime_dir: Path, deadline: float | None) -> None:
    """Have the machine's keeper remove the sandbox at ``deadline`` (seconds since the
    epoch; None: never), whether or not anyone is still using it or serving it."""
    path = runtime_dir / DEADLINE
    if deadline is None:
        path.unlink(missing_ok=True)
        return
    command = shlex.join([sys.executable, "-m", "qemubox", "rm", "-f", "--expired", name])
    paths.atomic_write(path, f"{math.ceil(deadline)}\n{command}\n")


def set_deadline(name: str, deadline: float | None) -> None:
    """End the sandbox at ``deadline`` (seconds since the epoch; None: no deadline): its
    keeper removes it then, even if no qemubox process runs. A paused sandbox keeps it for
    when it is resumed."""
    with SANDBOXES.locked(name):
        record, state, _ = _up_to_date(name)
        SANDBOXES.write(name, {**record, "deadline": deadline})
        if state.live and record.get("machine"):
            _tell_keeper(name, paths.machine_runtime_dir(record["machine"]), deadline)


def annotate(name: str, key: str, value) -> None:
    """Keep ``value`` (plain JSON data) in the sandbox's record under ``key``: what a door
    says of the sandbox (the E2B API's owner, metadata, token), with the sandbox, removed
    with it."""
    if key in {"name", "created", "session", "ttl", "machine", "ready", "last", "note"}:
        raise InputError(f"{key!r} is the record's own")
    with SANDBOXES.locked(name):
        SANDBOXES.write(name, {**SANDBOXES.read(name), key: value})


def expired(name: str) -> bool:
    """Whether the sandbox's deadline has passed."""
    deadline = SANDBOXES.read(name).get("deadline")
    return deadline is not None and deadline <= time.time()


def _boot(name: str, cls: type[Sandbox]):
    with SANDBOXES.locked(name):
        record, state, _ = _up_to_date(name)
        if state.live:
            return None
        # Named sandboxes are ready for `exec --vmcore` (those made earlier too) unless made
        # without (a served one)
        dumps = record.get("crash_dumps", True)
        box = cls(replace(session_from_dict(record["session"]), crash_dumps=dumps))
        try:
            box.launch(True, *_idle_action(name, record))
        except BaseException:
            box.close()
            raise
        assert box.machine is not None
        paths.atomic_write(box.machine.dir / OWNER, str(SANDBOXES.dir(name) / "record.json"))
        _tell_keeper(name, box.machine.dir, record.get("deadline"))
        kernel = box.machine.plan.kernel
        record = {
            **record,
            "machine": box.machine.id,
            "ready": False,
            "started": time.time(),
            "kernel": kernel.version or Path(kernel.image).name,
            "arch": box.machine.plan.arch,
            "base": box.machine.plan.root.base,  # a disk root's image: kept while we are
        }
        SANDBOXES.write(name, record)
    try:
        box.get_ready()
    except BaseException as err:
        box.close()
        with SANDBOXES.locked(name):
            why = str(err) if isinstance(err, QemuboxError) else type(err).__name__
            _settle(name, SANDBOXES.read(name), FAILED, f"it did not start: {why}")
        raise
    with SANDBOXES.locked(name):
        record = SANDBOXES.read(name)
        if record.get("machine") == box.machine.id:
            SANDBOXES.write(name, {**record, "ready": True, "note": ""})
    box.name = name
    return box


# --- using and ending ---------------------------------------------------------------------------


def attach(name: str, timeout: float = 10, cls: type[Sandbox] = Sandbox):
    """The running sandbox ``name``, attached (a ``cls``)."""
    record, state, note = _current(name)
    if state == STARTING:
        raise BusyError(f"sandbox {name!r} is still starting")
    if state != RUNNING:
        why = f" ({note})" if note else ""
        raise InputError(f"sandbox {name!r} is {state}{why}: start it with `qemubox start {name}`")
    box = cls.attach_machine(record["machine"], timeout)
    box.name = name
    return box


def stop(name: str, timeout: float = STOP_TIMEOUT, expired: bool = False) -> bool:
    """Power the sandbox off cleanly (its disks synced), killing it after ``timeout``
    seconds; False when it was not running."""
    with SANDBOXES.locked(name):
        record, state, _ = _up_to_date(name)
        if state == PAUSED and not expired:  # its saved state dropped: stopped
            (SANDBOXES.dir(name) / PAUSED_STATE).unlink(missing_ok=True)
            record = {k: v for k, v in record.items() if k != "paused"}
            SANDBOXES.write(name, {**record, "last": STOPPED, "note": "its paused state dropped"})
            return True
        if not state.live:
            return False
        runtime_dir = paths.machine_runtime_dir(record["machine"])
        if expired and (state == STARTING or _attached(runtime_dir)):
            return False  # a client came back meanwhile
        Machine.open(record["machine"]).stop(
            timeout, console_to=SANDBOXES.dir(name) / "console.log"
        )
        note = f"stopped after {_duration(record['ttl'])} unused" if expired else ""
        _settle(name, record, STOPPED, note)
    return True


def kill(name: str) -> bool:
    """Kill the sandbox's QEMU now; False when it was not running."""
    with SANDBOXES.locked(name):
        return _kill(name)


def _kill(name: str) -> bool:
    record, state, _ = _up_to_date(name)
    if not state.live:
        return False
    machine = Machine.open(record["machine"])
    machine.kill()
    machine.wait_keeper(5)
    _settle(name, record, STOPPED, "killed")
    return True


def remove(name: str, force: bool = False, expired_only: bool = False) -> None:
    """Remove a stopped sandbox and the files it owns (disks given a path stay); a running
    one only with ``force`` (it is killed). With ``expired_only``, only if its deadline has
    passed (its keeper's removal: the deadline may have moved meanwhile)."""
    with SANDBOXES.locked(name):
        if expired_only and not expired(name):
            return
        _, state, _ = _up_to_date(name)
        if state.live:
            if not force:
                raise InputError(
                    f"sandbox {name!r} is {state}: stop it first, or remove it with -f"
                )
            _kill(name)
        SANDBOXES.remove(name)


def console_log(name: str) -> Path:
    """The console log of the current run, or of the last one."""
    record, state, _ = _current(name)
    if state.live:
        return paths.machine_runtime_dir(record["machine"]) / "console.log"
    return SANDBOXES.dir(name) / "console.log"


def egress_log(name: str) -> Path:
    """Where ``name``'s egress decisions are written (JSON lines)."""
    session = session_from_dict(_current(name, wait=False)[0]["session"])
    if "=" not in session.network:
        raise InputError(f"sandbox {name!r} has --net {session.network}: no egress rules, no log")
    return Path(session.egress_log or SANDBOXES.dir(name) / EGRESS_LOG)


def network(name: str, net: str | None = None, hosts: tuple[str, ...] | None = None) -> Egress:
    """``name``'s egress rules; with ``net`` (allow=LIST or deny=LIST) and ``hosts``
    (NAME:IP pins; None: kept), changed first: at once while it runs (its proxy reads them
    again), and for its later starts."""
    with SANDBOXES.locked(name):
        record, state, _ = _up_to_date(name)
        session = session_from_dict(record["session"])
        _, rules = parse_network(session.network, tuple(session.add_hosts))
        if rules is None:
            raise InputError(
                f"sandbox {name!r} has --net {session.network}: only a sandbox made with "
                "--net allow=LIST or deny=LIST has egress rules to change"
            )
        if net is None and hosts is None:
            return rules
        _, new = parse_network(net or rules.notation(), rules.hosts if hosts is None else hosts)
        if new is None:
            raise InputError(f"network {net!r}: a sandbox's rules are allow=LIST or deny=LIST")
        if state.live:
            egress.write_rules(paths.machine_runtime_dir(record["machine"]), new)
        if state == PAUSED:
            record["paused"]["plan"]["egress"] = new.to_dict()
        pins = [f"{n}:{ip}" for n, ip in new.hosts]
        record["session"] = session_to_dict(
            replace(session, network=new.notation(), add_hosts=pins)
        )
        SANDBOXES.write(name, record)
        return new


def is_running(name: str) -> bool:
    return _current(name)[1].live


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "0s"
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
