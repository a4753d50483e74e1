"""Debian packages qemubox installs or fetches on demand, and where their programs are."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from qemubox.errors import InputError, ToolError, last_line

# Where Debian puts administrators' tools (mkfs.ext4, depmod, debugfs, debootstrap): not on an
# ordinary user's PATH, yet many of them serve that user too.
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

# What apt and debootstrap say when the mirror or the network failed them rather than the
# request (a mirror in the middle of a sync serves an index of the wrong size): such a
# failure is tried again, RETRY_DELAYS seconds apart; any other is said at once.
TRANSIENT = re.compile(
    r"unexpected size|mirror sync|hash sum mismatch|failed to fetch|couldn't download"
    r"|could not (?:connect|resolve)|temporary failure|connection (?:failed|timed out|refused)"
    r"|timed out|unable to fetch|error reading from server|\b50[234]\b",
    re.IGNORECASE,
)
RETRY_DELAYS = (3.0, 6.0, 12.0)


def transient(output: str) -> bool:
    """Whether a failed apt or debootstrap run blames the mirror or the network."""
    return TRANSIENT.search(output) is not None


def attempts(
    what: str,
    run: Callable[[], subprocess.CompletedProcess],
    enough: Callable[[], bool] = lambda: False,
) -> subprocess.CompletedProcess:
    """Run an apt tool (``run``) until it succeeds (or fails having done ``enough``), again
    after each of ``RETRY_DELAYS`` while its failure is :func:`transient`; ToolError naming
    ``what`` with its last word otherwise. Returns the last run."""
    for delay in (*RETRY_DELAYS, None):
        proc = run()
        if proc.returncode == 0 or enough():
            return proc
        if delay is None or not transient(f"{proc.stdout or ''}{proc.stderr or ''}"):
            break
        time.sleep(delay)
    raise ToolError(f"{what} failed: {last_line(proc.stderr)}")


def program(name: str, package: str) -> str:
    """The path of program ``name``: on the caller's PATH, else in the system directories;
    a one-line error names the Debian package when it is nowhere."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SYSTEM_DIRS))
    if found is None:
        raise InputError(f"{name} not found: install it with 'apt-get install {package}'")
    return found


def apt_install(package: str, why: str) -> None:
    """Install a package when root; otherwise say the exact command (``why`` says what for)."""
    if os.geteuid() != 0:
        raise InputError(f"{why}: install it with 'apt-get install {package}' (as root)")
    args = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    attempts(f"apt-get install {package}", lambda: _capture(args, env=env))


def _capture(args: list[str], cwd: Path | None = None, env: dict | None = None):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def apt_download(package: str, directory: Path) -> Path:
    """Download a package's .deb into ``directory`` (no root needed); returns its path."""
    what = f"apt-get download {package}"
    attempts(what, lambda: _capture(["apt-get", "download", package], directory))
    debs = sorted(directory.glob("*.deb"))
    if not debs:
        raise ToolError(f"{what} failed: it fetched no .deb")
    return debs[-1]


def _private(state: Path, *options: str) -> list[str]:
    """apt options (``options`` first) that keep package lists and downloads under
    ``state``: the host's own apt configuration and cache are not touched."""
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    return [
        "-qq",
        *options,
        "-o", f"Dir::State::Lists={state / 'lists'}",
        "-o", f"Dir::Cache={state / 'cache'}",
        "-o", "Debug::NoLocking=1",
        "-o", "APT::Sandbox::User=root" if os.geteuid() == 0 else "Debug::NoDropPrivs=1",
    ]  # fmt: skip


def _run(args: list[str], what: str, cwd: Path | None = None) -> None:
    """Run an apt or dpkg tool (see :func:`attempts`)."""
    attempts(what, lambda: _capture(args, cwd))


_UPDATED: set[Path] = set()  # the private list directories this process has updated


def _update(options: list[str], state: Path, what: str, kind: str) -> None:
    """``apt-get update`` of the private lists under ``state``, once per process. An update
    that failed yet brought lists of ``kind`` (``Packages``, ``Sources``) goes on with them:
    a mirror that serves one index badly (bookworm-security's, mid-sync) leaves the others
    usable; the next process updates again."""
    lists = state / "lists"
    if lists in _UPDATED:
        return
    update = ["apt-get", *options, "update"]
    proc = attempts(what, lambda: _capture(update), lambda: any(lists.glob(f"*_{kind}*")))
    if proc.returncode != 0:
        (state / "partial").touch()
    else:
        (state / "partial").unlink(missing_ok=True)
    _UPDATED.add(lists)


def _foreign(debian_arch: str, state: Path) -> list[str]:
    """apt options for packages of another architecture, from the mirror this host's apt
    sources name, with that architecture's package lists kept under ``state``; the lists
    are fetched the first time."""
    options = _private(
        state,
        "-o", f"APT::Architecture={debian_arch}",
        "-o", f"APT::Architectures::={debian_arch}",
        "-o", "Dir::State::status=/dev/null",
    )  # fmt: skip
    if not any((state / "lists").glob("*_Packages*")) or (state / "partial").exists():
        _update(options, state, f"apt-get update for {debian_arch}", "Packages")
    return options


def depends(package: str, debian_arch: str | None = None, state: Path | None = None) -> str:
    """``apt-cache depends`` of a package (of another architecture, with ``state``)."""
    if shutil.which("apt-cache") is None:
        raise InputError("no apt-cache here: give a kernel with --kernel")
    options = _foreign(debian_arch, state) if debian_arch and state else []
    proc = subprocess.run(
        ["apt-cache", *options, "depends", package], capture_output=True, text=True, check=False
    )
    return proc.stdout


def download_for_arch(package: str, debian_arch: str, directory: Path, state: Path) -> Path:
    """Download ``package`` built for another architecture (see ``_foreign``). Returns the
    .deb's path."""
    options = _foreign(debian_arch, state)
    what = f"apt-get download {package} ({debian_arch})"
    attempts(what, lambda: _capture(["apt-get", *options, "download", package], directory))
    debs = sorted(directory.glob(f"*_{debian_arch}.deb"))
    if not debs:
        raise ToolError(f"{what} failed: it fetched no .deb")
    return debs[-1]


def debian_sources(etc: Path = Path("/etc/apt")) -> list[tuple[str, str, str]]:
    """(URI, suite, components) of each Debian source of this host's apt configuration:
    those of its release (``VERSION_CODENAME``), in either format (one-line ``.list`` or
    deb822 ``.sources``)."""
    codename = _codename()
    found: list[tuple[str, str, str]] = []
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for path in files:
        for line in _read(path).splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 4 and words[0] == "deb":
                found.append((words[1], words[2], " ".join(words[3:])))
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", _read(path)):
            fields = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (ln.partition(":") for ln in stanza.splitlines())
                if v and not k.startswith((" ", "#"))
            )
            if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    found.append((uri, suite, fields.get("components", "")))
    return [s for s in found if not codename or s[1].split("-")[0] == codename]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _codename() -> str:
    for line in _read(Path("/etc/os-release")).splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return ""


def download_source(package: str, directory: Path, state: Path) -> Path:
    """Download and unpack Debian's source package ``package`` into ``directory``, from the
    Debian mirrors of this host's apt sources (their deb-src twins, with lists kept under
    ``state``). Returns the unpacked tree."""
    sources = debian_sources()
    if not sources:
        raise ToolError("no Debian source in /etc/apt to fetch source packages from")
    listing = state / "sources.list"
    options = _private(
        state,
        "-o", f"Dir::Etc::SourceList={listing}",
        "-o", "Dir::Etc::SourceParts=/nonexistent",
    )  # fmt: skip
    listing.write_text("".join(f"deb-src {u} {s} {c}\n" for u, s, c in sources))
    _update(options, state, f"apt-get update (sources of {package})", "Sources")
    _run(
        ["apt-get", *options, "source", "--download-only", package],
        f"apt-get source {package}",
        directory,
    )
    dsc = sorted(directory.glob(f"{package}_*.dsc"))
    if not dsc:
        raise ToolError(f"apt-get source {package} fetched no .dsc")
    tree = directory / "src"
    dpkg_source = program("dpkg-source", "dpkg-dev")
    _run(
        [dpkg_source, "--no-check", "-x", str(dsc[-1]), str(tree)],
        f"dpkg-source -x {dsc[-1].name}",
        directory,
    )
    return tree
