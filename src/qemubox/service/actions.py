"""Every action qemubox offers, as one list of plain-data requests (``ACTIONS``), each
checked when it is made, and :func:`perform`, which carries one out over the floors below.
A door parses its input into an action and shows the result; nothing else.

Results are plain too: an exit status, a name, :class:`Status` records, a dict, chunks of
bytes. Commands stream through the :class:`Streams` a door lends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from qemubox.errors import Exit, InputError
from qemubox.model.phase import Phase, Timing
from qemubox.service.command import CommandRequest, Streams, run_in, start_in_background
from qemubox.service.session import SessionRequest

# --- the actions ----------------------------------------------------------------------------


def may_have_command(image: str) -> bool:
    """Whether ``image`` can say what to run (a container image's Entrypoint and Cmd)."""
    from qemubox.image import catalog

    return image not in catalog.BUILTIN and not catalog.is_path(image)


@dataclass(frozen=True)
class Run:
    """A command in a fresh sandbox; with ``name``, in a new named sandbox that stays
    (unless ``remove``), started in the background with ``detach``."""

    command: CommandRequest
    session: SessionRequest = field(default_factory=SessionRequest)
    console_log: str | None = None
    name: str | None = None
    detach: bool = False
    remove: bool = False
    ttl: float | None = None
    dry_run: bool = False
    files: tuple[tuple[str, bytes], ...] = ()  # (guest path, content) written before it runs

    def __post_init__(self) -> None:
        if not self.command.argv and not may_have_command(self.session.image):
            raise InputError(
                f"no command given: image {self.session.image} has no Entrypoint or Cmd to run"
            )
        if self.name is None:
            if self.detach or self.remove or self.ttl:
                raise InputError("-d, --rm and --ttl go with --name")
        elif self.detach and (self.remove or self.command.interactive):
            raise InputError("-d goes with neither --rm nor -i")
        elif self.console_log:
            raise InputError(f"--console-log goes without --name (see: qemubox logs {self.name})")


@dataclass(frozen=True)
class Create:
    name: str
    session: SessionRequest = field(default_factory=SessionRequest)
    ttl: float | None = None


@dataclass(frozen=True)
class Exec:
    name: str
    command: CommandRequest
    vmcore: str | None = None  # should the kernel panic meanwhile, its memory goes here


@dataclass(frozen=True)
class Copy:
    """``NAME:/path`` on one side (a name of None: the host's path, ``-``: a tar stream)."""

    src: tuple[str | None, str]
    dst: tuple[str | None, str]


@dataclass(frozen=True)
class WriteFile:
    name: str
    path: str  # absolute, in the guest
    data: bytes
    mode: int = 0o644

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise InputError(f"path {self.path!r}: expected an absolute guest path")


@dataclass(frozen=True)
class ReadFile:
    name: str
    path: str

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise InputError(f"path {self.path!r}: expected an absolute guest path")


@dataclass(frozen=True)
class List:
    everything: bool = False  # stopped and failed ones too


@dataclass(frozen=True)
class Inspect:
    name: str


@dataclass(frozen=True)
class Stop:
    names: tuple[str, ...]
    timeout: float | None = None  # seconds to power off before a kill
    expired: bool = False  # only if its idle limit has passed (the keeper's own stop)


@dataclass(frozen=True)
class Kill:
    names: tuple[str, ...]


@dataclass(frozen=True)
class Start:
    names: tuple[str, ...]


@dataclass(frozen=True)
class Pause:
    names: tuple[str, ...]


@dataclass(frozen=True)
class Resume:
    names: tuple[str, ...]


@dataclass(frozen=True)
class Remove:
    names: tuple[str, ...]
    force: bool = False
    expired: bool = False  # only if its deadline has passed (its keeper's own removal)


@dataclass(frozen=True)
class Logs:
    name: str
    lines: int | None = None
    follow: bool = False
    net: bool = False  # the egress decisions, not the console


@dataclass(frozen=True)
class Network:
    """A named sandbox's egress rules: shown, or changed to ``net`` (allow=LIST or
    deny=LIST) with ``add_hosts`` (NAME:IP; None: kept)."""

    name: str
    net: str | None = None
    add_hosts: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Dump:
    """A running named sandbox's memory, saved now as an ELF core at ``path``."""

    name: str
    path: str


@dataclass(frozen=True)
class Bisect:
    """The first bad commit between two revisions of a kernel tree: each step builds the
    checkout and runs a command on it as ``Run`` does (``request``: a
    ``bisect.drive.BisectRequest``, checked before the tree is touched)."""

    request: object


@dataclass(frozen=True)
class KernelBuild:
    request: object  # a kernel.build.BuildRequest (plain data, checked by the builder)


@dataclass(frozen=True)
class RunMatrix:
    """Every cell of a matrix (read and checked: ``matrix.spec.Matrix``), here with
    ``jobs`` at once or on the Dask cluster at ``scheduler``."""

    matrix: object
    jobs: int | None = None
    scheduler: str | None = None  # tcp://HOST:PORT
    keep_going: bool = True

    def __post_init__(self) -> None:
        if self.scheduler and self.jobs:
            raise InputError("--jobs goes without --scheduler (the cluster's VM resources decide)")


@dataclass(frozen=True)
class StartPool:
    """Machines of a session restored ahead, waiting to be taken by its starts."""

    session: SessionRequest
    size: int = 2
    ttl: int = 3600  # seconds a waiting machine lives unused


@dataclass
class RunResult:
    exit_code: int
    name: str | None = None
    timings: list[Timing] = field(default_factory=list)
    qemu_args: list[str] | None = None  # a dry run's


# --- carrying them out ----------------------------------------------------------------------


def _run(action: Run, streams: Streams | None) -> RunResult:
    from qemubox.sandbox.api import Sandbox

    session = action.session.session(action.command.timeout, action.console_log)
    if action.dry_run:
        from qemubox.egress.launch import qemu_prefix
        from qemubox.qemu.cmdline import qemu_args

        plan = Sandbox(session).make_plan(dry_run=True)
        return RunResult(Exit.OK, qemu_args=qemu_prefix(plan, build=False) + qemu_args(plan))
    streams = streams or _quiet()
    if action.name is None:
        with Sandbox(session) as sandbox:
            _write_files(sandbox, action.files)
            code = run_in(sandbox, action.command, streams, run=True)
            sandbox.phase(Phase.COMMAND)
        sandbox.phase(Phase.TEARDOWN)
        return RunResult(code, timings=sandbox.timings)
    sandbox = Sandbox.create(action.name, session, action.ttl)
    try:
        _write_files(sandbox, action.files)
        if action.detach:
            start_in_background(sandbox, action.command)
            return RunResult(Exit.OK, name=action.name)
        return RunResult(run_in(sandbox, action.command, streams, run=True), name=action.name)
    finally:
        if action.remove:
            sandbox.remove(force=True)
        else:
            sandbox.detach()


def _write_files(sandbox, files: tuple[tuple[str, bytes], ...]) -> None:
    for path, data in files:
        if not path.startswith("/"):
            raise InputError(f"file {path!r}: expected an absolute guest path")
        sandbox.write_file(path, data)


def _create(action: Create, streams) -> str:
    from qemubox.sandbox.api import Sandbox

    Sandbox.create(action.name, action.session.session(), action.ttl).detach()
    return action.name


def _exec(action: Exec, streams: Streams | None) -> int:
    from qemubox.sandbox import named

    sandbox = named.attach(action.name)
    try:
        if action.vmcore:
            sandbox.vmcore_to(action.vmcore)
        return run_in(sandbox, action.command, streams or _quiet())
    finally:
        if action.vmcore and sandbox.machine is not None and sandbox.machine.alive():
            sandbox.vmcore_to(None)
        sandbox.detach()


def _dump(action: Dump, streams) -> dict:
    from qemubox.sandbox import named

    sandbox = named.attach(action.name)
    try:
        return sandbox.dump(action.path)
    finally:
        sandbox.detach()


def _write_file(action: WriteFile, streams) -> None:
    from qemubox.sandbox import named

    sandbox = named.attach(action.name)
    try:
        sandbox.write_file(action.path, action.data, action.mode)
    finally:
        sandbox.detach()


def _read_file(action: ReadFile, streams) -> bytes:
    from qemubox.sandbox import named

    sandbox = named.attach(action.name)
    try:
        return sandbox.read_file(action.path)
    finally:
        sandbox.detach()


def _copy(action: Copy, streams) -> None:
    from qemubox.sandbox import copy

    copy.cp(action.src, action.dst)


def _list(action: List, streams) -> list:
    from qemubox.sandbox import named

    return [s for s in named.list_all() if action.everything or s.state.live]


def _inspect(action: Inspect, streams) -> dict:
    from qemubox.sandbox import named

    return named.record(action.name)


def _stop(action: Stop, streams) -> None:
    from qemubox.sandbox import named

    timeout = named.STOP_TIMEOUT if action.timeout is None else action.timeout
    for name in action.names:
        named.stop(name, timeout, expired=action.expired)


def _for_each(verb: str) -> Callable:
    def each(action, streams) -> None:
        from qemubox.sandbox import named

        for name in action.names:
            getattr(named, verb)(name)

    return each


def _start(action: Start, streams) -> None:
    from qemubox.sandbox import named

    for name in action.names:
        box = named.start(name)
        if box is not None:
            box.detach()


def _remove(action: Remove, streams) -> None:
    from qemubox.sandbox import named

    for name in action.names:
        if action.expired and not named.exists(name):
            continue  # removed meanwhile
        named.remove(name, action.force, action.expired)


def _logs(action: Logs, streams) -> Iterator[bytes]:
    from qemubox.sandbox import console

    return console.read(action.name, action.lines, action.follow, action.net)


def _network(action: Network, streams):
    from qemubox.sandbox import named

    return named.network(action.name, action.net, action.add_hosts)


def _kernel_build(action: KernelBuild, streams):
    from qemubox.kernel.build import build_kernel

    return build_kernel(action.request)


def _bisect(action: Bisect, echo):
    from qemubox.bisect.drive import bisect

    return bisect(action.request, echo or (lambda line: None))


def _run_matrix(action: RunMatrix, events) -> list:
    """The cells' results, in cell order; ``events`` (kind, payload) follows them live."""
    from qemubox.matrix.execute import run_matrix

    client = _connect(action.scheduler) if action.scheduler else None
    try:
        return run_matrix(
            action.matrix,
            client=client,
            jobs=action.jobs,
            keep_going=action.keep_going,
            events=events,
        )
    finally:
        if client is not None:
            client.close()


def _connect(address: str):
    from distributed import Client

    try:
        return Client(address, timeout=10)
    except (OSError, TimeoutError) as err:
        raise InputError(f"--scheduler {address}: cannot reach it: {err}") from None


def _start_pool(action: StartPool, streams) -> tuple[str, int]:
    """The pool's key and how many machines wait."""
    from qemubox.sandbox.pool import Pool

    started = Pool(action.session.session(), action.size, action.ttl).start()
    return started.plan.snapshot.key, started.waiting()


def _quiet() -> Streams:
    def drop(data: bytes) -> None:
        pass

    return Streams(drop, drop)


# The whole surface: each action and what carries it out.
ACTIONS: dict[type, Callable] = {
    Run: _run,
    Create: _create,
    Exec: _exec,
    Copy: _copy,
    WriteFile: _write_file,
    ReadFile: _read_file,
    List: _list,
    Inspect: _inspect,
    Stop: _stop,
    Kill: _for_each("kill"),
    Start: _start,
    Pause: _for_each("pause"),
    Resume: _for_each("resume"),
    Remove: _remove,
    Logs: _logs,
    Network: _network,
    Dump: _dump,
    Bisect: _bisect,
    KernelBuild: _kernel_build,
    RunMatrix: _run_matrix,
    StartPool: _start_pool,
}


def perform(action, streams=None):
    """Carry ``action`` out; its result (see each action). ``streams``: what the door
    lends — a command's :class:`Streams`, a matrix's event callback."""
    handler = ACTIONS.get(type(action))
    if handler is None:
        raise InputError(f"not an action qemubox offers: {type(action).__name__}")
    return handler(action, streams)
