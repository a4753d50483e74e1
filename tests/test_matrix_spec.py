"""Matrix files, KTAP and the reports, without a VM: the issue's example as written, axes
and include/exclude, one-line errors naming file and key, KTAP trees, JUnit XML as a JUnit
parser reads it."""

from __future__ import annotations

import pytest
from junitparser import Error, Failure, JUnitXml, Skipped

from helpers import qemubox
from qemubox.errors import InputError
from qemubox.matrix import Matrix, ktap, report
from qemubox.matrix.execute import CellResult, kernel_key

EXAMPLE = """
[defaults]
memory = "512M"
timeout = 120

[[kernel]]
name = "base"
profile = "minimal"

[[kernel]]
name = "small-log"
profile = "minimal"
config = ["CONFIG_LOG_BUF_SHIFT=16"]

[[test]]
name = "uname"
command = ["uname", "-r"]

[[test]]
name = "suite"
command = ["sh", "-c", "cat /mnt/data/results.ktap"]
volumes = ["data:/mnt/data:ro"]
"""


@pytest.fixture
def here(tmp_path):
    (tmp_path / "data").mkdir()
    return tmp_path


def write(d, text: str):
    path = d / "m.toml"
    path.write_text(text)
    return path


def test_the_example_as_written(here):
    m = Matrix.from_file(write(here, EXAMPLE))
    assert [c.id for c in m.cells] == [
        "base/uname",
        "base/suite",
        "small-log/uname",
        "small-log/suite",
    ]
    suite = m.cells[1]
    assert suite.test.option("volumes") == (f"{here}/data:/mnt/data:ro",)  # the file's dir
    assert suite.test.option("memory") == "512M" and suite.test.option("timeout") == 120
    session = suite.session("/k/vmlinuz")
    assert session.shares[0].read_only and session.shares[0].mount_point == "/mnt/data"
    assert m.cells[2].kernel.config == ("CONFIG_LOG_BUF_SHIFT=16",)
    assert kernel_key(m.cells[0].kernel) != kernel_key(m.cells[2].kernel)
    assert kernel_key(m.cells[0].kernel) == kernel_key(m.cells[1].kernel)  # built once


def test_a_cell_takes_egress_rules(here):
    text = EXAMPLE.replace(
        "volumes = [", 'network = "allow=pypi.org"\nadd_hosts = ["a.test:127.0.0.2"]\nvolumes = ['
    )
    session = Matrix.from_file(write(here, text)).cells[1].session("/k/vmlinuz")
    valid = session.validate()
    assert valid.network == "allow" and valid.egress.items == ("pypi.org",)
    assert valid.egress.hosts == (("a.test", "127.0.0.2"),)


def test_axes_exclude_and_include(here):
    text = (
        EXAMPLE
        + """
[matrix]
config = [[], ["CONFIG_LOG_BUF_SHIFT=17"]]
memory = ["256M", "1G"]

[[exclude]]
kernel = "small-log"
memory = "1G"

[[include]]
kernel = "base"
test = "uname"
cpus = 2
"""
    )
    m = Matrix.from_file(write(here, text))
    ids = [c.id for c in m.cells]
    assert len(ids) == 2 * 2 * 2 * 2 - 4 + 1
    assert "base/uname[config=-,memory=256M]" in ids
    assert "base/suite[config=CONFIG_LOG_BUF_SHIFT=17,memory=1G]" in ids
    assert not any(i.startswith("small-log/") and "memory=1G" in i for i in ids)
    extra = m.cells[-1]
    assert extra.id == "base/uname[cpus=2]" and extra.test.option("cpus") == 2
    big = next(c for c in m.cells if c.id == "base/uname[config=CONFIG_LOG_BUF_SHIFT=17,memory=1G]")
    assert big.kernel.config == ("CONFIG_LOG_BUF_SHIFT=17",) and big.test.option("memory") == "1G"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[kernel]]\nname = 'k'\n", "test: no [[test]]"),
        ("[[test]]\nname='t'\ncommand=['true']\n", "kernel: no [[kernel]]"),
        (EXAMPLE + "[[kernel]]\nname='base'\n", "kernel: the name 'base' is used twice"),
        (EXAMPLE.replace('profile = "minimal"', 'profile = "tiny"', 1), "kernel 'base'.profile"),
        (EXAMPLE.replace("volumes", "volumez"), "test 'suite'.volumez: unknown key"),
        (EXAMPLE.replace("data:/mnt", "nodir:/mnt"), "test 'suite'.volumes[0]: no such directory"),
        (EXAMPLE.replace('"data:/mnt/data:ro"', '"data:rel"'), "test 'suite'.volumes[0]: "),
        (
            EXAMPLE.replace("volumes = [", 'disks = ["64M:/s", "64M:/t:/x.img"]\nvolumes = ['),
            "test 'suite'.disks[1]: a matrix cell's disks are ephemeral: no PATH",
        ),
        (
            EXAMPLE.replace("volumes = [", 'disks = ["huge:/d"]\nvolumes = ['),
            "test 'suite'.disks[0]: invalid disk size 'huge'",
        ),
        (
            EXAMPLE.replace("volumes = [", 'disks = ["64K:/d"]\nvolumes = ['),
            "test 'suite'.disks[0]: disk size '64K' is too small",
        ),
        (EXAMPLE.replace("LOG_BUF_SHIFT=16", "LOG_BUF_SHIFT"), "kernel 'small-log'.config"),
        (EXAMPLE.replace('command = ["uname", "-r"]', "command = []"), "test 'uname'.command"),
        (EXAMPLE.replace("timeout = 120", "timeout = -1"), "defaults.timeout: expected a positive"),
        (EXAMPLE + "[matrix]\nkernel = ['x']\n", "matrix.kernel: kernels and tests are axes"),
        (EXAMPLE + "[matrix]\nmemroy = ['1G']\n", "matrix.memroy: unknown axis"),
        (EXAMPLE + "[[exclude]]\nkernel = 'nope'\n", "exclude[0].kernel: no kernel named 'nope'"),
        (EXAMPLE + "[[include]]\nkernel = 'base'\n", "include[0]: an included cell names"),
        (EXAMPLE + "[[exclude]]\ntest = 'uname'\n[[exclude]]\ntest = 'suite'\n", "every cell"),
        (EXAMPLE + "[extra]\n", "extra: unknown section"),
        (EXAMPLE + "[matrix]\narch = ['vax']\n", "matrix.arch: must be one of x86_64, arm64"),
        (
            "[[kernel]]\nname='d'\npath='debian'\nprofile='minimal'\n"
            "[[test]]\nname='t'\ncommand=['true']\n",
            "kernel 'd'.path: a built kernel takes no build options",
        ),
        ("[[kernel]\n", "not TOML"),
        (
            EXAMPLE.replace("volumes = [", 'network = "allow=*."\nvolumes = ['),
            "test 'suite'.network: egress rule '*.'",
        ),
        (
            EXAMPLE.replace("volumes = [", 'add_hosts = ["a.test"]\nvolumes = ['),
            "test 'suite'.add_hosts[0]: --add-host 'a.test': expected NAME:IP",
        ),
    ],
)
def test_bad_files_are_one_line_naming_file_and_key(here, text, message):
    path = write(here, text)
    with pytest.raises(InputError) as err:
        Matrix.from_file(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    r = qemubox("matrix", path)
    assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err


KTAP = """KTAP version 1
1..3
    KTAP version 1
    # Subtest: suite_a
    1..2
    ok 1 test_one
        KTAP version 1
        1..1
        not ok 1 case_x
    not ok 2 test_two
not ok 1 suite_a
ok 2 suite_b # SKIP no hardware
ok 3 - suite_c
"""


def test_ktap_trees():
    assert ktap.is_ktap(KTAP) and ktap.is_ktap("\nTAP version 13\n1..1\nok 1 x\n")
    assert not ktap.is_ktap("hello\nok 1 x\n")
    tests = ktap.parse(KTAP)
    assert [(t.name, t.status) for t in tests] == [
        ("suite_a", "fail"),
        ("suite_b", "skip"),
        ("suite_c", "pass"),
    ]
    a = tests[0]
    assert [(t.name, t.status) for t in a.subtests] == [("test_one", "pass"), ("test_two", "fail")]
    assert [(t.name, t.status) for t in a.subtests[1].subtests] == [("case_x", "fail")]
    assert ktap.failed(tests) and not ktap.failed(tests[1:])
    assert a.flat()[-1] == ("suite_a.test_two.case_x", "fail")


def result(cell, status, **kw) -> CellResult:
    kernel, test = cell.split("/")
    base = dict(axes={}, exit_code=0, duration=1.5, stdout="out\x01put\n")
    return CellResult(cell, kernel, test, status=status, **{**base, **kw})


def test_junit_as_a_junit_parser_reads_it(tmp_path):
    subtests = [t.to_dict() for t in ktap.parse(KTAP)]
    results = [
        result("k/ok", "pass"),
        result("k/ktap", "fail", subtests=subtests),
        result("k/bad", "fail", exit_code=3, stderr="boom\n"),
        result("k/panic", "error", exit_code=None, error="kernel panic", console_tail="tail"),
    ]
    path = tmp_path / "out.xml"
    report.write_junit(results, path, "m.toml")
    xml = JUnitXml.fromfile(str(path))
    (suite,) = list(xml)
    cases = {(c.classname, c.name): c for c in suite}
    assert suite.tests == 4 + 6 and suite.failures == 1 + 1 + 3 and suite.errors == 1
    assert suite.skipped == 1
    assert cases[("k", "ok")].is_passed
    assert isinstance(cases[("k", "bad")].result[0], Failure)
    assert cases[("k", "bad")].result[0].message == "exit status 3"
    assert cases[("k", "ktap")].result[0].message == "3 of 6 subtests failed"
    assert isinstance(cases[("k", "panic")].result[0], Error)
    assert isinstance(cases[("k.ktap", "suite_b")].result[0], Skipped)
    assert cases[("k.ktap", "suite_a.test_two.case_x")].result[0].message == "not ok"
    rows = report.summary_rows(results)
    assert rows[2] == ("k/ktap", "fail", "0", "1.5s", "6 subtests, 3 failed")


def test_an_axis_value_the_kernel_has_already_makes_no_other_kernel(tmp_path):
    m = Matrix.from_data(
        {
            "kernel": [{"name": "k", "config": ["CONFIG_A=y"], "fragments": ["vm"]}],
            "test": [{"name": "t", "command": "true"}],
            "matrix": {"config": [[], ["CONFIG_A=y"]], "fragments": [[], ["vm"]]},
        },
        tmp_path,
    )
    assert len(m.cells) == 4
    assert len({c.kernel.build_inputs() for c in m.cells}) == 1


ARCHES = """
[[kernel]]
name = "debian"
path = "debian"

[[kernel]]
name = "own"
profile = "minimal"
arch = "aarch64"

[[test]]
name = "uname"
command = ["uname", "-m"]

[matrix]
arch = ["s390x", "armhf"]
"""


def test_an_arch_axis_makes_a_kernel_per_arch(here):
    m = Matrix.from_file(write(here, ARCHES))
    assert [c.id for c in m.cells] == [
        "debian/uname[arch=s390x]",
        "debian/uname[arch=armhf]",
        "own/uname[arch=s390x]",
        "own/uname[arch=armhf]",
    ]
    debian = [c for c in m.cells if c.kernel.name == "debian"]
    assert [(c.kernel.path, c.kernel.arch) for c in debian] == [
        ("debian", "s390x"),
        ("debian", "armhf"),
    ]
    assert debian[0].session("debian").arch == "s390x"
    own = [c.kernel for c in m.cells if c.kernel.name == "own"]
    assert [k.arch for k in own] == ["s390x", "armhf"] and len({kernel_key(k) for k in own}) == 2
    one = Matrix.from_file(write(here, ARCHES.split("[matrix]")[0]))
    assert one.cells[1].kernel.arch == "arm64", "an arch's other names are its name"


def test_a_built_kernel_has_its_own_arch(here):
    (here / "vmlinuz").write_bytes(b"x")
    text = "[[kernel]]\nname='k'\npath='vmlinuz'\n[[test]]\nname='t'\ncommand=['true']\n"
    with pytest.raises(InputError, match="kernel 'k': a built kernel has its own arch"):
        Matrix.from_file(write(here, text + "[matrix]\narch = ['s390x']\n"))
