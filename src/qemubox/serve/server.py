"""``qemubox serve``: the templates made ready (``base`` built once, with progress), the
served sandboxes of an earlier server adopted, then the application on uvicorn."""

from __future__ import annotations

import functools
import sys
from dataclasses import replace

from qemubox.errors import InputError
from qemubox.sandbox.spec import Session
from qemubox.serve.model import DEFAULT_TEMPLATE
from qemubox.serve.registry import MEMORY

REFUSED_TEMPLATES = {"host"}  # an API client never reads this machine's own files


def session_of(template: str, base: Session | None = None) -> Session:
    """The session of a sandbox made from ``template``: one of E2B's templates qemubox makes
    (templates.py), or an image known by name (a path, a container transport or ``host`` is
    no template: they would name this machine's files)."""
    from qemubox.image import catalog
    from qemubox.serve.templates import image_of

    image = image_of(template)
    if (
        image in REFUSED_TEMPLATES
        or catalog.is_path(image)
        or ":" in image
        or (image not in catalog.BUILTIN and not catalog.IMAGES.exists(image))
    ):
        raise InputError(f"unknown template {template!r}: see `qemubox image ls`")
    session = replace(base or Session(memory=MEMORY), image=image)
    session.validate()
    return session


def prepare(template: str, base: Session | None = None) -> None:
    """Build the template's image now if it is not built (a first server's ``base``), and
    find the kernel (a bad ``--kernel`` is said before the server listens)."""
    from qemubox import arch
    from qemubox.image import catalog
    from qemubox.kernel.artifacts import choose_kernel

    session = session_of(template, base)
    choose_kernel(session.kernel, arch=session.arch)
    name, kind = catalog.check(session.image)
    record = arch.get(session.arch) if session.arch else arch.host()
    catalog.ensure_built(catalog.root_plan(name, kind, record.debian_arch, "9p"), record.name)


def check_address(host: str, port: int) -> None:
    """That ``host:port`` can be listened on now: one line naming it when it cannot."""
    import socket

    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(info[0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(info[4])
    except OSError as err:
        raise InputError(f"--listen {host}:{port}: {err.strerror or err}") from None


def serve(
    host: str,
    port: int,
    pool: int = 0,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    kernel: str | None = None,
) -> None:
    import threading

    import uvicorn

    from qemubox.serve.app import App
    from qemubox.serve.keys import KeyRing
    from qemubox.serve.registry import SERVED, Registry
    from qemubox.serve.spares import Spares

    check_address(host, port)  # before anything is built or adopted
    keys = KeyRing()
    base = Session(memory=MEMORY, kernel=kernel)
    sessions = functools.partial(session_of, base=base)
    prepare(DEFAULT_TEMPLATE, base)
    spares = Spares(pool, sessions, SERVED)
    registry = Registry(spares)
    adopted = registry.adopt()
    if pool:
        spares.want(DEFAULT_TEMPLATE)
        threading.Thread(target=spares.run, name="spares", daemon=True).start()
    if not len(keys):
        print(
            "qemubox serve: no API key yet: make one with `qemubox serve key add NAME`",
            file=sys.stderr,
        )
    if adopted:
        print(f"qemubox serve: adopted {len(adopted)} sandbox(es)", file=sys.stderr)
    scheme = "https" if tls_cert else "http"
    print(f"qemubox serve: listening on {scheme}://{host}:{port}", file=sys.stderr, flush=True)
    app = App(registry, keys, sessions)
    uvicorn.run(
        app, host=host, port=port, log_level="warning", lifespan="on",
        timeout_graceful_shutdown=5, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
    )  # fmt: skip
