"""`qemubox kunit` and KUnit tests in matrix files: .kunitconfig fragments as kunit.py reads
them, verified and explained; real KUnit suites of the 6.12 tree built, booted and their
KTAP read (x86_64 with one case made to fail, arm64 all passing); and the parsing under it."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from helpers import KUNITCONFIG, git, qemubox
from qemubox.errors import InputError
from qemubox.matrix import ktap
from qemubox.matrix.kunit import kunitconfigs, matrix
from qemubox.matrix.spec import Matrix, MatrixError
from qemubox.sandbox.spec import Session

LOG = """\
[    0.412000] Run /init as init process
[    0.300001] KTAP version 1
[    0.300002] 1..2
[    0.300003]     KTAP version 1
[    0.300004]     # Subtest: list-kunit-test
[    0.300005]     # module: list_test
[    0.300006]     1..2
[    0.300007]     # list_test_list_init: EXPECTATION FAILED at lib/list-test.c:37
[    0.300008]     Expected list_empty_careful(&list1) to be false, but is true
[    0.300009]     not ok 1 list_test_list_init
[    0.300010]     ok 2 list_test_list_add
[    0.300011] # list-kunit-test: pass:1 fail:1 skip:0 total:2
[    0.300012] not ok 1 list-kunit-test
[    0.300013]     KTAP version 1
[    0.300014]     # Subtest: example
[    0.300015]     1..2
[    0.300016]     ok 1 example_simple_test
[    0.300017]     ok 2 example_skip_test # SKIP this test should be skipped
[    0.300018] ok 2 example
"""


def test_the_ktap_of_a_kernel_log_is_read_with_each_failed_cases_log():
    text = ktap.of_kernel_log(LOG)
    assert text.startswith("KTAP version 1\n1..2\n    KTAP version 1\n")
    suites = ktap.parse(text)
    assert [(s.name, s.status) for s in suites] == [
        ("list-kunit-test", "fail"),
        ("example", "pass"),
    ]
    init, add = suites[0].subtests
    assert (init.status, add.status, add.log) == ("fail", "pass", [])
    assert init.log == [
        "# list_test_list_init: EXPECTATION FAILED at lib/list-test.c:37",
        "Expected list_empty_careful(&list1) to be false, but is true",
    ]
    assert [t.status for t in suites[1].subtests] == ["pass", "skip"]
    assert ktap.of_kernel_log("no results here\n") == ""
    without_times = "\n".join(line[len("[    0.300001] ") :] for line in LOG.splitlines())
    assert ktap.of_kernel_log(without_times) == text


def test_kunitconfigs_are_found_as_kunit_py_finds_them_and_may_not_disagree(tmp_path):
    tree = tmp_path / "linux"
    (tree / "tools/testing/kunit/configs").mkdir(parents=True)
    (tree / "tools/testing/kunit/configs/default.config").write_text("CONFIG_KUNIT=y\n")
    assert kunitconfigs(tree, []) == (str(tree / "tools/testing/kunit/configs/default.config"),)
    (tree / "lib").mkdir()
    (tree / "lib/.kunitconfig").write_text("CONFIG_LIST_KUNIT_TEST=y\n")
    other = tmp_path / "more.kunitconfig"
    other.write_text("# CONFIG_LIST_KUNIT_TEST is not set\n")
    assert kunitconfigs(tree, [str(tree / "lib")]) == (str(tree / "lib/.kunitconfig"),)
    disagree = r"CONFIG_LIST_KUNIT_TEST is y in .*lib/\.kunitconfig and n in .*more\.kunitconfig"
    with pytest.raises(InputError, match=disagree + ": one value per option"):
        kunitconfigs(tree, [str(tree / "lib"), str(other)])
    with pytest.raises(InputError, match="--kunitconfig nope: no such file, nor a directory"):
        kunitconfigs(tree, ["nope"])
    with pytest.raises(InputError, match=r"has no tools/testing/kunit/configs/default\.config"):
        kunitconfigs(tmp_path, [])


def test_a_kunit_run_is_a_matrix_booting_once_per_filter_without_a_snapshot():
    m = matrix("/src/linux", ("/k/.kunitconfig",), ["list*", "example.example_simple_test"])
    assert [c.id for c in m.cells] == ["kunit/list*", "kunit/example.example_simple_test"]
    assert m.kernels[0].fragments == ("kunit", "/k/.kunitconfig")
    session = m.cells[0].session("/k/vmlinuz")
    assert (session.snapshot, session.kernel_args) == (False, "kunit.filter_glob=list*")
    assert matrix(None, (), []).cells[0].session("/k").kernel_args == ""
    with pytest.raises(InputError, match="filter 'a b': expected SUITE"):
        matrix(None, (), ["a b"])


@pytest.mark.parametrize(
    ("test", "message"),
    [
        ('kunit = "list*"\ncommand = "true"', "test 'k'.kunit: a KUnit test has no command"),
        ("kunit = 3", "test 'k'.kunit: expected a suite[.test] glob, got 3"),
        ('kunit = "a b"', "expected a suite[.test] glob, got 'a b'"),
    ],
)
def test_a_kunit_test_in_a_matrix_file_is_checked(tmp_path, test, message):
    (tmp_path / "m.toml").write_text(f'[[kernel]]\nname = "x"\n[[test]]\nname = "k"\n{test}\n')
    with pytest.raises(MatrixError, match=message.replace("[", r"\[").replace("*", r"\*")):
        Matrix.from_file(tmp_path / "m.toml")


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ("rdinit=/bin/sh", "--append rdinit=/bin/sh: qemubox sets rdinit= itself"),
        ("console=tty0", "qemubox sets console= itself"),
        ("a\nb", "printable ASCII on one line only"),
        ("x" * 1025, "1025 characters, at most 1024"),
    ],
)
def test_kernel_arguments_are_bounded_and_leave_qemuboxs_own_alone(words, message):
    with pytest.raises(InputError, match=message):
        Session(kernel_args=words).validate()
    assert Session(kernel_args="  dyndbg=+p   quiet ").validate().kernel_args == "dyndbg=+p quiet"


@pytest.mark.kernel
def test_an_option_a_kunitconfig_cannot_have_is_explained_before_anything_is_compiled(tmp_path):
    bad = tmp_path / ".kunitconfig"
    bad.write_text("CONFIG_KASAN_KUNIT_TEST=y\n")
    r = qemubox("kunit", "--kunitconfig", tmp_path, timeout=1200)
    assert r.code == 1, r.err[-2000:]
    assert "CONFIG_KASAN_KUNIT_TEST" in r.out and "KASAN" in r.out.split("KASAN_KUNIT_TEST")[1]
    assert r.err.endswith("nothing was compiled\n")


@pytest.mark.kernel
@pytest.mark.qemu
def test_kunit_builds_boots_and_reports_a_failing_case_with_its_log(linux_history, tmp_path):
    """The tree's main has a list test made to fail; the bisection's test built earlier
    revisions of it with the same configuration, and this build goes on from there."""
    broken_tree, _ = linux_history
    git(broken_tree, "checkout", "-q", "main")
    out_json, out_junit = tmp_path / "k.json", tmp_path / "k.xml"
    r = qemubox(
        "kunit", "--source", broken_tree, "--kunitconfig", broken_tree, "--json", out_json,
        "--junit", out_junit, "list-kunit-test", "example", timeout=3000,
    )  # fmt: skip
    assert r.code == 1, r.err[-3000:]
    assert "[FAILED] list-kunit-test (" in r.out and "[PASSED] example (" in r.out
    assert "    [FAILED] list-kunit-test.list_test_list_init\n" in r.out
    assert "EXPECTATION FAILED at lib/list-test.c:" in r.out
    summary = r.out.strip().splitlines()[-1]
    assert summary.startswith("Testing complete. Ran ") and ", failed: 1, skipped: " in summary
    records = {rec["test"]: rec for rec in json.loads(out_json.read_text())}
    assert records["list-kunit-test"]["status"] == "fail"
    assert records["example"]["status"] == "pass"
    suite = records["list-kunit-test"]["subtests"][0]
    assert suite["name"] == "list-kunit-test" and len(suite["subtests"]) > 30
    failed = {
        case.get("name"): case.find("failure").text
        for case in ET.parse(out_junit).getroot().iter("testcase")
        if case.find("failure") is not None
    }
    assert "EXPECTATION FAILED" in failed["list-kunit-test.list_test_list_init"]

    # The same kernel and suites as a matrix's KUnit test (its build found done).
    (tmp_path / "m.toml").write_text(
        f'[[kernel]]\nname = "k"\nsource = "{broken_tree}"\n'
        f'fragments = ["kunit", "{broken_tree}/.kunitconfig"]\n'
        '[[test]]\nname = "example"\nkunit = "example.example_simple_test"\n'
    )
    r = qemubox("matrix", tmp_path / "m.toml", "--json", tmp_path / "m.json", timeout=600)
    assert r.code == 0, r.err[-3000:]
    (record,) = json.loads((tmp_path / "m.json").read_text())
    (example,) = record["subtests"]
    assert [(c["name"], c["status"]) for c in example["subtests"]] == [
        ("example_simple_test", "pass")
    ]


@pytest.mark.kernel
@pytest.mark.qemu
def test_kunit_on_arm64_runs_the_trees_suites_and_all_pass(minimal_arm64, tmp_path):
    """The suite's arm64 kernel has these suites (helpers.BUILDS): the run finds it built."""
    config = tmp_path / "k.kunitconfig"
    config.write_text(KUNITCONFIG)
    r = qemubox("kunit", "--arch", "arm64", "--kunitconfig", config, cwd=tmp_path, timeout=3000)
    assert r.code == 0, r.err[-3000:]
    assert "[PASSED] list-kunit-test (" in r.out and "[PASSED] example (" in r.out
    assert ", failed: 0, skipped: " in r.out.strip().splitlines()[-1]
