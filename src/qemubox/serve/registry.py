"""The sandboxes a server serves: named sandboxes whose record says ``served`` (E2B's facts
of them, ``model.Served``). The record is the only home of those facts, so a server that
restarts adopts every served sandbox as it was (id, owner, token, metadata, deadline); the
deadline itself is kept by each sandbox's keeper, which removes the sandbox at that time
whether or not a server runs.

Each method blocks (a boot, a pause): the HTTP handlers call them on worker threads. A
sandbox of another key is :class:`NotFound`, as one that does not exist."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import replace

from qemubox.errors import InputError, QemuboxError
from qemubox.model.state import State
from qemubox.sandbox import named
from qemubox.sandbox.spec import Session
from qemubox.serve import templates
from qemubox.serve.guests import Gone, Guest
from qemubox.serve.model import BadRequest, CreateRequest, Served, new_id, new_token
from qemubox.serve.spares import Spares
from qemubox.store import NAME_RE

SERVED = "served"  # the key of E2B's facts in a named sandbox's record
MEMORY = "512M"
SAMPLES_KEPT = 120  # metrics samples per sandbox
# Boots at once: more would share the CPUs so thinly (under TCG) that each could pass its
# boot timeout; creates beyond them wait their turn.
BOOTS_AT_ONCE = 2 * (os.cpu_count() or 2)


class NotFound(LookupError):
    pass


class Conflict(Exception):
    pass


def _valid(sandbox_id: str) -> bool:
    return isinstance(sandbox_id, str) and NAME_RE.fullmatch(sandbox_id) is not None


def _served(name: str) -> Served | None:
    with contextlib.suppress(InputError, OSError, KeyError, TypeError):
        data = named.SANDBOXES.read(name).get(SERVED)
        if isinstance(data, dict):
            return Served.from_dict(data)
    return None


class Registry:
    def __init__(self, spares: Spares | None = None) -> None:
        self.spares = spares or Spares(0, lambda template: None, SERVED)
        self._guests: dict[str, Guest] = {}
        self._lock = threading.Lock()
        self._boots = threading.BoundedSemaphore(BOOTS_AT_ONCE)
        self._samples: dict[str, list[dict]] = {}
        self._cpu: dict[str, tuple[float, float]] = {}  # id -> (time, cpu seconds)

    # --- finding -------------------------------------------------------------------------------

    def adopt(self) -> list[str]:
        """Every served sandbox found in the state directory (a restarted server's)."""
        found = []
        for name in named.SANDBOXES.names():
            served = _served(name)
            if served is not None and not served.owner:
                if self.running(name):
                    self.spares.adopt(name, served)
                continue
            if served is not None:
                with self._lock:
                    self._guests.setdefault(name, Guest(served))
                found.append(name)
        return found

    def served(self, sandbox_id: str, owner: str | None) -> Served:
        """The sandbox's facts, if it exists and belongs to ``owner`` (None: anyone)."""
        served = _served(sandbox_id) if _valid(sandbox_id) else None
        if served is None:  # gone (its deadline came): let go of its guest
            with self._lock:
                guest = self._guests.pop(sandbox_id, None)
            if guest is not None:
                guest.close()
        if served is None or not served.owner or (owner is not None and served.owner != owner):
            raise NotFound(f"sandbox {sandbox_id!r} not found")
        return served

    def state(self, sandbox_id: str) -> tuple[str | None, float | None]:
        """("running" or "paused", or None when it is neither; its deadline)."""
        status = named.status(sandbox_id)
        record = named.SANDBOXES.read(sandbox_id)
        if status.state in (State.RUNNING, State.STARTING):
            return "running", record.get("deadline")
        if status.state == State.PAUSED:
            return "paused", record.get("deadline")
        return None, record.get("deadline")

    def guest(self, sandbox_id: str) -> Guest:
        """The guest of a running served sandbox; :class:`Gone` when it does not run."""
        with self._lock:
            guest = self._guests.get(sandbox_id)
        if guest is None:
            served = _served(sandbox_id) if _valid(sandbox_id) else None
            if served is None or not served.owner:  # a spare waits for its owner
                raise Gone(f"sandbox {sandbox_id} not found")
            with self._lock:
                guest = self._guests.setdefault(sandbox_id, Guest(served))
        return guest

    def running(self, sandbox_id: str) -> bool:
        with contextlib.suppress(InputError):
            return _valid(sandbox_id) and named.is_running(sandbox_id)
        return False

    def listed(self, owner: str) -> list[tuple[Served, str, float | None]]:
        out = []
        for name in named.SANDBOXES.names():
            served = _served(name)
            if served is None or served.owner != owner:
                continue
            with contextlib.suppress(InputError):
                state, deadline = self.state(name)
                if state is not None:
                    out.append((served, state, deadline))
        return out

    def secure(self) -> list[Served]:
        """Every served sandbox with an access token (for signed file URLs)."""
        with self._lock:
            guests = list(self._guests.values())
        return [g.served for g in guests if g.served.token]

    # --- lifecycle -------------------------------------------------------------------------------

    def create(self, owner: str, request: CreateRequest, session: Session) -> Served:
        if request.auto_pause:
            raise BadRequest("autoPause: not offered; a sandbox ends at its timeout")
        self.spares.want(request.template)
        taken = self.spares.take(request.template, request.network)
        sandbox_id, guest = taken if taken is not None else (new_id(), None)
        served = Served(
            id=sandbox_id,
            owner=owner,
            template=request.template,
            started=time.time(),
            timeout=request.timeout,
            metadata=request.metadata,
            env=request.env,
            token=new_token() if request.secure else None,
            traffic_token=None if request.public_traffic else new_token(),
            allow_internet=request.allow_internet,
            cpus=session.cpus,
            memory_mb=_megabytes(str(session.memory)),
        )
        if guest is None:
            guest = Guest(served)
            if taken is None:
                with self._boots:
                    net = replace(session, network=request.network)
                    guest._box = named.create(sandbox_id, net, crash_dumps=False)
        guest.served = served
        try:
            if taken is None:  # a spare's service was started as it was booted
                templates.start_service(guest, request.template)
            named.annotate(sandbox_id, SERVED, served.to_dict())
            named.set_deadline(sandbox_id, served.started + request.timeout)
        except BaseException:
            guest.close()
            with contextlib.suppress(QemuboxError):
                named.remove(sandbox_id, force=True)
            raise
        with self._lock:
            self._guests[sandbox_id] = guest
        return served

    def kill(self, sandbox_id: str, owner: str) -> None:
        self.served(sandbox_id, owner)
        with self._lock:
            guest = self._guests.pop(sandbox_id, None)
        if guest is not None:
            guest.close()
        named.remove(sandbox_id, force=True)
        self._samples.pop(sandbox_id, None)

    def set_timeout(self, sandbox_id: str, owner: str, timeout: int) -> None:
        self.served(sandbox_id, owner)
        state, _ = self.state(sandbox_id)
        if state != "running":
            raise NotFound(f"sandbox {sandbox_id!r} is not running")
        named.set_deadline(sandbox_id, time.time() + timeout)

    def pause(self, sandbox_id: str, owner: str) -> None:
        self.served(sandbox_id, owner)
        state, _ = self.state(sandbox_id)
        if state == "paused":
            raise Conflict(f"sandbox {sandbox_id!r} is already paused")
        if state != "running":
            raise NotFound(f"sandbox {sandbox_id!r} is not running")
        with self._lock:
            guest = self._guests.get(sandbox_id)
        if guest is not None:
            guest.close()  # a paused guest holds no client
        named.pause(sandbox_id)
        named.set_deadline(sandbox_id, None)  # a paused sandbox waits to be resumed

    def connect(self, sandbox_id: str, owner: str, timeout: int) -> tuple[Served, bool]:
        """Resume it if it is paused; its deadline ``timeout`` seconds from now (never
        earlier than it was). Returns it and whether it was resumed."""
        served = self.served(sandbox_id, owner)
        state, deadline = self.state(sandbox_id)
        resumed = False
        if state == "paused":
            named.resume(sandbox_id)
            resumed = True
        elif state != "running":
            raise NotFound(f"sandbox {sandbox_id!r} is not running")
        want = time.time() + timeout
        named.set_deadline(sandbox_id, max(want, deadline or 0) if not resumed else want)
        return served, resumed

    def close(self) -> None:
        """Let go of every guest (they run on, their deadlines kept by their keepers)."""
        self.spares.stop()
        with self._lock:
            guests, self._guests = list(self._guests.values()), {}
        for guest in guests:
            guest.close()

    # --- metrics ---------------------------------------------------------------------------------

    def sample(self) -> None:
        """One sample of every running served sandbox, from the host: its QEMU's CPU time
        and memory, its disk's size."""
        now = time.time()
        for name in named.SANDBOXES.names():
            served = _served(name)
            if served is None or not served.owner:
                continue
            with contextlib.suppress(QemuboxError, OSError, ValueError, KeyError):
                sample = self._measure(name, served, now)
                if sample is not None:
                    kept = self._samples.setdefault(name, [])
                    kept.append(sample)
                    del kept[:-SAMPLES_KEPT]

    def _measure(self, name: str, served: Served, now: float) -> dict | None:
        from qemubox.vm.machine import Machine

        status = named.status(name)
        if status.state != State.RUNNING or not status.machine:
            return None
        machine = Machine.open(status.machine)
        pid = machine.pid
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        last = self._cpu.get(name)
        self._cpu[name] = (now, cpu)
        pct = 0.0
        if last is not None and now > last[0]:
            pct = min(100.0, 100 * (cpu - last[1]) / (now - last[0]) / max(served.cpus, 1))
        rss = 0
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        disk_used = disk_total = 0
        overlay = named.SANDBOXES.dir(name) / named.ROOT_OVERLAY
        with contextlib.suppress(OSError):
            st = overlay.stat()
            disk_used, disk_total = st.st_blocks * 512, st.st_size
        from qemubox.serve.model import rfc3339

        return {
            "timestamp": rfc3339(now),
            "timestampUnix": int(now),
            "cpuCount": served.cpus,
            "cpuUsedPct": round(pct, 2),
            "memUsed": rss,
            "memTotal": served.memory_mb << 20,
            "memCache": 0,
            "diskUsed": disk_used,
            "diskTotal": disk_total,
        }

    def metrics(self, sandbox_id: str, owner: str, start: float | None, end: float | None):
        served = self.served(sandbox_id, owner)
        samples = self._samples.get(sandbox_id, [])
        if not samples:
            with contextlib.suppress(QemuboxError, OSError, ValueError, KeyError):
                sample = self._measure(sandbox_id, served, time.time())
                if sample is not None:
                    samples = self._samples.setdefault(sandbox_id, [sample])
        return [
            s
            for s in samples
            if (start is None or s["timestampUnix"] >= start)
            and (end is None or s["timestampUnix"] <= end)
        ]


def _megabytes(size: str) -> int:
    from qemubox.model.size import parse_size

    with contextlib.suppress(Exception):
        return parse_size(size) >> 20
    return 0
