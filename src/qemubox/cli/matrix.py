"""``qemubox matrix``: kernels × tests × axes from a TOML file, in parallel here or on a
Dask cluster, with a live table, a summary, JSON and JUnit XML."""

from __future__ import annotations

import time
from pathlib import Path

import click

from qemubox.cli.common import CONTEXT, say, table
from qemubox.errors import Exit, InputError


def _writable(path: str | None, option: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir() or not p.absolute().parent.is_dir():
        raise InputError(f"{option} {path}: not a file in an existing directory")
    return p


class _Live:
    """The cells' states: a live table on a terminal, a line per finished cell elsewhere."""

    def __init__(self, cells) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.state = {c.id: "pending" for c in cells}
        self.started: dict[str, float] = {}
        self.times: dict[str, str] = {}
        self.live = None
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self.render(), console=self.console, refresh_per_second=4)

    def render(self):
        from rich.table import Table

        t = Table(box=None, show_header=True)
        for col in ("CELL", "STATE", "TIME"):
            t.add_column(col)
        now = time.monotonic()
        for cell, state in self.state.items():
            spent = self.times.get(cell) or (
                f"{now - self.started[cell]:.0f}s" if cell in self.started else ""
            )
            t.add_row(cell, state, spent)
        return t

    def __call__(self, kind: str, payload) -> None:
        if kind == "build":
            name, what = payload
            if self.live is None:
                self.console.print(f"kernel {name}: {what}", highlight=False)
        elif kind in ("start", "queued"):
            self.state[payload] = "running" if kind == "start" else "queued"
            self.started.setdefault(payload, time.monotonic())
        elif kind == "done":
            self.state[payload.cell] = payload.status
            self.times[payload.cell] = f"{payload.duration:.1f}s"
            if self.live is None:
                line = f"{payload.cell}: {payload.status} in {payload.duration:.1f}s"
                self.console.print(line + (f" ({payload.error})" if payload.error else ""))
        if self.live is not None:
            self.live.update(self.render())

    def __enter__(self):
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()


@click.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-j", "--jobs", type=click.IntRange(min=1), help="Cells at once, here.")
@click.option("--scheduler", metavar="ADDRESS", help="Run on this Dask cluster (tcp://H:8786).")
@click.option("--json", "json_out", metavar="OUT", help="Write one JSON record per cell.")
@click.option("--junit", "junit_out", metavar="OUT", help="Write JUnit XML.")
@click.option(
    "--keep-going/--fail-fast",
    default=True,
    show_default=True,
    help="Whether a failed cell stops the others.",
)
def matrix(file, jobs, scheduler, json_out, junit_out, keep_going):
    """Run every cell of the matrix FILE: each kernel built once, each cell's command in a
    sandbox of its own. Exit status 0 only when every cell passed, 1 otherwise."""
    from qemubox.matrix import report
    from qemubox.matrix.spec import Matrix
    from qemubox.service.actions import RunMatrix, perform

    m = Matrix.from_file(file)
    json_path, junit_path = _writable(json_out, "--json"), _writable(junit_out, "--junit")
    action = RunMatrix(m, jobs, scheduler, keep_going)
    with _Live(m.cells) as live:
        results = perform(action, live)
    if json_path:
        report.write_json(results, json_path)
    if junit_path:
        report.write_junit(results, junit_path, str(file))
    table(report.summary_rows(results))
    slow = sorted(results, key=lambda r: r.duration, reverse=True)[:3]
    say("slowest: " + ", ".join(f"{r.cell} {r.duration:.1f}s" for r in slow))
    for r in results:
        if r.console_tail:
            say(f"--- {r.cell}: guest console (last lines) ---\n{r.console_tail}\n---")
    n = report.counts(results)
    say(f"{n['pass']} passed, {n['fail']} failed, {n['error']} errors")
    return Exit.OK if n["pass"] == len(results) else Exit.MISMATCH
