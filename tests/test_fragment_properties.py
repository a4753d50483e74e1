"""Property tests: random fragment trees against a reference model of the language."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemubox.errors import InputError
from qemubox.kconfig.fragment import parse_config_text, quote_string, read_fragments
from qemubox.kconfig.merge import merge

NAMES = ["A", "B", "C", "FOO", "BAR_2"]
values = st.one_of(
    st.sampled_from(["y", "m", "n", "0", "42", "-7", "0x1F"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=8).map(
        quote_string
    ),
)
assignment = st.tuples(st.just("assign"), st.sampled_from(NAMES), values)
comment = st.tuples(st.just("comment"), st.sampled_from(["# hi", "", "#", "   "]), st.none())
# Includes point only forward (acyclic trees); cycles are tested separately.
include = st.tuples(st.just("include"), st.integers(min_value=1, max_value=4), st.none())
line = st.one_of(assignment, assignment, comment, include)
trees = st.lists(st.lists(line, max_size=8), min_size=1, max_size=5)


def render(kind: str, a, b, index: int, count: int) -> str | None:
    if kind == "assign":
        return f"# CONFIG_{a} is not set" if b == "n" else f"CONFIG_{a}={b}"
    if kind == "comment":
        return a
    target = index + a
    return f'include "f{target}.config"' if target < count else None


def build(tmp: Path, tree) -> list[list[tuple[str, str] | int]]:
    """Write the files; return each file's model: assignments and include targets."""
    model = []
    for index, lines in enumerate(tree):
        text, items = [], []
        for kind, a, b in lines:
            rendered = render(kind, a, b, index, len(tree))
            if rendered is None:
                continue
            text.append(rendered)
            if kind == "assign":
                items.append((a, b))
            elif kind == "include":
                items.append(index + a)
        (tmp / f"f{index}.config").write_text("\n".join(text) + "\n")
        model.append(items)
    return model


def expand(model, index: int):
    for item in model[index]:
        if isinstance(item, int):
            yield from expand(model, item)
        else:
            yield item


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, top=st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=3))
def test_later_assignment_wins_in_first_appearance_order(tree, top):
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = build(tmp, tree)
        top = [i for i in top if i < len(tree)] or [0]
        merged = merge(read_fragments([str(tmp / f"f{i}.config") for i in top]))
        expected: dict[str, str] = {}
        for i in top:
            for name, value in expand(model, i):
                expected[name] = value
        assert list(merged.values().items()) == list(expected.items())
        # The merged text reads back to the same assignments, in the same order.
        again = merge(parse_config_text(merged.text(), "merged")).values()
        assert list(again.items()) == list(expected.items())


garbage_line = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "silent",
            "endsilent",
            'include "f0.config"',
            'include "f1.config"',
            "include",
            'CONFIG_X="',
            "CONFIG_=y",
            "# CONFIG_ is not set",
        ]
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.lists(garbage_line, max_size=6), min_size=1, max_size=3))
def test_arbitrary_text_never_crashes_the_parser(files):
    """Any input, cycles included, parses or fails with a one-line input error."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for index, lines in enumerate(files):
            (tmp / f"f{index}.config").write_text("\n".join(lines))
        try:
            merged = merge(read_fragments([str(tmp / "f0.config")]))
        except InputError as err:
            assert "\n" not in str(err)
            return
        assert merge(parse_config_text(merged.text(), "m")).values() == merged.values()
