"""Matrices for real: 2 kernels × 2 configs × 2 commands built incrementally and run here
and on a 2-worker Dask LocalCluster with identical results; a panicking cell reported with
its console while the others pass; a worker killed mid-cell (its VM dies with it, the cell
runs again elsewhere); Ctrl-C leaves no QEMU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from junitparser import JUnitXml

from helpers import as_at_a_terminal, qemubox
from qemubox.matrix import Matrix
from qemubox.matrix.execute import run_matrix

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]

KTAP = """KTAP version 1
1..2
    KTAP version 1
    # Subtest: suite_a
    1..2
    ok 1 test_one
    not ok 2 test_two
not ok 1 suite_a
ok 2 suite_b # SKIP no hardware
"""

MATRIX = """
[defaults]
memory = "256M"
timeout = 120

[[kernel]]
name = "base"
profile = "minimal"

# The suite's debug kernel, which test_vms.py boots with `vm run -k` and test_vmcore.py
# dumps (the same inputs: one build for all three).
[[kernel]]
name = "vm"
profile = "debug"
fragments = ["vm"]
config = ["CONFIG_ISO9660_FS=m"]

# An axis whose one value adds nothing to "vm" (so it is not built again) and is excluded
# for "base" (no kernel is built that no other test needs).
[matrix]
config = [[], ["CONFIG_ISO9660_FS=m"]]

[[exclude]]
kernel = "base"
config = ["CONFIG_ISO9660_FS=m"]

[[test]]
name = "release"
command = ["uname", "-r"]

[[test]]
name = "ktap"
command = "cat /mnt/data/results.ktap"
volumes = ["data:/mnt/data:ro"]
"""


def qemus_under(pid: int) -> set[int]:
    """QEMU processes descending from ``pid``."""
    rows = [
        line.split(None, 2)
        for line in subprocess.run(
            ["ps", "-e", "-o", "pid=,ppid=,comm="], capture_output=True, text=True
        ).stdout.splitlines()
    ]
    ours, found = {pid}, set()
    for _ in range(6):
        ours |= {int(p) for p, pp, _ in rows if int(pp) in ours}
    for p, _, comm in rows:
        if int(p) in ours and comm.startswith("qemu-system"):
            found.add(int(p))
    return found


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def matrix_dir(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "results.ktap").write_text(KTAP)
    (tmp_path / "m.toml").write_text(MATRIX)
    return tmp_path


def cluster(**kw):
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        resources={"VM": 1},
        dashboard_address=None,
        **kw,
    )


def comparable(records: list[dict]) -> list[tuple]:
    return [
        (r["cell"], r["status"], r["exit_code"], r["stdout"], json.dumps(r["subtests"]))
        for r in records
    ]


def test_a_matrix_here_and_on_a_dask_cluster(matrix_dir, kernel, debug_kernel):
    from distributed import Client

    out, xml = matrix_dir / "out.json", matrix_dir / "out.xml"
    r = qemubox("matrix", matrix_dir / "m.toml", "--json", out, "--junit", xml, timeout=3000)
    assert r.code == 1, r.err  # the KTAP suite has a failing subtest
    records = json.loads(out.read_text())
    assert len(records) == 6
    by_cell = {rec["cell"]: rec for rec in records}
    assert "base/release[config=CONFIG_ISO9660_FS=m]" not in by_cell  # excluded
    release = by_cell["vm/release[config=CONFIG_ISO9660_FS=m]"]
    assert (release["status"], release["exit_code"]) == ("pass", 0)
    assert release["stdout"].startswith("6.12") and release["duration"] > 0
    phases = set(release["timings"])  # as `run --timings` names them
    assert {"prepare", "QEMU start", "session setup", "command", "teardown"} <= phases
    assert phases & {"restore", "kernel boot to agent ready"}
    ktap_cell = by_cell["base/ktap[config=-]"]
    assert ktap_cell["status"] == "fail" and ktap_cell["exit_code"] == 0
    (suite_a, suite_b) = ktap_cell["subtests"]
    assert (suite_a["name"], suite_a["status"], suite_b["status"]) == ("suite_a", "fail", "skip")
    assert [s["status"] for s in suite_a["subtests"]] == ["pass", "fail"]
    assert "3 passed, 3 failed, 0 errors" in r.err
    assert JUnitXml.fromfile(str(xml)).tests == 6 + 3 * 4
    # one kernel per distinct configuration: the axis value already in "vm" made no other
    vm_kernels = {
        by_cell[f"vm/release[config={c}]"]["stdout"] for c in ("-", "CONFIG_ISO9660_FS=m")
    }
    assert len(vm_kernels) == 1
    # the same matrix on a cluster: the same results, cell by cell
    with cluster() as c, Client(c) as client:
        results = run_matrix(Matrix.from_file(matrix_dir / "m.toml"), client=client)
    remote = [res.to_dict() for res in results]
    assert comparable(remote) == comparable(records)
    assert all(res["worker"].startswith("tcp://") for res in remote)


def test_a_panicking_cell_is_reported_with_its_console(matrix_dir, kernel):
    (matrix_dir / "p.toml").write_text(
        '[[kernel]]\nname = "base"\n\n'
        '[[test]]\nname = "panic"\ncommand = "echo c > /proc/sysrq-trigger"\n\n'
        '[[test]]\nname = "fine"\ncommand = ["true"]\n'
    )
    r = qemubox("matrix", matrix_dir / "p.toml", "--json", matrix_dir / "p.json")
    assert r.code == 1
    panic, fine = json.loads((matrix_dir / "p.json").read_text())
    assert panic["status"] == "error" and "Kernel panic" in panic["error"]
    assert "sysrq" in panic["console_tail"].lower()
    assert "guest console" in r.err
    assert (fine["status"], fine["exit_code"]) == ("pass", 0)


def test_a_cell_on_a_killed_worker_runs_again_elsewhere(matrix_dir, kernel):
    from distributed import Client

    (matrix_dir / "k.toml").write_text(
        '[[kernel]]\nname = "base"\n\n[[test]]\nname = "slow"\ncommand = "sleep 6; echo survived"\n'
    )
    m = Matrix.from_file(matrix_dir / "k.toml")
    with cluster() as c, Client(c) as client:
        pids = client.run(os.getpid)  # worker address -> pid
        out: list = []
        runner = threading.Thread(target=lambda: out.extend(run_matrix(m, client=client)))
        runner.start()
        victim, qemu = None, set()
        deadline = time.monotonic() + 120
        while not qemu and time.monotonic() < deadline:
            for address, pid in pids.items():
                qemu = qemus_under(pid)
                if qemu:
                    victim = address
                    break
            time.sleep(0.2)
        assert qemu, "no cell started"
        os.kill(pids[victim], signal.SIGKILL)
        assert all(gone(p, 10) for p in qemu)  # its VM died with it
        runner.join(timeout=300)
    (result,) = out
    assert (result.status, result.stdout) == ("pass", "survived\n"), result.error
    assert result.worker != victim


def test_ctrl_c_leaves_no_qemu(matrix_dir, kernel):
    (matrix_dir / "c.toml").write_text(
        '[[kernel]]\nname = "base"\n\n[[test]]\nname = "long"\ncommand = ["sleep", "60"]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "qemubox", "matrix", str(matrix_dir / "c.toml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=as_at_a_terminal,
    )
    qemu: set[int] = set()
    deadline = time.monotonic() + 120
    while not qemu and time.monotonic() < deadline:
        qemu = qemus_under(proc.pid)
        time.sleep(0.2)
    assert qemu, "no cell started"
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert all(gone(p, 10) for p in qemu)


def test_fail_fast_on_a_cluster_stops_the_running_cells_vms(matrix_dir, kernel):
    from distributed import Client

    (matrix_dir / "f.toml").write_text(
        '[[kernel]]\nname = "base"\n\n'
        '[[test]]\nname = "long"\ncommand = ["sleep", "60"]\n\n'
        '[[test]]\nname = "fails"\ncommand = "sleep 3; exit 1"\n'
    )
    m = Matrix.from_file(matrix_dir / "f.toml")
    start = time.monotonic()
    with cluster() as c, Client(c) as client:
        pids = client.run(os.getpid)
        long_cell, failed = run_matrix(m, client=client, keep_going=False)
        left = set().union(*(qemus_under(p) for p in pids.values()))
    assert (failed.status, failed.exit_code) == ("fail", 1)
    assert (long_cell.status, long_cell.error) == ("error", "cancelled")
    assert time.monotonic() - start < 45 and not left


def test_a_kernel_that_cannot_be_built_fails_its_cells_only(matrix_dir, kernel):
    from distributed import Client

    (matrix_dir / "b.toml").write_text(
        '[[kernel]]\nname = "base"\n\n'
        '[[kernel]]\nname = "bad"\nconfig = ["CONFIG_QEMUBOX_NO_SUCH_OPTION=y"]\n\n'
        '[[test]]\nname = "true"\ncommand = ["true"]\n'
    )
    r = qemubox("matrix", matrix_dir / "b.toml", "--json", matrix_dir / "b.json")
    assert r.code == 1, r.err
    here = json.loads((matrix_dir / "b.json").read_text())
    with cluster() as c, Client(c) as client:
        there = [
            res.to_dict() for res in run_matrix(Matrix.from_file(matrix_dir / "b.toml"), client)
        ]
    for base, bad in (here, there):
        assert (base["status"], base["exit_code"]) == ("pass", 0)
        assert bad["status"] == "error" and bad["error"].startswith("kernel bad: ")
        assert "did not get their wanted values" in bad["error"], bad["error"]


def test_the_command_line_on_a_scheduler(matrix_dir, kernel):
    (matrix_dir / "s.toml").write_text(
        '[[kernel]]\nname = "base"\n\n[[test]]\nname = "echo"\ncommand = ["echo", "hi"]\n'
    )
    with cluster(scheduler_port=0) as c:
        r = qemubox(
            "matrix", matrix_dir / "s.toml", "--scheduler", c.scheduler_address,
            "--json", matrix_dir / "s.json",
        )  # fmt: skip
        assert r.code == 0, r.err
        (cell,) = json.loads((matrix_dir / "s.json").read_text())
        assert (cell["status"], cell["stdout"]) == ("pass", "hi\n")
        assert cell["worker"] in c.scheduler_info["workers"]
        r = qemubox("matrix", matrix_dir / "s.toml", "--scheduler", c.scheduler_address, "-j", "2")
        assert r.code == 2 and "--jobs goes without --scheduler" in r.err
    r = qemubox("matrix", matrix_dir / "s.toml", "--scheduler", "tcp://127.0.0.1:9")
    assert r.code == 2 and "cannot reach it" in r.err and len(r.err.strip().splitlines()) == 1
