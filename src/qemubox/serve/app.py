"""The one ASGI application ``qemubox serve`` listens with, for the API and every sandbox's
envd: a request naming a sandbox (``E2b-Sandbox-Id``, as the SDKs send when
``E2B_SANDBOX_URL`` is set; or a ``Host`` of E2B's ``PORT-ID.DOMAIN``, as older SDKs
address it) goes to that sandbox's envd — once it is known to run, and its
access token (or a signed URL's signature) checked when it has one — or, for another port
(``E2b-Sandbox-Port``, or the host's), to what listens on that port in its guest; any other
request is the control plane's, once its API key is checked.

What each door holds:
- the control plane: no key or a wrong one, 401; a sandbox of another key, 404; bodies
  over 1 MiB, 413 (read no further);
- envd: a sandbox that does not run, 502 with E2B's proxy's words (the SDKs rely on them);
  a secure sandbox without its token, 401 (constant-time comparison); a Connect message
  over 4 MiB refused; uploads over 256 MiB refused;
- other ports: open to whoever knows the sandbox's id, as E2B's are by default; a sandbox
  made with ``network.allowPublicTraffic: false`` wants its traffic access token in
  ``e2b-traffic-access-token`` (403 without; constant-time comparison)."""

from __future__ import annotations

import asyncio
import hmac
import re
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from qemubox.serve import files, ports
from qemubox.serve.control import Control, error
from qemubox.serve.envd import (
    Context,
    FilesystemService,
    ProcessService,
    Service,
    not_found_message,
)
from qemubox.serve.guests import Gone, Guest
from qemubox.serve.keys import KeyRing
from qemubox.serve.model import ENVD_PORT
from qemubox.serve.proto import filesystem_pb, process_pb
from qemubox.serve.registry import Registry

SAMPLE_EVERY = 5  # seconds between metrics samples
WORKER_THREADS = 256
# A sandbox's port by name, as E2B's SDKs before E2B_SANDBOX_URL address it (PORT-ID.DOMAIN).
_SANDBOX_HOST = re.compile(r"(\d{1,5})-([a-z0-9]{1,63})\.")


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class App:
    def __init__(self, registry: Registry, keys: KeyRing, session_of) -> None:
        self.registry = registry
        self.keys = keys
        self.control = Starlette(
            routes=Control(registry, session_of).routes(),
            exception_handlers={404: self._no_route, 405: self._no_route},
        )
        self.control.add_route("/health", self._health, methods=["GET"])
        context = Context(registry.guest)
        self.services = {
            "/process.Process/": Service(process_pb, "process.Process", ProcessService(context)),
            "/filesystem.Filesystem/": Service(
                filesystem_pb, "filesystem.Filesystem", FilesystemService(context)
            ),
        }
        self.files = Starlette(routes=[Route("/files", self._files, methods=["GET", "POST"])])
        self.envd_health = Starlette(routes=[Route("/health", self._envd_health)])
        self._sampler: asyncio.Task | None = None

    async def _no_route(self, request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        return error(status, f"no {request.method} {request.url.path[:200]} in this API")

    async def _health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def _envd_health(self, request: Request) -> Response:
        return Response(status_code=204)

    async def _files(self, request: Request) -> Response:
        guest = request.scope["qemubox.guest"]
        if request.method == "GET":
            return await files.download(request, guest)
        return await files.upload(request, guest)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        sandbox_id = _header(scope, b"e2b-sandbox-id")
        port = _header(scope, b"e2b-sandbox-port") or str(ENVD_PORT)
        if sandbox_id is None and (host := _SANDBOX_HOST.match(_header(scope, b"host") or "")):
            port, sandbox_id = host.group(1), host.group(2)  # E2B's PORT-ID.DOMAIN
        if (
            sandbox_id is None
            and scope["path"] == "/files"
            and b"signature=" in scope.get("query_string", b"")
        ):
            sandbox_id = await asyncio.to_thread(self._signed_for, scope)
        if sandbox_id is not None:
            if port == str(ENVD_PORT):
                await self._envd(sandbox_id, scope, receive, send)
            else:
                await self._port(sandbox_id, port, scope, receive, send)
            return
        key = _header(scope, b"x-api-key")
        bearer = _header(scope, b"authorization")
        if key is None and bearer and bearer.lower().startswith("bearer "):
            key = bearer[7:].strip()
        owner = self.keys.owner(key)
        if owner is None and scope["path"] != "/health":
            response = error(401, "Invalid API key" if key else "An API key is needed")
            await response(scope, receive, send)
            return
        scope["qemubox.owner"] = owner
        await self.control(scope, receive, send)

    def _signed_for(self, scope) -> str | None:
        """The secure sandbox whose token signed this URL (a signed URL names no sandbox)."""
        request = Request(scope)
        for served in self.registry.secure():
            if served.token and files.signed(request, served.token, files.operation_of(request)):
                return served.id
        return None

    async def _running(self, sandbox_id: str, scope, receive, send) -> Guest | None:
        """The sandbox's guest; None when it does not run (E2B's proxy's 502 is sent)."""
        try:
            if await asyncio.to_thread(self.registry.running, sandbox_id):
                return await asyncio.to_thread(self.registry.guest, sandbox_id)
        except Gone:
            pass
        await error(502, not_found_message(sandbox_id), sandboxId=sandbox_id)(scope, receive, send)
        return None

    async def _port(self, sandbox_id: str, text: str, scope, receive, send) -> None:
        """Another port of the sandbox: relayed into its guest (see ports.py), once its
        traffic token is checked where it has one."""
        port = ports.parse_port(text)
        if port is None:
            said = f"{text[:8]!r} is not a port"
            await error(400, said, sandboxId=sandbox_id)(scope, receive, send)
            return
        guest = await self._running(sandbox_id, scope, receive, send)
        if guest is None:
            return
        token = guest.served.traffic_token
        given = _header(scope, b"e2b-traffic-access-token") or ""
        if token and not hmac.compare_digest(given.encode(), token.encode()):
            why = "the sandbox's traffic access token is needed (e2b-traffic-access-token)"
            await error(403, why, sandboxId=sandbox_id)(scope, receive, send)
            return
        await ports.relay(guest, port, scope, receive, send)

    async def _envd(self, sandbox_id: str, scope, receive, send) -> None:
        guest = await self._running(sandbox_id, scope, receive, send)
        if guest is None:
            return
        path = scope["path"]
        token = guest.served.token
        if token and path != "/health":
            given = _header(scope, b"x-access-token") or ""
            request = Request(scope)
            allowed = hmac.compare_digest(given.encode(), token.encode()) or (
                path == "/files" and files.signed(request, token, files.operation_of(request))
            )
            if not allowed:
                await error(401, "the sandbox's access token is needed")(scope, receive, send)
                return
        scope["qemubox.guest"] = guest
        if _header(scope, b"e2b-sandbox-id") != sandbox_id:  # found by its host or signature
            headers = [(k, v) for k, v in scope["headers"] if k != b"e2b-sandbox-id"]
            scope["headers"] = [*headers, (b"e2b-sandbox-id", sandbox_id.encode())]
        for prefix, service in self.services.items():
            if path.startswith(prefix):
                await service(scope, receive, send)
                return
        if path == "/files":
            await self.files(scope, receive, send)
        elif path == "/health":
            await self.envd_health(scope, receive, send)
        else:
            await error(404, f"envd has no {path}")(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Blocking calls (a boot, a guest's answer) each hold a worker thread: enough
                # that creates waiting their turn to boot never hold up other sandboxes' calls.
                workers = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="serve")
                asyncio.get_running_loop().set_default_executor(workers)
                self._sampler = asyncio.create_task(self._sample())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._sampler is not None:
                    self._sampler.cancel()
                await asyncio.to_thread(self.registry.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _sample(self) -> None:
        while True:
            await asyncio.to_thread(self.registry.sample)
            await asyncio.sleep(SAMPLE_EVERY)
