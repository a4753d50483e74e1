"""The warm pool of ``qemubox serve --pool N``: per template, N sandboxes booted ahead and
waiting, each a named sandbox whose record says ``served`` with no owner (no key lists,
finds or reaches it). A create takes one — its record then gets its owner, metadata, token
and deadline, and its id is the new sandbox's — and a background thread boots another.

A waiting sandbox has a deadline too, pushed on while a server runs: should the server die,
its spares end by themselves within SPARE_TTL seconds."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

from qemubox.errors import GuestError, QemuboxError
from qemubox.sandbox import named
from qemubox.serve import templates
from qemubox.serve.guests import Guest
from qemubox.serve.model import Served, new_id

SPARE_TTL = 600  # seconds a waiting sandbox lives without a server pushing its deadline
POOLED_NETWORK = "user"  # spares are booted so: a create asking another network boots
# What the SDKs run first (every command is `/bin/bash -l -c`), run once ahead where it can.
WARM_UP = ["/bin/sh", "-c", "command -v bash >/dev/null && bash -l -c true; true"]


class Spares:
    def __init__(self, size: int, session_of: Callable, record_key: str) -> None:
        self.size = size
        self.session_of = session_of
        self.record_key = record_key
        self.waiting: dict[str, list[tuple[str, Guest | None]]] = {}  # template -> (id, guest)
        self.templates: set[str] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.failures: dict[str, str] = {}

    def want(self, template: str) -> None:
        """Keep spares of ``template`` from now on."""
        if self.size:
            with self.lock:
                self.templates.add(template)

    def adopt(self, name: str, served: Served) -> None:
        """A waiting sandbox of an earlier server: waiting again (attached when taken)."""
        with self.lock:
            self.waiting.setdefault(served.template, []).append((name, None))
            if self.size:
                self.templates.add(served.template)

    def take(self, template: str, network: str):
        """A waiting sandbox of ``template`` booted for ``network``: (id, its guest, attached,
        or None for an earlier server's), now the caller's; None when none waits."""
        if network != POOLED_NETWORK:
            return None
        with self.lock:
            waiting = self.waiting.get(template) or []
            while waiting:
                sandbox_id, guest = waiting.pop(0)
                if named.exists(sandbox_id) and named.is_running(sandbox_id):
                    return sandbox_id, guest
        return None

    def count(self, template: str) -> int:
        with self.lock:
            return len(self.waiting.get(template, []))

    def fill_once(self) -> int:
        """Boot the spares missing now (one at a time), and push the waiting ones'
        deadlines on; how many were booted."""
        booted = 0
        with self.lock:
            templates = sorted(self.templates)
        for template in templates:
            while not self.stopped.is_set() and self.count(template) < self.size:
                try:
                    self._boot(template)
                    booted += 1
                    self.failures.pop(template, None)
                except QemuboxError as err:
                    self.failures[template] = str(err)
                    break
        with self.lock:
            spares = [sid for items in self.waiting.values() for sid, _ in items]
        for sandbox_id in spares:
            with contextlib.suppress(QemuboxError):
                record = named.SANDBOXES.read(sandbox_id)
                if (record.get("deadline") or 0) < time.time() + SPARE_TTL / 2:
                    named.set_deadline(sandbox_id, time.time() + SPARE_TTL)
        return booted

    def _boot(self, template: str) -> None:
        from dataclasses import replace

        sandbox_id = new_id()
        session = replace(self.session_of(template), network=POOLED_NETWORK)
        box = named.create(sandbox_id, session, crash_dumps=False)
        spare = Served(sandbox_id, "", template, time.time(), SPARE_TTL)
        guest = Guest(spare)
        guest._box = box
        try:
            box.exec(WARM_UP)  # its first command's work (under TCG, translating) done ahead
            with contextlib.suppress(GuestError):
                guest.who(None)  # the default user, looked up ahead
            templates.start_service(guest, template)
            named.annotate(sandbox_id, self.record_key, spare.to_dict())
            named.set_deadline(sandbox_id, time.time() + SPARE_TTL)
        except BaseException:
            box.detach()
            with contextlib.suppress(QemuboxError):
                named.remove(sandbox_id, force=True)
            raise
        with self.lock:
            self.waiting.setdefault(template, []).append((sandbox_id, guest))

    def run(self, every: float = 1.0) -> None:
        """Keep the pools full until :meth:`stop` (a thread's body)."""
        while not self.stopped.is_set():
            with contextlib.suppress(Exception):
                self.fill_once()
            self.stopped.wait(every)

    def stop(self, remove: bool = True) -> None:
        """Stop filling; with ``remove``, end the waiting sandboxes."""
        self.stopped.set()
        with self.lock:
            items = [item for items in self.waiting.values() for item in items]
            self.waiting.clear()
        for sandbox_id, guest in items:
            with contextlib.suppress(Exception):
                if guest is not None:
                    guest.close()
                if remove:
                    named.remove(sandbox_id, force=True)
