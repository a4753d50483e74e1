"""The E2B control plane over the registry: create, list, get, kill, set timeout, pause,
connect/resume, metrics — each route parses its request into one registry call on a worker
thread and answers E2B's JSON shapes, or ``{code, message}`` with E2B's status."""

from __future__ import annotations

import asyncio
import base64
import json
import traceback
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qemubox.errors import InputError, QemuboxError
from qemubox.serve import model
from qemubox.serve.model import BadRequest
from qemubox.serve.registry import Conflict, NotFound, Registry

MAX_BODY = 1 << 20  # bytes of a control-plane request body


class TooLarge(Exception):
    pass


def error(status: int, message: str, **more) -> JSONResponse:
    """E2B's ``{code, message}`` error (and ``more`` fields, as its proxy adds)."""
    return JSONResponse({"code": status, "message": message, **more}, status_code=status)


async def body_json(request: Request, required: bool = True):
    """The request's JSON body, read at most MAX_BODY bytes (a larger one is refused before
    it is all read)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise TooLarge(f"the body is {int(length)} bytes; at most {MAX_BODY}")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise TooLarge(f"the body is over {MAX_BODY} bytes")
    if not data:
        if required:
            raise BadRequest("a JSON body is needed")
        return {}
    try:
        return json.loads(data)
    except ValueError as err:
        raise BadRequest(f"the body is not JSON: {err}") from None


class Control:
    def __init__(self, registry: Registry, session_of: Callable) -> None:
        self.registry = registry
        self.session_of = session_of  # template -> Session (InputError: unknown template)

    def routes(self) -> list[Route]:
        r = self.guarded
        return [
            Route("/sandboxes", r(self.create), methods=["POST"]),
            Route("/v2/sandboxes", r(self.create_v2), methods=["POST"]),
            Route("/sandboxes", r(self.list_v1), methods=["GET"]),
            Route("/v2/sandboxes", r(self.list_v2), methods=["GET"]),
            Route("/sandboxes/metrics", r(self.many_metrics), methods=["GET"]),
            Route("/sandboxes/{id}", r(self.info), methods=["GET"]),
            Route("/sandboxes/{id}", r(self.kill), methods=["DELETE"]),
            Route("/sandboxes/{id}/timeout", r(self.timeout), methods=["POST"]),
            Route("/sandboxes/{id}/pause", r(self.pause), methods=["POST"]),
            Route("/sandboxes/{id}/resume", r(self.resume), methods=["POST"]),
            Route("/sandboxes/{id}/connect", r(self.connect), methods=["POST"]),
            Route("/v2/sandboxes/{id}/connect", r(self.connect), methods=["POST"]),
            Route("/sandboxes/{id}/metrics", r(self.metrics), methods=["GET"]),
            Route("/sandboxes/{id}/refreshes", r(self.refresh), methods=["POST"]),
        ]

    def guarded(self, handler: Callable) -> Callable:
        async def run(request: Request):
            try:
                return await handler(request, request.scope["qemubox.owner"])
            except BadRequest as err:
                return error(400, str(err))
            except TooLarge as err:
                return error(413, str(err))
            except NotFound as err:
                return error(404, str(err))
            except Conflict as err:
                return error(409, str(err))
            except InputError as err:
                return error(400, str(err))
            except QemuboxError as err:
                return error(500, str(err))
            except Exception as err:  # a defect: said in one line, told in full on stderr
                traceback.print_exc()
                return error(500, f"internal error: {type(err).__name__}: {err}")

        return run

    async def _do(self, fn: Callable, *args):
        return await asyncio.to_thread(fn, *args)

    # --- routes ---------------------------------------------------------------------------------

    async def create_v2(self, request: Request, owner: str):
        """The current create: every sandbox's envd takes requests with its token only."""
        return await self.create(request, owner, secure=True)

    async def create(self, request: Request, owner: str, secure: bool = False):
        parsed = model.CreateRequest.parse(await body_json(request), secure)
        try:
            session = await self._do(self.session_of, parsed.template)
        except InputError as err:
            raise BadRequest(f"templateID: {err}") from None
        served = await self._do(self.registry.create, owner, parsed, session)
        return JSONResponse(served.created(), status_code=201)

    async def info(self, request: Request, owner: str):
        sandbox_id = request.path_params["id"]
        served = await self._do(self.registry.served, sandbox_id, owner)
        state, deadline = await self._do(self.registry.state, sandbox_id)
        if state is None:
            raise NotFound(f"sandbox {sandbox_id!r} not found")
        return JSONResponse(served.detail(state, deadline))

    async def kill(self, request: Request, owner: str):
        await self._do(self.registry.kill, request.path_params["id"], owner)
        return Response(status_code=204)

    async def timeout(self, request: Request, owner: str):
        body = await body_json(request)
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        seconds = model.timeout_of(body.get("timeout"), default=None)
        await self._do(self.registry.set_timeout, request.path_params["id"], owner, seconds)
        return Response(status_code=204)

    async def refresh(self, request: Request, owner: str):
        body = await body_json(request, required=False)
        duration = body.get("duration", model.DEFAULT_TIMEOUT) if isinstance(body, dict) else 0
        seconds = model.timeout_of(duration, "duration", default=None)
        await self._do(self.registry.set_timeout, request.path_params["id"], owner, seconds)
        return Response(status_code=204)

    async def pause(self, request: Request, owner: str):
        await self._do(self.registry.pause, request.path_params["id"], owner)
        return Response(status_code=204)

    async def connect(self, request: Request, owner: str):
        body = await body_json(request)
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        seconds = model.timeout_of(body.get("timeout"))
        sandbox_id = request.path_params["id"]
        served, resumed = await self._do(self.registry.connect, sandbox_id, owner, seconds)
        return JSONResponse(served.created(), status_code=201 if resumed else 200)

    async def resume(self, request: Request, owner: str):
        body = await body_json(request, required=False)
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        seconds = model.timeout_of(body.get("timeout"))
        sandbox_id = request.path_params["id"]
        await self._do(self.registry.served, sandbox_id, owner)
        state, _ = await self._do(self.registry.state, sandbox_id)
        if state == "running":
            raise Conflict(f"sandbox {sandbox_id!r} is already running")
        served, _ = await self._do(self.registry.connect, sandbox_id, owner, seconds)
        return JSONResponse(served.created(), status_code=201)

    async def _listed(self, request: Request, owner: str, states: set[str]) -> list[dict]:
        wanted = model.metadata_query(request.query_params.get("metadata"))
        template = request.query_params.get("template")
        found = await self._do(self.registry.listed, owner)
        return [
            (served, served.listed(state, deadline))
            for served, state, deadline in found
            if state in states
            and all(served.metadata.get(k) == v for k, v in wanted.items())
            and (template is None or served.template == template)
        ]

    async def list_v1(self, request: Request, owner: str):
        found = await self._listed(request, owner, {"running"})
        return JSONResponse([listed for _, listed in found])

    async def list_v2(self, request: Request, owner: str):
        q = request.query_params
        states = model.states_query(q.getlist("state"))
        limit = model.limit_query(q.get("limit"))
        descending = q.get("order", "desc") != "asc"
        if q.get("order", "desc") not in ("asc", "desc"):
            raise BadRequest(f"order: asc or desc, not {q.get('order')!r}")
        after = model.parse_time(q["startedAfter"], "startedAfter") if "startedAfter" in q else None
        found = await self._listed(request, owner, states)
        if after is not None:
            found = [f for f in found if f[0].started >= after]
        found.sort(key=lambda f: (f[0].started, f[0].id), reverse=descending)
        token = q.get("nextToken")
        if token:
            mark = _read_token(token)
            found = [
                f for f in found if ((f[0].started, f[0].id) < mark) == descending
                and (f[0].started, f[0].id) != mark
            ]  # fmt: skip
        page = found[:limit]
        headers = {}
        if len(found) > limit:
            last = page[-1][0]
            headers["X-Next-Token"] = _make_token(last.started, last.id)
        return JSONResponse([listed for _, listed in page], headers=headers)

    async def metrics(self, request: Request, owner: str):
        q = request.query_params
        start, end = (_unix(q.get(k), k) for k in ("start", "end"))
        found = await self._do(self.registry.metrics, request.path_params["id"], owner, start, end)
        return JSONResponse(found)

    async def many_metrics(self, request: Request, owner: str):
        ids = [i for v in request.query_params.getlist("sandbox_ids") for i in v.split(",") if i]
        out = {}
        for sandbox_id in ids[:100]:
            try:
                found = await self._do(self.registry.metrics, sandbox_id, owner, None, None)
            except NotFound:
                continue
            if found:
                out[sandbox_id] = found[-1]
        return JSONResponse({"sandboxes": out})


def _unix(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    if not text.isdigit():
        raise BadRequest(f"{name}: expected seconds since the epoch, got {text!r}")
    return float(text)


def _make_token(started: float, sandbox_id: str) -> str:
    return base64.urlsafe_b64encode(f"{started!r}|{sandbox_id}".encode()).decode()


def _read_token(token: str) -> tuple[float, str]:
    try:
        started, _, sandbox_id = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        return float(started), sandbox_id
    except ValueError:
        raise BadRequest("nextToken: not a token this server gave") from None
