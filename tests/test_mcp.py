"""`qemubox mcp` driven by the official `mcp` SDK's own client over stdio, as an agent
drives it: the tools and their schemas, runs with their true output and exit status, a
named sandbox's life, a panicking kernel's console, bad arguments and timeouts as tool
errors or results (never a crashed server), progress on long calls, bounded output."""

from __future__ import annotations

import json
import os
import sys

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

TOOLS = {
    "sandbox_run",
    "sandbox_create",
    "sandbox_exec",
    "sandbox_write_file",
    "sandbox_read_file",
    "sandbox_list",
    "sandbox_remove",
    "kernel_build",
    "kernel_run",
    "kconfig_explain",
    "matrix_run",
}


def server() -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "qemubox", "mcp"], env=dict(os.environ)
    )


def session(body):
    """Run ``body(client)`` against a fresh server; its return value."""

    async def main():
        async with Client(server(), read_timeout_seconds=600) as client:
            return await body(client)

    return anyio.run(main)


def call(name: str, arguments: dict, progress=None):
    async def body(client):
        return await client.call_tool(name, arguments, progress_callback=progress)

    return session(body)


def text(result) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def test_the_tools_and_their_schemas():
    async def body(client):
        listed = (await client.list_tools()).tools
        return {t.name: t for t in listed}

    tools = session(body)
    assert set(tools) == TOOLS
    run = tools["sandbox_run"].input_schema
    assert run["required"] == ["command"]
    command_types = {json.dumps(s, sort_keys=True) for s in run["properties"]["command"]["anyOf"]}
    assert '{"type": "string"}' in command_types
    assert {"image", "kernel", "memory", "timeout", "network", "files"} <= set(run["properties"])
    assert "ctx" not in run["properties"]
    assert all(tools[name].description for name in TOOLS)
    assert tools["kconfig_explain"].input_schema["required"] == ["tree", "option"]


def test_bad_arguments_are_tool_errors_and_the_server_lives_on():
    async def body(client):
        bad_net = await client.call_tool("sandbox_run", {"command": "true", "network": "wide"})
        bad_type = await client.call_tool("sandbox_run", {"command": 5})
        bad_name = await client.call_tool("sandbox_exec", {"name": "nope", "command": "true"})
        bad_arch = await client.call_tool("sandbox_run", {"command": "true", "arch": "vax"})
        still = await client.list_tools()
        return bad_net, bad_type, bad_name, bad_arch, still

    bad_net, bad_type, bad_name, bad_arch, still = session(body)
    assert bad_net.is_error
    assert text(bad_net).endswith(
        "network must be none, restricted, user, allow=LIST or deny=LIST, not 'wide'"
    )
    assert bad_type.is_error and "command" in text(bad_type)
    assert bad_name.is_error and "nope" in text(bad_name)
    assert bad_arch.is_error and text(bad_arch).endswith(
        "unknown architecture 'vax' (qemubox knows x86_64, arm64, armhf, i386, ppc64le, "
        "s390x, riscv64, mips64el)"
    )
    assert len(still.tools) == len(TOOLS)


@pytest.mark.kernel
@pytest.mark.qemu
def test_a_run_gives_the_true_output_exit_status_and_progress(kernel):
    seen = []

    async def progress(value, total, message):
        seen.append(message)

    r = call(
        "sandbox_run",
        {
            "command": "cat /tmp/in; echo err >&2; sleep 7; exit 3",
            "kernel": kernel,
            "memory": "256M",
            "files": {"/tmp/in": "written first\n"},
        },
        progress,
    )
    assert not r.is_error, text(r)
    out = r.structured_content
    assert (out["exit_code"], out["stdout"], out["stderr"]) == (3, "written first\n", "err\n")
    assert not out["truncated"] and "command" in out["timings_ms"]
    assert json.loads(text(r))["exit_code"] == 3  # the same as text, for any client
    assert seen, "a call of more than a few seconds reports progress"


@pytest.mark.kernel
@pytest.mark.qemu
def test_timeouts_and_bounded_output(kernel):
    async def body(client):
        slow = await client.call_tool(
            "sandbox_run", {"command": "sleep 30", "kernel": kernel, "timeout": 2}
        )
        big = await client.call_tool(
            "sandbox_run",
            {"command": ["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' a"], "kernel": kernel},
        )
        return slow, big

    slow, big = session(body)
    timed = slow.structured_content
    assert (timed["exit_code"], timed["timed_out"]) == (124, True)
    out = big.structured_content
    assert out["truncated"] and len(out["stdout"]) == 64 << 10
    assert out["bytes_dropped"] == 200000 - (64 << 10)


@pytest.mark.kernel
@pytest.mark.qemu
def test_a_named_sandbox_from_creation_to_removal(kernel, state):
    async def body(client):
        steps = [
            await client.call_tool(
                "sandbox_create", {"name": "agent", "kernel": kernel, "memory": "256M"}
            ),
            await client.call_tool(
                "sandbox_write_file", {"name": "agent", "path": "/tmp/note", "content": "kept\n"}
            ),
            await client.call_tool(
                "sandbox_exec",
                {
                    "name": "agent",
                    "command": ["sh", "-c", "cat /tmp/note; pwd; echo $X"],
                    "cwd": "/tmp",
                    "env": {"X": "y"},
                },
            ),
            await client.call_tool("sandbox_read_file", {"name": "agent", "path": "/tmp/note"}),
            await client.call_tool("sandbox_list", {}),
            await client.call_tool("sandbox_remove", {"name": "agent"}),
            await client.call_tool("sandbox_list", {}),
        ]
        return steps

    created, wrote, ran, read, listed, removed, after = session(body)
    for step in (created, wrote, ran, read, listed, removed, after):
        assert not step.is_error, text(step)
    assert ran.structured_content["stdout"] == "kept\n/tmp\ny\n"
    assert read.structured_content["content"] == "kept\n"
    (box,) = listed.structured_content["sandboxes"]
    assert (box["name"], box["state"]) == ("agent", "running")
    assert after.structured_content["sandboxes"] == []


@pytest.mark.kernel
@pytest.mark.qemu
def test_a_kernel_that_panics_comes_back_with_its_console(kernel):
    r = call("kernel_run", {"kernel": kernel, "command": "echo c > /proc/sysrq-trigger"})
    assert not r.is_error, text(r)
    out = r.structured_content
    assert (out["exit_code"], out["error"]) == (122, "KernelPanic")
    assert "sysrq" in out["console_tail"].lower()


def test_streamable_http_needs_its_token(tmp_path):
    import socket
    import subprocess
    import time
    import urllib.error
    import urllib.request

    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = "t" * 32
    proc = subprocess.Popen(
        [sys.executable, "-m", "qemubox", "mcp", "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, "QEMUBOX_MCP_TOKEN": token},
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        for header in ({}, {"Authorization": "Bearer wrong"}):
            request = urllib.request.Request(url, data=b"{}", headers=header, method="POST")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401

        async def main():
            headers = {"Authorization": f"Bearer {token}"}
            async with (
                httpx2.AsyncClient(headers=headers) as http,
                Client(streamable_http_client(url, http_client=http)) as client,
            ):
                return await client.list_tools()

        assert {t.name for t in anyio.run(main).tools} == TOOLS
    finally:
        proc.terminate()
        proc.wait(10)
    r = subprocess.run(
        [sys.executable, "-m", "qemubox", "mcp", "--listen", "nowhere"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--listen 'nowhere': expected HOST:PORT" in r.stderr


@pytest.mark.kernel
@pytest.mark.qemu
def test_the_kernel_developers_tools(kernel, tmp_path, monkeypatch):
    from pathlib import Path

    from qemubox.kernel.source import debian_source

    tree = str(debian_source("6.12"))
    config = str(Path(kernel).parent / "config")
    (tmp_path / "m.toml").write_text(
        f'[[kernel]]\nname = "built"\npath = "{kernel}"\n\n'
        '[[test]]\nname = "uname"\ncommand = ["uname", "-m"]\n'
    )
    trap = tmp_path / "make"  # configuring reaches make; compiling would leave a trace
    trap.write_text(
        f'#!/bin/sh\ncase " $* " in *" vmlinux "*) touch {tmp_path}/compiled; exit 1;; esac\n'
        'exec make "$@"\n'
    )
    trap.chmod(0o755)
    monkeypatch.setenv("QEMUBOX_MAKE", str(trap))

    async def body(client):
        return [
            await client.call_tool("kernel_build", {}),  # the minimal build: cached
            await client.call_tool("kernel_build", {"config": ["# CONFIG_PCI is not set"]}),
            await client.call_tool(
                "kconfig_explain", {"tree": tree, "option": "DEBUG_KERNEL", "config": config}
            ),
            await client.call_tool(
                "kconfig_explain", {"tree": tree, "option": "CONFIG_VIRTIO_BLOK", "config": config}
            ),
            await client.call_tool("matrix_run", {"file": str(tmp_path / "m.toml")}),
        ]

    built, refused, held, missing, matrix = session(body)
    assert not built.is_error, text(built)
    assert built.structured_content["profile"] == "minimal"
    assert Path(built.structured_content["kernel"]).is_file()
    assert refused.is_error and "nothing was compiled" in text(refused)
    assert "CONFIG_VIRTIO_PCI: wanted y, got n" in text(refused)
    assert "unmet dependency: depends on PCI" in text(refused)
    assert not (tmp_path / "compiled").exists()
    assert held.structured_content["value"] == "y"
    assert any("forced by select from: EXPERT" in why for why in held.structured_content["why"])
    assert "does not exist in this kernel" in missing.structured_content["why"][0]
    (cell,) = matrix.structured_content["cells"]
    assert (cell["status"], cell["stdout"], matrix.structured_content["passed"]) == (
        "pass",
        "x86_64\n",
        1,
    )


@pytest.mark.qemu
def test_a_sandbox_of_another_arch(state):
    """arch reaches the sandbox: a run and a named sandbox on s390x (Debian's kernel)."""

    async def body(client):
        run = await client.call_tool(
            "sandbox_run", {"command": "uname -m", "arch": "s390x", "memory": "256M"}
        )
        await client.call_tool("sandbox_create", {"name": "z", "arch": "s390x", "memory": "256M"})
        listed = await client.call_tool("sandbox_list", {})
        inside = await client.call_tool("sandbox_exec", {"name": "z", "command": "uname -m"})
        await client.call_tool("sandbox_remove", {"name": "z"})
        return run, listed, inside

    run, listed, inside = session(body)
    assert not run.is_error, text(run)
    assert (run.structured_content["exit_code"], run.structured_content["stdout"]) == (
        0,
        "s390x\n",
    )
    assert inside.structured_content["stdout"] == "s390x\n", text(inside)
    (z,) = listed.structured_content["sandboxes"]
    assert (z["name"], z["arch"], z["state"]) == ("z", "s390x", "running")
