"""The fragment language: one table row per rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemubox.kconfig.fragment import FragmentError, parse_config_text, read_fragments
from qemubox.kconfig.merge import merge


def write(tmp: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def values(tmp: Path, files: dict[str, str], args: list[str], stdin: str = "") -> dict[str, str]:
    write(tmp, files)
    paths = [a if a == "-" else str(tmp / a) for a in args]
    return merge(read_fragments(paths, stdin_text=lambda: stdin)).values()


@pytest.mark.parametrize(
    ("line", "name", "value"),
    [
        ("CONFIG_A=y", "A", "y"),
        ("CONFIG_A=m", "A", "m"),
        ("CONFIG_A=n", "A", "n"),
        ("CONFIG_LOG_BUF_SHIFT=15", "LOG_BUF_SHIFT", "15"),
        ("CONFIG_NEG=-3", "NEG", "-3"),
        ("CONFIG_ADDR=0x1000", "ADDR", "0x1000"),
        ("CONFIG_ADDR=0XfF", "ADDR", "0XfF"),
        ('CONFIG_S="hello world"', "S", '"hello world"'),
        ('CONFIG_S=""', "S", '""'),
        ('CONFIG_S="a \\"quoted\\" \\\\ word"', "S", '"a \\"quoted\\" \\\\ word"'),
        ('CONFIG_S="x#y"', "S", '"x#y"'),
        ('CONFIG_S="x#y"  # note', "S", '"x#y"'),
        ("CONFIG_A=y # a comment", "A", "y"),
        ("CONFIG_A=y#tight comment", "A", "y"),
        ("CONFIG_A=m\t# tab then comment", "A", "m"),
        ("   CONFIG_A=y", "A", "y"),
        ("\tCONFIG_A=y   ", "A", "y"),
        ("CONFIG_A = y", "A", "y"),
        ("# CONFIG_A is not set", "A", "n"),
        ("  #  CONFIG_A is not set", "A", "n"),
        ("CONFIG_lower_Case9=y", "lower_Case9", "y"),
    ],
)
def test_assignment_forms(tmp_path, line, name, value):
    assert values(tmp_path, {"f.config": line + "\n"}, ["f.config"]) == {name: value}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "# just a comment\n",
        "#\n",
        "# CONFIG_A is set to something\n",  # not the 'is not set' form: a comment
        "   # indented comment\n",
    ],
)
def test_comments_and_blank_lines_assign_nothing(tmp_path, text):
    assert values(tmp_path, {"f.config": text}, ["f.config"]) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("CONFIG_A=yes\n", "f.config:1: invalid value 'yes' for CONFIG_A"),
        ("CONFIG_A=\n", "f.config:1: CONFIG_A has no value"),
        ("CONFIG_A=y n\n", "f.config:1: unexpected text after the value of CONFIG_A: 'n'"),
        ('CONFIG_S="open\n', "f.config:1: unterminated string value"),
        ('CONFIG_S="a" b\n', "f.config:1: unexpected text after the value of CONFIG_S: 'b'"),
        ("CONFIG_A=0x\n", "f.config:1: invalid value '0x'"),
        ("CONFIG_A=1.5\n", "f.config:1: invalid value '1.5'"),
        ("\n\nFOO=y\n", "f.config:3: expected CONFIG_NAME=value, got 'FOO=y'"),
        ("CONFIG_A-B=y\n", "f.config:1: expected CONFIG_NAME=value"),
        ("CONFIG_A\n", "f.config:1: expected CONFIG_NAME=value, got 'CONFIG_A'"),
        ("frobnicate\n", "f.config:1: unknown directive 'frobnicate'"),
        ('includes "x"\n', "f.config:1: unknown directive 'includes'"),
        ("silent\nsilent\n", "f.config:2: nested 'silent'"),
        ("endsilent\n", "f.config:1: 'endsilent' without a matching 'silent'"),
        ("silent\nendsilent\nendsilent\n", "f.config:3: 'endsilent' without a matching"),
        ("silent now\n", "f.config:1: unexpected text after silent: 'now'"),
        ("include\n", "f.config:1: include needs a file name"),
        ('include "nope.config"\n', "f.config:1: no such file: "),
        ("include a b\n", "f.config:1: include path with spaces must be quoted"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.config").write_text(text)
    with pytest.raises(FragmentError) as err:
        read_fragments(["f.config"])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_seed_example(tmp_path):
    """The example of the kconfig.py documentation, to the letter."""
    files = {
        "file1.config": 'CONFIG_FOO=y\nCONFIG_BAR=m\n\ninclude "file3.config"\n\nCONFIG_BAZ=y\n',
        "file2.config": "CONFIG_QUX=m\n",
        "file3.config": "CONFIG_FOO=m\nCONFIG_BAZ=m\nCONFIG_QUX=y\n",
    }
    write(tmp_path, files)
    merged = merge(read_fragments([str(tmp_path / "file1.config"), str(tmp_path / "file2.config")]))
    assert merged.values() == {"FOO": "m", "BAR": "m", "BAZ": "y", "QUX": "m"}
    assert merged.text() == "CONFIG_FOO=m\nCONFIG_BAR=m\nCONFIG_BAZ=y\nCONFIG_QUX=m\n"


def test_later_file_wins_and_first_appearance_orders(tmp_path):
    write(
        tmp_path,
        {"a.config": "CONFIG_A=y\nCONFIG_B=y\n", "b.config": "CONFIG_C=y\n# CONFIG_A is not set\n"},
    )
    got = merge(read_fragments([str(tmp_path / "a.config"), str(tmp_path / "b.config")]))
    assert got.text() == "# CONFIG_A is not set\nCONFIG_B=y\nCONFIG_C=y\n"
    assert got.last_order == ("B", "C", "A")
    assert got.kernel_input_text() == "CONFIG_B=y\nCONFIG_C=y\n# CONFIG_A is not set\n"


def test_include_relative_to_including_file(tmp_path):
    files = {
        "top.config": 'include "sub/mid.config"\n',
        "sub/mid.config": 'include "leaf.config"\nCONFIG_MID=y\n',
        "sub/leaf.config": "CONFIG_LEAF=y\n",
    }
    assert values(tmp_path, files, ["top.config"]) == {"LEAF": "y", "MID": "y"}


def test_include_absolute_and_unquoted(tmp_path):
    (tmp_path / "abs.config").write_text("CONFIG_ABS=y\n")
    files = {"top.config": f"include {tmp_path / 'abs.config'}  # absolute\n"}
    assert values(tmp_path, files, ["top.config"]) == {"ABS": "y"}


def test_include_with_spaces_in_quoted_path(tmp_path):
    files = {"top.config": 'include "my dir/x.config"\n', "my dir/x.config": "CONFIG_X=m\n"}
    assert values(tmp_path, files, ["top.config"]) == {"X": "m"}


def test_include_cycle_prints_the_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(
        tmp_path,
        {"a.config": 'CONFIG_A=y\ninclude "b.config"\n', "b.config": '\ninclude "a.config"\n'},
    )
    with pytest.raises(FragmentError) as err:
        read_fragments(["a.config"])
    assert str(err.value) == "b.config:2: include cycle: a.config → b.config → a.config"


def test_self_include_is_a_cycle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {"a.config": 'include "./a.config"\n'})
    with pytest.raises(FragmentError, match=r"a.config:1: include cycle: a.config → a.config"):
        read_fragments(["a.config"])


def test_same_file_twice_is_not_a_cycle(tmp_path):
    files = {
        "top.config": 'include "x.config"\nCONFIG_X=n\ninclude "x.config"\n',
        "x.config": "CONFIG_X=y\n",
    }
    assert values(tmp_path, files, ["top.config"]) == {"X": "y"}


def test_missing_include_is_reported_at_the_include_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {"a.config": 'CONFIG_A=y\n\ninclude "gone.config"\n'})
    with pytest.raises(FragmentError) as err:
        read_fragments(["a.config"])
    assert str(err.value) == "a.config:3: no such file: gone.config"


def test_error_inside_included_file_names_that_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {"a.config": 'include "sub/b.config"\n', "sub/b.config": "\nCONFIG_B=bad\n"})
    with pytest.raises(FragmentError, match=r"^sub/b.config:2: invalid value 'bad'"):
        read_fragments(["a.config"])


def silent_flags(tmp_path, files, args):
    write(tmp_path, files)
    merged = merge(read_fragments([str(tmp_path / a) for a in args]))
    return {name: a.silent for name, a in merged.entries.items()}


def test_silent_block(tmp_path):
    files = {
        "f.config": "CONFIG_A=y\nsilent\nCONFIG_B=y\n# CONFIG_C is not set\nendsilent\nCONFIG_D=y\n"
    }
    assert silent_flags(tmp_path, files, ["f.config"]) == {
        "A": False,
        "B": True,
        "C": True,
        "D": False,
    }


def test_unclosed_silent_ends_at_end_of_file(tmp_path):
    files = {"a.config": "silent\nCONFIG_A=y\n", "b.config": "CONFIG_B=y\n"}
    assert silent_flags(tmp_path, files, ["a.config", "b.config"]) == {"A": True, "B": False}


def test_silence_does_not_leak_into_included_files(tmp_path):
    files = {
        "a.config": 'silent\ninclude "b.config"\nCONFIG_A=y\nendsilent\n',
        "b.config": "CONFIG_B=y\n",
    }
    assert silent_flags(tmp_path, files, ["a.config"]) == {"B": False, "A": True}


def test_silence_of_an_included_file_ends_with_it(tmp_path):
    files = {"a.config": 'include "b.config"\nCONFIG_A=y\n', "b.config": "silent\nCONFIG_B=y\n"}
    assert silent_flags(tmp_path, files, ["a.config"]) == {"B": True, "A": False}


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("silent\nCONFIG_X=y\n", "CONFIG_X=y\n", False),  # verified again by the later one
        ("CONFIG_X=y\n", "silent\nCONFIG_X=m\n", True),  # the last assignment is silent
    ],
)
def test_silence_follows_the_last_assignment(tmp_path, a, b, expected):
    files = {"a.config": a, "b.config": b}
    assert silent_flags(tmp_path, files, ["a.config", "b.config"]) == {"X": expected}


def test_stdin(tmp_path):
    got = values(
        tmp_path,
        {"a.config": "CONFIG_A=y\nCONFIG_B=y\n"},
        ["a.config", "-"],
        stdin="CONFIG_B=m\n# CONFIG_C is not set\n",
    )
    assert got == {"A": "y", "B": "m", "C": "n"}


def test_include_from_stdin_is_an_error(tmp_path):
    with pytest.raises(
        FragmentError, match=r"^<stdin>:2: include is not allowed in standard input"
    ):
        read_fragments(["-"], stdin_text=lambda: 'CONFIG_A=y\ninclude "x.config"\n')


def test_stdin_only_once():
    with pytest.raises(Exception, match="only once"):
        read_fragments(["-", "-"], stdin_text=lambda: "")


def test_missing_top_level_file(tmp_path):
    with pytest.raises(FragmentError, match=r"no such file: .*nope.config$"):
        read_fragments([str(tmp_path / "nope.config")])


def test_directory_is_not_a_fragment(tmp_path):
    with pytest.raises(FragmentError, match="is a directory"):
        read_fragments([str(tmp_path)])


def test_binary_file_is_rejected(tmp_path):
    (tmp_path / "bin.config").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FragmentError, match="is not UTF-8 text"):
        read_fragments([str(tmp_path / "bin.config")])


def test_canonical_text_round_trip(tmp_path):
    text = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="q\\"x"\nCONFIG_D=0x10\nCONFIG_E=-1\n'
    merged = merge(parse_config_text(text, "t"))
    assert merged.text() == text
    assert merge(parse_config_text(merged.text(), "t")).values() == merged.values()


def test_n_is_written_as_not_set(tmp_path):
    assert values(tmp_path, {"f.config": "CONFIG_A=n\n"}, ["f.config"]) == {"A": "n"}
    merged = merge(parse_config_text("CONFIG_A=n\n", "t"))
    assert merged.text() == "# CONFIG_A is not set\n"


def test_config_text_rejects_include():
    with pytest.raises(FragmentError, match=r"include is not allowed in a \.config file"):
        parse_config_text('include "x"\n', ".config")


def test_only_newline_ends_a_line():
    text = 'CONFIG_S="a\u2028b\x85c"\r\nCONFIG_T=y\n'
    assert merge(parse_config_text(text, "t")).values() == {"S": '"a\u2028b\x85c"', "T": "y"}
