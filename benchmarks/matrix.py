"""Matrix benchmark: 16 cells of `true` on the minimal kernel, in the same run: one at a
time here (--jobs 1), two at a time here (--jobs 2), and on a 2-worker Dask LocalCluster
(one VM resource each). Prints each wall time, the speed-up of two at a time, and the Dask
path's overhead per cell against --jobs 2.

    .venv/bin/python benchmarks/matrix.py [--kernel build/kernel/vmlinuz] [--cells 16]

The kernel is a built one (`path`), so no build is timed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from qemubox.kernel.artifacts import choose_kernel
from qemubox.matrix import Matrix
from qemubox.matrix.execute import run_matrix

warnings.simplefilter("ignore")


def matrix_file(directory: Path, kernel: str, cells: int) -> Path:
    path = directory / "bench.toml"
    tests = "".join(f'[[test]]\nname = "t{i}"\ncommand = ["true"]\n\n' for i in range(cells))
    path.write_text(f'[defaults]\nmemory = "256M"\n\n[[kernel]]\nname = "k"\npath = "{kernel}"\n\n')
    path.write_text(path.read_text() + tests)
    return path


def timed(run) -> tuple[float, list]:
    start = time.monotonic()
    results = run()
    return time.monotonic() - start, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", help="a built kernel image (default: the newest qemubox build)")
    ap.add_argument("--cells", type=int, default=16)
    args = ap.parse_args()
    kernel = args.kernel or choose_kernel(None, None, fetch=True).image
    from distributed import Client, LocalCluster

    with tempfile.TemporaryDirectory() as d:
        m = Matrix.from_file(matrix_file(Path(d), str(Path(kernel).resolve()), args.cells))
        one, r1 = timed(lambda: run_matrix(m, jobs=1))
        two, r2 = timed(lambda: run_matrix(m, jobs=2))
        with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                resources={"VM": 1},
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            dask_wall, r3 = timed(lambda: run_matrix(m, client=client))
    for name, results in (("jobs 1", r1), ("jobs 2", r2), ("dask", r3)):
        bad = [r.cell for r in results if r.status != "pass"]
        if bad:
            raise SystemExit(f"{name}: cells did not pass: {bad}")
    n = args.cells
    print(f"{n} cells of `true`, kernel {kernel}")
    print(f"--jobs 1      {one:6.1f} s  ({one / n:.2f} s per cell)")
    print(f"--jobs 2      {two:6.1f} s  (speed-up {one / two:.2f}x)")
    print(f"dask, 2 VMs   {dask_wall:6.1f} s  (vs --jobs 2: {dask_wall / two:.2f}x; ", end="")
    print(f"{(dask_wall - two) / n * 1000:+.0f} ms per cell)")


if __name__ == "__main__":
    main()
