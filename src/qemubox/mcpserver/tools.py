"""What each MCP tool does, as plain functions over the service layer: arguments checked
into actions, results as plain dicts with their output bounded (``MAX_OUTPUT`` bytes of
each stream, and a flag saying it was cut). A bad argument is an InputError, one line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from qemubox.errors import InputError, QemuboxError, SandboxError
from qemubox.model import session as defaults
from qemubox.model.egress import parse_network
from qemubox.service import actions
from qemubox.service.command import Capture, CommandRequest
from qemubox.service.session import SessionRequest

MAX_OUTPUT = 64 << 10  # bytes of stdout and of stderr a tool result carries
MAX_FILE = 1 << 20  # bytes of a file read or written through a tool
Progress = Callable[[str], None]


def _argv(command: str | list[str]) -> tuple[str, ...]:
    """A string is run by ``sh -c``; a list is the argv itself."""
    if isinstance(command, str):
        if not command.strip():
            raise InputError("command: empty")
        return ("sh", "-c", command)
    if not command or not all(isinstance(a, str) for a in command):
        raise InputError("command: a string, or a non-empty list of strings")
    return tuple(command)


def _timeout(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 24 * 3600:
        raise InputError(f"timeout: {value} is not between 0 and 86400 seconds")
    return value


def _session(
    image: str, kernel: str | None, memory: str, network: str, arch: str | None = None
) -> SessionRequest:
    parse_network(network)  # none, restricted, user, allow=LIST or deny=LIST
    return SessionRequest(memory=memory, image=image, kernel=kernel, net=network, arch=arch)


def _output(capture: Capture, code: int, timed_out: bool = False) -> dict:
    return {
        "exit_code": code,
        "stdout": capture.out.decode(errors="replace"),
        "stderr": capture.err.decode(errors="replace"),
        "timed_out": timed_out,
        "truncated": capture.dropped > 0,
        "bytes_dropped": capture.dropped,
    }


def _files(files: dict[str, str] | None) -> tuple[tuple[str, bytes], ...]:
    out = []
    for path, text in (files or {}).items():
        data = text.encode()
        if len(data) > MAX_FILE:
            raise InputError(f"files[{path!r}]: {len(data)} bytes, at most {MAX_FILE}")
        out.append((path, data))
    return tuple(out)


def sandbox_run(
    command: str | list[str],
    image: str = defaults.DEFAULT_IMAGE,
    kernel: str | None = None,
    memory: str = defaults.DEFAULT_MEMORY,
    timeout: float | None = defaults.DEFAULT_TIMEOUT,
    network: str = defaults.NETWORKS[0],
    files: dict[str, str] | None = None,
    arch: str | None = None,
) -> dict:
    """Run a command in a fresh sandbox VM and return its stdout, stderr and exit code.
    A string command runs under `sh -c`; a list is the argv. `files` (guest path -> text)
    are written first. Output is cut at 64 KiB per stream (`truncated`). `image`: minimal,
    debian, host, an image name of `qemubox image ls`, or a container image
    (oci-archive:FILE, docker-archive:FILE, oci:DIR:TAG), whose Env, WorkingDir and User
    apply. `arch`: the guest's architecture (x86_64, arm64, armhf, i386, ppc64le, s390x,
    riscv64, mips64el; default: the host's), emulated when it is another. `network`: none,
    restricted (no egress), user (NAT), allow=LIST (only LIST) or deny=LIST (all but LIST);
    LIST: names, *.suffix wildcards, IP addresses, CIDR ranges, comma-separated."""
    request = CommandRequest(_argv(command), timeout=_timeout(timeout))
    session = _session(image, kernel, memory, network, arch)
    action = actions.Run(request, session, files=_files(files))
    capture = Capture(MAX_OUTPUT)
    streams = capture.streams()
    result = actions.perform(action, streams)
    out = _output(capture, result.exit_code, streams.timed_out)
    out["timings_ms"] = {t.phase.value: round(t.seconds * 1000, 1) for t in result.timings}
    return out


def sandbox_create(
    name: str,
    image: str = defaults.DEFAULT_IMAGE,
    kernel: str | None = None,
    memory: str = defaults.DEFAULT_MEMORY,
    network: str = defaults.NETWORKS[0],
    ttl: float | None = None,
    arch: str | None = None,
) -> dict:
    """Start a named sandbox that lives on between calls (until removed, or unused for
    `ttl` seconds), of architecture `arch` (default: the host's)."""
    session = _session(image, kernel, memory, network, arch)
    actions.perform(actions.Create(name, session, ttl))
    return {"name": name, "state": "running"}


def sandbox_exec(
    name: str,
    command: str | list[str],
    timeout: float | None = defaults.DEFAULT_TIMEOUT,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Run a command in the named sandbox; its stdout, stderr and exit code. `cwd`
    defaults to the image's WorkingDir, else /."""
    if cwd is not None and not cwd.startswith("/"):
        raise InputError(f"cwd {cwd!r}: expected an absolute guest path")
    request = CommandRequest(_argv(command), dict(env or {}), cwd, _timeout(timeout))
    capture = Capture(MAX_OUTPUT)
    streams = capture.streams()
    code = actions.perform(actions.Exec(name, request), streams)
    return _output(capture, code, streams.timed_out)


def sandbox_write_file(name: str, path: str, content: str, mode: int = 0o644) -> dict:
    """Write a text file (at most 1 MiB) in the named sandbox."""
    data = content.encode()
    if len(data) > MAX_FILE:
        raise InputError(f"content: {len(data)} bytes, at most {MAX_FILE}")
    actions.perform(actions.WriteFile(name, path, data, mode))
    return {"path": path, "bytes": len(data)}


def sandbox_read_file(name: str, path: str) -> dict:
    """Read a file of the named sandbox as text (cut at 1 MiB: `truncated`)."""
    data = actions.perform(actions.ReadFile(name, path))
    return {
        "path": path,
        "content": data[:MAX_FILE].decode(errors="replace"),
        "bytes": len(data),
        "truncated": len(data) > MAX_FILE,
    }


def sandbox_list() -> dict:
    """The named sandboxes: name, state, image, arch, kernel, memory, ports, expiry."""
    found = actions.perform(actions.List(everything=True))
    return {"sandboxes": [s.to_dict() for s in found]}


def sandbox_remove(name: str, force: bool = True) -> dict:
    """Remove a named sandbox (killed first when running and `force`)."""
    actions.perform(actions.Remove((name,), force))
    return {"removed": name}


def kernel_build(
    source: str | None = None,
    version: str | None = None,
    profile: str = "minimal",
    fragments: list[str] | None = None,
    config: list[str] | None = None,
    arch: str | None = None,
) -> dict:
    """Configure (verified), build and install a guest kernel: from a source tree or
    tarball, or Debian's linux-source-X.Y (`version`). Options that do not stick fail the
    call with the reason for each. Cached: an unchanged build returns at once."""
    from qemubox.kernel.build import BuildRequest, ConfigMismatchError
    from qemubox.kernel.profiles import PROFILES
    from qemubox.paths import cache_dir

    if profile not in PROFILES:
        raise InputError(f"profile: one of {', '.join(PROFILES)}, not {profile!r}")
    inputs = [source, version, profile, fragments or [], config or [], arch]
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    out = cache_dir() / "mcp" / "kernels" / key
    request = BuildRequest(
        kernel_version=version,
        source=source,
        arch=arch,
        profile=profile,
        fragments=tuple(fragments or ()),
        config_items=tuple(config or ()),
        output=out,
    )
    try:
        result = actions.perform(actions.KernelBuild(request))
    except ConfigMismatchError as err:
        raise InputError(f"{err}:\n" + "\n".join(err.lines)) from None
    m = result.manifest
    return {
        "install_dir": str(result.output),
        "kernel": str(result.output / "vmlinuz"),
        "version": m["version"],
        "arch": m["arch"],
        "profile": m["profile"],
        "built": result.ran_make,
        "verified": "every fragment option has its wanted value",
        "notes": list(result.notes),
    }


def kernel_run(
    kernel: str,
    command: str | list[str],
    memory: str = defaults.DEFAULT_MEMORY,
    timeout: float | None = defaults.DEFAULT_TIMEOUT,
    arch: str | None = None,
) -> dict:
    """Boot `kernel` (a path, or `debian`: Debian's kernel package of `arch`) and run a
    command; a panic or a boot failure comes back with the guest console's last lines."""
    try:
        return sandbox_run(command, kernel=kernel, memory=memory, timeout=timeout, arch=arch)
    except SandboxError as err:
        return {
            "exit_code": err.exit_code,
            "error": type(err).__name__,
            "message": str(err),
            "console_tail": err.console_tail[-MAX_OUTPUT:],
        }


def kconfig_explain(
    tree: str, option: str, config: str | None = None, arch: str | None = None
) -> dict:
    """Why a kernel option has its value in a .config (default: the tree's): what keeps
    it from y, or what holds it where it is (dependencies, selects, choices, ranges)."""
    from qemubox.kconfig.engine import read_config
    from qemubox.kconfig.explain import explain_mismatches
    from qemubox.kconfig.fragment import parse_config_text
    from qemubox.kconfig.verify import Mismatch
    from qemubox.linux.tree import KernelTree

    name = option.removeprefix("CONFIG_")
    if not name or not all(c.isalnum() or c == "_" for c in name):
        raise InputError(f"option {option!r}: expected CONFIG_NAME")
    path = Path(config) if config else Path(tree) / ".config"
    if path.is_dir():
        path = path / ".config"
    values = read_config(path)
    got = values.get(name)
    wanted = "n" if got in ("y", "m") else "y"
    if got not in (None, "y", "m", "n"):
        wanted = got  # a value option: what bounds it
    (assignment,) = parse_config_text(f"CONFIG_{name}={wanted}", "kconfig_explain")
    kernel_tree = KernelTree.open(tree, None, arch)
    reasons = explain_mismatches(kernel_tree, path, [Mismatch(assignment, got)])
    return {
        "option": f"CONFIG_{name}",
        "value": got if got is not None else "n (not set)",
        "why": reasons.get(name, []),
        "asked": f"what keeps it from {wanted}" if wanted != got else "what bounds it",
    }


def matrix_run(file: str, progress: Progress | None = None) -> dict:
    """Run a qemubox matrix file (kernels x tests x axes); the per-cell summary."""
    from qemubox.matrix import report
    from qemubox.matrix.spec import Matrix

    m = Matrix.from_file(file)

    def events(kind: str, payload) -> None:
        if progress is not None and kind == "done":
            progress(f"{payload.cell}: {payload.status} in {payload.duration:.1f}s")

    results = actions.perform(actions.RunMatrix(m), events)
    counts = report.counts(results)
    return {
        "cells": [
            {
                "cell": r.cell,
                "status": r.status,
                "exit_code": r.exit_code,
                "duration": r.duration,
                "error": r.error,
                "stdout": r.stdout[:MAX_OUTPUT],
            }
            for r in results
        ],
        "passed": counts["pass"],
        "failed": counts["fail"],
        "errors": counts["error"],
    }


# The tools, in the order a client lists them; each one's docstring is its description.
TOOLS = (
    sandbox_run,
    sandbox_create,
    sandbox_exec,
    sandbox_write_file,
    sandbox_read_file,
    sandbox_list,
    sandbox_remove,
    kernel_build,
    kernel_run,
    kconfig_explain,
    matrix_run,
)


def describe(err: QemuboxError) -> str:
    """A tool error's text: the one line, and the console's tail when there is one."""
    tail = getattr(err, "console_tail", "")
    return str(err) + (f"\n--- guest console (last lines) ---\n{tail}" if tail else "")
