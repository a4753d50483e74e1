"""The MCP door: each tool of ``tools.py`` registered as it is (its name, docstring and
typed arguments make the tool and its JSON schema), run in a worker thread while progress
notifications go out every few seconds, its result as text (JSON) plus structured content,
and any qemubox error a tool error of one line — never a crashed server. Served over
stdio, or streamable HTTP behind a bearer token (``--listen``)."""

from __future__ import annotations

import hmac
import inspect
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from qemubox import __version__
from qemubox.errors import QemuboxError
from qemubox.mcpserver import tools

HEARTBEAT = 5.0  # seconds between progress notifications of a long tool


async def _call(ctx: Context | None, work, *args, **kwargs) -> dict[str, Any]:
    """``work`` in a worker thread; progress reported meanwhile; errors as tool errors."""
    started = time.monotonic()
    said: list[str] = []
    lock = threading.Lock()

    def progress(message: str) -> None:
        with lock:
            said.append(message)

    if "progress" in inspect.signature(work).parameters:
        kwargs["progress"] = progress
    done = anyio.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work(*args, **kwargs)
        except QemuboxError as err:
            outcome["error"] = tools.describe(err)
        except OSError as err:
            outcome["error"] = f"{err.filename or ''}: {err.strerror or err}".strip(": ")

    async def worker() -> None:
        await anyio.to_thread.run_sync(run)
        done.set()

    async with anyio.create_task_group() as group:
        group.start_soon(worker)
        step = 0
        while not done.is_set():
            with anyio.move_on_after(HEARTBEAT):
                await done.wait()
            if done.is_set() or ctx is None:
                continue
            step += 1
            with lock:
                message = said[-1] if said else f"working, {time.monotonic() - started:.0f} s"
            await ctx.report_progress(step, None, message)
    if "error" in outcome:
        raise ToolError(outcome["error"])
    return outcome["value"]


def _tool(work: Callable[..., dict]) -> Callable[..., Any]:
    """The MCP tool of ``work``: its name, description (docstring), arguments with their
    types and defaults (the JSON schema is made of them), plus the Context the SDK hands a
    tool to report progress with; ``work``'s ``progress`` argument is ours, not the
    client's."""
    signature = inspect.signature(work, eval_str=True)
    params = [p for p in signature.parameters.values() if p.name != "progress"]

    async def tool(ctx: Context, **kwargs: Any) -> dict[str, Any]:
        return await _call(ctx, work, **kwargs)

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Context)
    tool.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[context, *params], return_annotation=dict[str, Any]
    )
    tool.__annotations__ = {
        "ctx": Context,
        **{p.name: p.annotation for p in params},
        "return": dict[str, Any],
    }
    tool.__name__ = tool.__qualname__ = work.__name__
    tool.__doc__ = work.__doc__
    return tool


def build() -> MCPServer:
    server = MCPServer(
        "qemubox",
        version=__version__,
        log_level="WARNING",
        instructions=(
            "Linux sandboxes in QEMU VMs: run commands with their true output and exit code, "
            "keep named sandboxes, build and boot kernels, explain kernel options."
        ),
    )

    for work in tools.TOOLS:
        server.tool()(_tool(work))
    return server


def serve_stdio() -> None:
    build().run("stdio")


def serve_http(host: str, port: int, token: str) -> None:
    """Streamable HTTP at ``/mcp``; every request must carry ``Authorization: Bearer
    TOKEN`` (compared in constant time), else 401."""
    import uvicorn

    app = build().streamable_http_app()
    expected = f"Bearer {token}".encode()

    async def guarded(scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                body = json.dumps({"error": "a bearer token is required"}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    uvicorn.run(guarded, host=host, port=port, log_level="warning")
