"""One revision of a bisection judged, as ``git bisect run`` runs it: the checkout built
(cached: a revision built before builds nothing), booted, and the command run on it with
``qemubox run``'s options. Exit status, as git reads it: 0 good (the command exited 0), 125
skip (the build failed, or the command exited 125), 1 bad (anything else: a failure, a
panic, a kernel that does not boot).

Each judgement is appended to the bisection's record as a JSON line (see drive.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from qemubox.bisect.git import git, subject
from qemubox.errors import QemuboxError

GOOD, SKIP, BAD = 0, 125, 1
VERDICTS = {GOOD: "good", SKIP: "skip", BAD: "bad"}


def verdict(exit_code: int) -> int:
    """What ``qemubox run``'s exit status says of the revision."""
    if exit_code in (GOOD, SKIP):
        return exit_code
    return BAD


def judge(spec: dict) -> int:
    from qemubox.kernel.build import BuildRequest, build_kernel

    tree = Path(spec["tree"])
    sha = git(tree, "rev-parse", "HEAD").strip()
    title = f"{sha[:12]} {subject(tree, sha)}"
    began = time.monotonic()
    _say(f"qemubox bisect: {title}: building")
    record = {"commit": sha, "subject": subject(tree, sha)}
    try:
        request = BuildRequest(
            source=str(tree), arch=spec["arch"], profile=spec["profile"],
            fragments=tuple(spec["fragments"]), output=None,
        )  # fmt: skip
        built = build_kernel(request)
    except QemuboxError as err:
        _say(f"qemubox bisect: {title}: skip (the build failed: {err})")
        return _record(spec, record, SKIP, None, False, began, f"the build failed: {err}")
    image = Path(built.manifest["build_dir"]) / built.manifest["image"]
    build_seconds = time.monotonic() - began
    how = f"built in {build_seconds:.1f} s" if built.ran_make else "built before"
    _say(f"qemubox bisect: {title}: {how}; running the command")
    command = [sys.executable, "-m", "qemubox", "run", "--kernel", str(image), *spec["run_args"]]
    code = subprocess.run(command, stdin=subprocess.DEVNULL, check=False).returncode
    judged = verdict(code)
    _say(f"qemubox bisect: {title}: {VERDICTS[judged]} (exit status {code})")
    return _record(spec, record, judged, code, built.ran_make, began, "", build_seconds)


def _record(
    spec: dict,
    record: dict,
    judged: int,
    code: int | None,
    built: bool,
    began: float,
    note: str,
    build_seconds: float | None = None,
) -> int:
    record.update(
        verdict=VERDICTS[judged],
        exit_code=code,
        built=built,
        build_seconds=round(build_seconds, 1) if build_seconds is not None else None,
        seconds=round(time.monotonic() - began, 1),
        note=note,
    )
    with open(spec["record"], "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    return judged


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    # python -m qemubox.bisect.step SPEC.json
    try:
        sys.exit(judge(json.loads(Path(sys.argv[1]).read_text())))
    except KeyboardInterrupt:
        sys.exit(130)  # above 127: git bisect run stops
