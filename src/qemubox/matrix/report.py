"""What a matrix run leaves: JSON records, JUnit XML (a testcase per cell and per KTAP
subtest), and the rows of the summary."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from qemubox.matrix.execute import ERROR, FAIL, PASS, CellResult

XML_TEXT_KEEP = 64 << 10  # characters of output kept per testcase


def write_json(results: list[CellResult], path: Path) -> None:
    path.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")


def _flat(subtests: list[dict], prefix: str = "") -> list[tuple[str, str, list[str]]]:
    """(path, status, log) of every subtest, depth first."""
    out = []
    for s in subtests:
        name = f"{prefix}.{s['name']}" if prefix else s["name"]
        out.append((name, s["status"], s.get("log", [])))
        out += _flat(s["subtests"], name)
    return out


def _text(value: str) -> str:
    """Output as XML can hold it: the tail, without characters XML forbids."""
    value = value[-XML_TEXT_KEEP:]
    return "".join(c for c in value if c in "\t\n\r" or ord(c) >= 0x20)


def junit(results: list[CellResult], name: str) -> ET.ElementTree:
    suites = ET.Element("testsuites", name=name)
    by_suite: dict[str, list[CellResult]] = {}
    for r in results:
        axes = ",".join(f"{k}={v}" for k, v in r.axes.items())
        by_suite.setdefault(r.kernel + (f"[{axes}]" if axes else ""), []).append(r)
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite_name, members in by_suite.items():
        suite = ET.SubElement(suites, "testsuite", name=suite_name)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        time_sum = 0.0
        for r in members:
            case = ET.SubElement(
                suite, "testcase", classname=suite_name, name=r.test, time=f"{r.duration:.3f}"
            )
            counts["tests"] += 1
            time_sum += r.duration
            subs = _flat(r.subtests)
            bad = sum(1 for _, status, _ in subs if status == "fail")
            if r.status == FAIL:
                counts["failures"] += 1
                why = r.error or (
                    f"{bad} of {len(subs)} subtests failed"
                    if r.exit_code == 0 and bad
                    else f"exit status {r.exit_code}"
                )
                ET.SubElement(case, "failure", message=why).text = _text(r.stderr)
            elif r.status == ERROR:
                counts["errors"] += 1
                ET.SubElement(case, "error", message=r.error).text = _text(r.console_tail)
            ET.SubElement(case, "system-out").text = _text(r.stdout)
            for sub, status, log in subs:
                sub_case = ET.SubElement(
                    suite, "testcase", classname=f"{suite_name}.{r.test}", name=sub, time="0"
                )
                counts["tests"] += 1
                if status == "fail":
                    counts["failures"] += 1
                    failure = ET.SubElement(sub_case, "failure", message="not ok")
                    failure.text = _text("\n".join(log))
                elif status == "skip":
                    counts["skipped"] += 1
                    ET.SubElement(sub_case, "skipped")
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
        suite.set("time", f"{time_sum:.3f}")
    for key, value in totals.items():
        suites.set(key, str(value))
    return ET.ElementTree(suites)


def write_junit(results: list[CellResult], path: Path, name: str) -> None:
    tree = junit(results, name)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)


def summary_rows(results: list[CellResult]) -> list[tuple[str, ...]]:
    rows = [("CELL", "STATUS", "EXIT", "TIME", "NOTE")]
    for r in results:
        subs = _flat(r.subtests)
        note = r.error
        if subs:
            bad = sum(1 for _, s, _ in subs if s == "fail")
            note = f"{len(subs)} subtests, {bad} failed" + (f"; {note}" if note else "")
        exit_code = "-" if r.exit_code is None else str(r.exit_code)
        rows.append((r.cell, r.status, exit_code, f"{r.duration:.1f}s", note))
    return rows


def counts(results: list[CellResult]) -> dict[str, int]:
    return {s: sum(1 for r in results if r.status == s) for s in (PASS, FAIL, ERROR)}
