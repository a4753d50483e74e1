"""The MCP door: each tool of ``tools.py`` registered with its JSON schema (from its
typed arguments), run in a worker thread while progress notifications go out every few
seconds, its result as text (JSON) plus structured content, and any qemubox error a tool
error of one line — never a crashed server. Served over stdio, or streamable HTTP behind
a bearer token (``--listen``)."""

from __future__ import annotations

import hmac
import json
import threading
import time
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

    if "progress" in work.__code__.co_varnames:
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

    @server.tool()
    async def sandbox_run(
        ctx: Context,
        command: str | list[str],
        image: str = "minimal",
        kernel: str | None = None,
        memory: str = "512M",
        timeout: float | None = 60.0,
        network: str = "none",
        files: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Run a command in a fresh sandbox VM and return its stdout, stderr and exit code.
        A string command runs under `sh -c`; a list is the argv. `files` (guest path ->
        text) are written first. Output is cut at 64 KiB per stream (`truncated`). `image`:
        minimal, debian, host, an image name of `qemubox image ls`, or a container image
        (oci-archive:FILE, docker-archive:FILE, oci:DIR:TAG), whose Env, WorkingDir and User
        apply."""
        return await _call(
            ctx, tools.sandbox_run, command, image, kernel, memory, timeout, network, files
        )

    @server.tool()
    async def sandbox_create(
        ctx: Context,
        name: str,
        image: str = "minimal",
        kernel: str | None = None,
        memory: str = "512M",
        network: str = "none",
        ttl: float | None = None,
    ) -> dict[str, Any]:
        """Start a named sandbox that lives on between calls (until removed, or unused for
        `ttl` seconds)."""
        return await _call(ctx, tools.sandbox_create, name, image, kernel, memory, network, ttl)

    @server.tool()
    async def sandbox_exec(
        ctx: Context,
        name: str,
        command: str | list[str],
        timeout: float | None = 60.0,
        cwd: str = "/",
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Run a command in the named sandbox; its stdout, stderr and exit code."""
        return await _call(ctx, tools.sandbox_exec, name, command, timeout, cwd, env)

    @server.tool()
    async def sandbox_write_file(
        ctx: Context, name: str, path: str, content: str, mode: int = 0o644
    ) -> dict[str, Any]:
        """Write a text file (at most 1 MiB) in the named sandbox."""
        return await _call(ctx, tools.sandbox_write_file, name, path, content, mode)

    @server.tool()
    async def sandbox_read_file(ctx: Context, name: str, path: str) -> dict[str, Any]:
        """Read a file of the named sandbox as text (cut at 1 MiB: `truncated`)."""
        return await _call(ctx, tools.sandbox_read_file, name, path)

    @server.tool()
    async def sandbox_list(ctx: Context) -> dict[str, Any]:
        """The named sandboxes: name, state, image, kernel, memory, ports, expiry."""
        return await _call(ctx, tools.sandbox_list)

    @server.tool()
    async def sandbox_remove(ctx: Context, name: str, force: bool = True) -> dict[str, Any]:
        """Remove a named sandbox (killed first when running and `force`)."""
        return await _call(ctx, tools.sandbox_remove, name, force)

    @server.tool()
    async def kernel_build(
        ctx: Context,
        source: str | None = None,
        version: str | None = None,
        profile: str = "minimal",
        fragments: list[str] | None = None,
        config: list[str] | None = None,
        arch: str | None = None,
    ) -> dict[str, Any]:
        """Configure (verified), build and install a guest kernel: from a source tree or
        tarball, or Debian's linux-source-X.Y (`version`). Options that do not stick fail the
        call with the reason for each. Cached: an unchanged build returns at once."""
        return await _call(
            ctx, tools.kernel_build, source, version, profile, fragments, config, arch
        )

    @server.tool()
    async def kernel_run(
        ctx: Context,
        kernel: str,
        command: str | list[str],
        memory: str = "512M",
        timeout: float | None = 60.0,
    ) -> dict[str, Any]:
        """Boot `kernel` (a path, or `debian`) and run a command; a panic or a boot failure
        comes back with the guest console's last lines."""
        return await _call(ctx, tools.kernel_run, kernel, command, memory, timeout)

    @server.tool()
    async def kconfig_explain(
        ctx: Context,
        tree: str,
        option: str,
        config: str | None = None,
        arch: str | None = None,
    ) -> dict[str, Any]:
        """Why a kernel option has its value in a .config (default: the tree's): what keeps
        it from y, or what holds it where it is (dependencies, selects, choices, ranges)."""
        return await _call(ctx, tools.kconfig_explain, tree, option, config, arch)

    @server.tool()
    async def matrix_run(ctx: Context, file: str) -> dict[str, Any]:
        """Run a qemubox matrix file (kernels x tests x axes); the per-cell summary."""
        return await _call(ctx, tools.matrix_run, file)

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
