"""Running a matrix: each distinct kernel built once, then each cell in a sandbox of its
own. Here, cells run in threads, ``jobs`` at once, after the builds; on a Dask cluster,
builds and cells are tasks (``pure=False``), each cell holding one ``VM`` resource, and
a built kernel reaches the workers that boot it as bytes, so no shared file system is
needed. Cancelling (Ctrl-C, or the first failure without keep-going) stops every running
cell's VM, here or on any worker; a worker that dies takes its VMs with it (they are tied
to their starter) and the scheduler runs its cells again elsewhere."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qemubox import paths
from qemubox.errors import QemuboxError, SandboxError
from qemubox.matrix import ktap
from qemubox.matrix.spec import DEBIAN, Cell, KernelSpec, Matrix
from qemubox.model.phase import Phase, totals

PASS, FAIL, ERROR = "pass", "fail", "error"
KEEP_OUTPUT = 1 << 20  # bytes of a cell's stdout and stderr kept in its result
CELL_OVERHEAD = 256 << 20  # host memory a VM takes beyond its guest's (QEMU, caches)

Events = Callable[[str, object], None]


@dataclass
class CellResult:
    cell: str
    kernel: str
    test: str
    axes: dict[str, str]
    status: str  # pass, fail, error
    exit_code: int | None
    duration: float  # seconds, boot to teardown
    stdout: str = ""
    stderr: str = ""
    console_tail: str = ""  # on a panic or a boot failure
    error: str = ""  # why the cell could not run to its end
    subtests: list[dict] = field(default_factory=list)  # from KTAP output
    worker: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # the start's phases, command, teardown

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Kernel:
    """A built kernel, where a cell can boot it."""

    image: str
    modules: str | None = None


def _result(cell: Cell, status: str, **kw) -> CellResult:
    return CellResult(
        cell.id, cell.kernel.name, cell.test.name, dict(cell.axes), status, None, 0.0, **kw
    )


# --- kernels ------------------------------------------------------------------------------------


def kernel_key(spec: KernelSpec) -> str:
    inputs = json.dumps(spec.build_inputs(), default=str)
    return hashlib.sha256(inputs.encode()).hexdigest()[:16]


def build(spec: KernelSpec) -> Kernel:
    """The kernel of ``spec``, built (or found built: the builder caches by configuration,
    so cells of equal configurations share a build, across runs too)."""
    if spec.path:  # a file, or Debian's kernel package (fetched where the cell runs)
        return Kernel(spec.path)
    from qemubox.kernel.build import BuildRequest, build_kernel

    out = paths.cache_dir() / "matrix" / "kernels" / kernel_key(spec)
    result = build_kernel(
        BuildRequest(
            kernel_version=spec.version,
            source=spec.source,
            sha256=spec.sha256,
            arch=spec.arch,
            profile=spec.profile,
            fragments=spec.fragments,
            config_items=spec.config,
            output=out,
        )
    )
    modules = out / "lib" / "modules" / result.manifest["version"]
    return Kernel(str(out / "vmlinuz"), str(modules) if modules.is_dir() else None)


def pack(kernel: Kernel) -> bytes:
    """A kernel and its modules as one tar, to travel to a worker (Debian's: its name)."""
    if kernel.image == DEBIAN:
        return DEBIAN.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(os.path.realpath(kernel.image), arcname="vmlinuz")
        if kernel.modules:  # without build/ and source/: links into the build machine
            tar.add(kernel.modules, arcname="modules", filter=_no_tree_links)
    return buf.getvalue()


def _no_tree_links(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if member.name in ("modules/build", "modules/source") else member


def unpack(data: bytes) -> Kernel:
    """A packed kernel, kept in this machine's cache under its digest (once)."""
    if data == DEBIAN.encode():
        return Kernel(DEBIAN)
    digest = hashlib.sha256(data).hexdigest()[:32]

    def make(tmp: Path) -> None:
        tmp.mkdir()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(tmp, filter="data")

    where = paths.fill(paths.cache_dir() / "matrix" / "received" / digest, make)
    modules = where / "modules"
    return Kernel(str(where / "vmlinuz"), str(modules) if modules.is_dir() else None)


# --- one cell -----------------------------------------------------------------------------------


def run_cell(cell: Cell, kernel: Kernel, cancelled: Callable[[], bool] = lambda: False):
    """Boot the cell's sandbox, run its command, keep what came of it. ``cancelled`` is
    polled meanwhile: when it says so, the VM is stopped and the cell is an error."""
    from qemubox.sandbox.sandbox import Sandbox

    start = time.monotonic()
    stop = threading.Event()
    box: Sandbox | None = None

    def watch() -> None:
        while not stop.wait(0.5):
            if cancelled():
                stop.set()
                if box is not None:
                    with contextlib.suppress(Exception):
                        box.close()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TCG notice: once per run, not per cell
            box = Sandbox(cell.session(kernel.image, kernel.modules))
            box.start()
        booted = time.monotonic()
        o = dict(cell.test.options)
        r = box.exec(
            list(cell.test.command),
            env=dict(o.get("env", ())) or None,
            cwd=o.get("workdir", "/"),
            timeout=o.get("timeout"),
            max_output=KEEP_OUTPUT,
        )
        out = r.stdout.decode(errors="replace")
        error = f"timed out after {o.get('timeout'):g} s" if r.timed_out else ""
        if cell.test.kunit is not None:  # the boot's KTAP, out of the kernel log
            out = ktap.of_kernel_log(out)
            if not out and not error:
                error = "no KUnit results in the kernel log (a kernel without CONFIG_KUNIT?)"
        tests = ktap.parse(out) if ktap.is_ktap(out) else []
        if cell.test.kunit is not None and out and not tests and not error:
            matching = f" matching {cell.test.kunit}" if cell.test.kunit else ""
            error = f"no KUnit test ran{matching}"
        passed = r.exit_code == 0 and not ktap.failed(tests) and not error
        result = _result(
            cell,
            PASS if passed else FAIL,
            stdout=out,
            stderr=r.stderr.decode(errors="replace"),
            subtests=[t.to_dict() for t in tests],
            error=error,
        )
        result.exit_code = r.exit_code
        result.timings = dict(totals(box.timings))
        result.timings[Phase.COMMAND] = time.monotonic() - booted
    except (QemuboxError, OSError) as err:
        why = "cancelled" if stop.is_set() and cancelled() else str(err)
        result = _result(cell, ERROR, error=why, console_tail=getattr(err, "console_tail", ""))
        if isinstance(err, SandboxError) and not result.console_tail and box is not None:
            with contextlib.suppress(Exception):
                result.console_tail = box.console_tail()
    finally:
        stop.set()
        before_close = time.monotonic()
        if box is not None:
            box.close()
    end = time.monotonic()
    if result.timings:
        result.timings[Phase.TEARDOWN] = end - before_close
        result.timings = {k: round(v, 3) for k, v in result.timings.items()}
    result.duration = round(end - start, 3)
    return result


# --- here ---------------------------------------------------------------------------------------


def default_jobs(cells: list[Cell]) -> int:
    """Cells at once within this machine's cores and free memory."""
    from qemubox.model.session import DEFAULT_MEMORY
    from qemubox.model.size import parse_size

    biggest = max(parse_size(dict(c.test.options).get("memory", DEFAULT_MEMORY)) for c in cells)
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        free = int(info["MemAvailable"].split()[0]) << 10
    except (OSError, KeyError, ValueError):
        free = 4 << 30
    by_memory = max(1, (free - (1 << 30)) // (biggest + CELL_OVERHEAD))
    return max(1, min(os.cpu_count() or 1, by_memory))


def _build_all(matrix: Matrix, events: Events) -> dict[str, Kernel | QemuboxError]:
    built: dict[str, Kernel | QemuboxError] = {}
    for cell in matrix.cells:
        key = kernel_key(cell.kernel)
        if key in built:
            continue
        events("build", (cell.kernel.name, "building"))
        try:
            built[key] = build(cell.kernel)
            events("build", (cell.kernel.name, "built"))
        except QemuboxError as err:
            built[key] = err
            events("build", (cell.kernel.name, f"failed: {err}"))
    return built


def _run_here(matrix: Matrix, jobs: int, keep_going: bool, events: Events) -> list[CellResult]:
    built = _build_all(matrix, events)
    cancel = threading.Event()
    results: dict[str, CellResult] = {}

    def one(cell: Cell) -> CellResult:
        kernel = built[kernel_key(cell.kernel)]
        if isinstance(kernel, QemuboxError):
            result = _result(cell, ERROR, error=f"kernel {cell.kernel.name}: {kernel}")
        elif cancel.is_set():
            result = _result(cell, ERROR, error="cancelled")
        else:
            events("start", cell.id)
            result = run_cell(cell, kernel, cancel.is_set)
        if result.status != PASS and not keep_going:
            cancel.set()
        results[cell.id] = result
        events("done", result)
        return result

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(one, c) for c in matrix.cells]
        for f in futures:
            f.result()
    except BaseException:
        cancel.set()  # every running cell stops its VM
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return [results[c.id] for c in matrix.cells]


# --- on a Dask cluster --------------------------------------------------------------------------


def _task_build(spec: KernelSpec) -> bytes:
    return pack(build(spec))


def _task_cell(cell: Cell, packed: bytes, run_id: str) -> CellResult:
    from distributed import Event, get_client, get_worker

    # the watcher asks from a thread of its own: the event needs the worker's client
    event = Event(f"qemubox-cancel-{run_id}", client=get_client())
    last = [0.0, False]

    def cancelled() -> bool:  # asks the scheduler at most once a second
        now = time.monotonic()
        if now - last[0] >= 1:
            last[0], last[1] = now, event.is_set()
        return bool(last[1])

    result = run_cell(cell, unpack(packed), cancelled)
    result.worker = get_worker().address
    return result


def _run_on(client, matrix: Matrix, keep_going: bool, events: Events) -> list[CellResult]:
    from distributed import Event, as_completed

    run_id = uuid.uuid4().hex[:12]
    cancel = Event(f"qemubox-cancel-{run_id}", client=client)
    builds = {}
    for cell in matrix.cells:
        key = kernel_key(cell.kernel)
        if key not in builds:
            builds[key] = client.submit(_task_build, cell.kernel, pure=False)
    by_future = {}
    for cell in matrix.cells:
        f = client.submit(
            _task_cell,
            cell,
            builds[kernel_key(cell.kernel)],
            run_id,
            resources={"VM": 1},
            pure=False,
        )
        by_future[f] = cell
        events("queued", cell.id)
    results: dict[str, CellResult] = {}
    try:
        for f in as_completed(list(by_future)):
            cell = by_future[f]
            try:
                result = f.result()
            except Exception as err:  # the build failed, or the cell's workers kept dying
                result = _result(cell, ERROR, error=_task_error(cell, err))
            results[cell.id] = result
            events("done", result)
            if result.status != PASS and not keep_going and not cancel.is_set():
                cancel.set()
    except BaseException:
        cancel.set()  # running cells stop their VMs; queued ones are dropped
        client.cancel(list(by_future) + list(builds.values()))
        raise
    finally:
        client.cancel(list(builds.values()))
    return [results[c.id] for c in matrix.cells]


def _task_error(cell: Cell, err: Exception) -> str:
    """Why a cell's task raised: a cell catches its own errors, so what reaches here is its
    kernel's build failing, or its workers dying."""
    from distributed import KilledWorker

    if isinstance(err, KilledWorker):
        return "its workers died while running it (retried, then given up)"
    return f"kernel {cell.kernel.name}: {err if isinstance(err, QemuboxError) else repr(err)}"


def run_matrix(
    matrix: Matrix,
    client=None,
    jobs: int | None = None,
    keep_going: bool = True,
    events: Events | None = None,
) -> list[CellResult]:
    def quiet(kind: str, payload: object) -> None:
        pass

    events = events or quiet
    if client is not None:
        return _run_on(client, matrix, keep_going, events)
    return _run_here(matrix, jobs or default_jobs(matrix.cells), keep_going, events)
