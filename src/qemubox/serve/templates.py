"""What a template id names: an image (by its name), or one of E2B's templates that qemubox
makes from an image and a service of its own started in each sandbox before it is handed
out — the code interpreter (``interpreter.py``) on its port, for ``e2b-code-interpreter``,
whose default template is ``code-interpreter-v1``."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from qemubox.errors import QemuboxError, SandboxError
from qemubox.serve.guests import note_of

INTERPRETER_PORT = 49999  # where e2b-code-interpreter looks for it
READY_TIMEOUT = 120  # seconds a service may take to listen (a loaded host, under TCG)
SAID_KEPT = 4096  # bytes of a service's output kept (its words when it fails to start)


@dataclass(frozen=True)
class Service:
    program: str  # a file beside this module, run with the guest's python3
    port: int
    user: str  # the account it runs as (root where the image has none of that name)


@dataclass(frozen=True)
class Template:
    image: str
    service: Service | None = None


_INTERPRETER = Template("base", Service("interpreter.py", INTERPRETER_PORT, "user"))
TEMPLATES = {"code-interpreter-v1": _INTERPRETER, "code-interpreter": _INTERPRETER}


def image_of(template: str) -> str:
    """The image a template's sandboxes boot (a template id not listed names an image)."""
    known = TEMPLATES.get(template)
    return known.image if known is not None else template


@functools.cache
def _program(name: str) -> bytes:
    """A service's program, read once (every create of its template writes it in)."""
    return (Path(__file__).parent / name).read_bytes()


def start_service(guest, template: str) -> None:
    """Start the template's service in a freshly booted sandbox (``guest``: its
    :class:`~qemubox.serve.guests.Guest`, attached) and wait until it listens; nothing for
    a template that is an image."""
    known = TEMPLATES.get(template)
    if known is None or known.service is None:
        return
    service = known.service
    path = f"/run/qemubox-{service.program}"  # the guest's tmpfs: gone with the sandbox
    who = guest.who(service.user)
    box = guest.box()
    box.write_file(path, _program(service.program), 0o644)
    ready = threading.Event()
    said = bytearray()  # its last words, should it fail

    def output(data: bytes) -> None:
        said.extend(data)
        del said[:-SAID_KEPT]
        if b"ready\n" in said:
            ready.set()

    argv = ["python3", path, str(service.port)]
    process = box.processes.start(
        argv,
        {"HOME": who.home, "USER": who.name},
        who.home,
        who.ids,
        keep=note_of({"cmd": argv[0], "args": argv[1:], "envs": {}, "cwd": who.home}, None),
        on_stdout=output,
        on_stderr=output,
    )
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready.wait(0.05):
        if not process.running or time.monotonic() > deadline:  # ended, or silent too long
            with contextlib.suppress(QemuboxError):
                process.kill()
            lines = bytes(said).decode(errors="replace").strip().splitlines()
            why = lines[-1][-300:] if lines else "no word from it"  # a traceback's last line
            raise SandboxError(f"the {template} service did not start: {why}")
