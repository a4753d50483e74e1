"""A command in a sandbox, as every door runs one: its output streamed as it comes, its
stdin forwarded, a terminal lent when asked, and the exit status qemubox exits with (the
command's, 128+N for signal N, 124 on its timeout)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from qemubox.errors import Exit, InputError, SandboxError
from qemubox.image.ociconfig import ImageConfig, command

Size = tuple[int, int]
Resize = Callable[[int, int], None]


@contextlib.contextmanager
def _no_terminal(resize: Resize) -> Iterator[Size | None]:
    yield None


@dataclass(frozen=True)
class CommandRequest:
    """What to run and how: plain data."""

    argv: tuple[str, ...]  # empty: a container image's Entrypoint + Cmd (run only)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None  # None: the image's WorkingDir, else /
    timeout: float | None = None
    interactive: bool = False  # forward stdin
    tty: bool = False  # on a pseudo-terminal in the guest
    user: str | None = None  # NAME, UID[:GID], NAME:GROUP; None: the image's User, else root
    entrypoint: str | None = None  # replaces a container image's Entrypoint (run only)


def for_image(request: CommandRequest, config: dict | None, run: bool) -> CommandRequest:
    """The request as ``docker run`` (``run``) or ``docker exec`` applies an image's config
    to it: Env under the request's own variables, WorkingDir and User unless given, and for
    ``run`` Entrypoint + Cmd around the arguments."""
    image = ImageConfig.from_dict(config) if config else ImageConfig()
    if run:
        argv = command(image, request.argv, request.entrypoint)
    elif not request.argv:
        raise InputError("exec needs a command")
    else:
        argv = request.argv
    return replace(
        request,
        argv=argv,
        env={**image.environment(), **request.env},
        cwd=request.cwd or image.workdir or "/",
        user=request.user if request.user is not None else (image.user or None),
        entrypoint=None,
    )


@dataclass
class Streams:
    """Where a command's bytes come from and go: the door's edges. ``terminal`` is given
    a function that resizes the guest's terminals and yields the terminal size to start
    with (None: no terminal); it holds the door's terminal for as long as the command runs."""

    on_stdout: Callable[[bytes], None]
    on_stderr: Callable[[bytes], None]
    stdin: object | None = None  # a binary file, read as the command reads
    terminal: Callable[[Resize], contextlib.AbstractContextManager[Size | None]] = _no_terminal
    notices: list[str] = field(default_factory=list)  # what the door should say after
    timed_out: bool = False  # the command ran past its timeout and was killed


class Capture:
    """A command's output kept in memory, at most ``limit`` bytes of each stream (the rest
    counted and dropped): for doors that answer with the output rather than stream it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.out, self.err = bytearray(), bytearray()
        self.dropped = 0

    def _keep(self, sink: bytearray) -> Callable[[bytes], None]:
        def keep(data: bytes) -> None:
            room = max(self.limit - len(sink), 0)
            sink.extend(data[:room])
            self.dropped += max(len(data) - room, 0)

        return keep

    def streams(self) -> Streams:
        return Streams(self._keep(self.out), self._keep(self.err))


def image_config(sandbox) -> dict | None:
    """The run-time config of the container image ``sandbox`` boots from, if it does."""
    plan = getattr(sandbox, "plan", None)
    return plan.root.config if plan is not None else None


def run_in(sandbox, request: CommandRequest, streams: Streams, run: bool = False) -> int:
    """Run ``request`` in ``sandbox`` (``run``: as its first command, a container image's
    Entrypoint and Cmd applying); returns the exit status to exit with."""
    request = for_image(request, image_config(sandbox), run)
    wanted = request.tty
    holder = streams.terminal if wanted else _no_terminal
    with holder(sandbox.resize_terminals) as size:
        result = sandbox.exec(
            list(request.argv),
            env=request.env,
            cwd=request.cwd,
            timeout=request.timeout,
            on_stdout=streams.on_stdout,
            on_stderr=streams.on_stderr,
            stdin_stream=streams.stdin if request.interactive or wanted else None,
            tty=size,
            user=request.user,
        )
    if result.timed_out:
        streams.timed_out = True
        streams.notices.append(
            f"qemubox: the command timed out after {request.timeout:g} s and was killed"
        )
        return Exit.TIMEOUT
    return result.exit_code


def start_in_background(sandbox, request: CommandRequest) -> None:
    """Start the command so that it outlives this client, its output on the console."""
    request = for_image(request, image_config(sandbox), run=True)
    line = (
        'command -v "$1" >/dev/null || { echo "$1: command not found" >&2; exit 127; }; '
        'setsid "$@" </dev/null >/dev/console 2>&1 &'
    )
    r = sandbox.exec(
        ["sh", "-c", line, "sh", *request.argv],
        env=request.env,
        cwd=request.cwd or "/",
        timeout=30,
        user=request.user,
    )
    if r.exit_code != 0:
        why = r.stderr.decode(errors="replace").strip()
        raise SandboxError(f"cannot start {request.argv[0]} in the background: {why}")
