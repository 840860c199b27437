"""The corpus of broken inventories: each mistake must be reported once, at the right file and line.

Every directory under ``broken/`` is one case: a small inventory (one or more ``*.yaml`` files) holding
the intended mistake and nothing else, and ``expected.txt`` saying what ``load_inventory`` must report.
Each line of ``expected.txt`` that is neither empty nor a ``#`` comment reads::

    [warning ]FILE:LINE: TEXT

- ``FILE`` is the file's path relative to the case directory (``sites.yaml``). A diagnostic about the
  directory itself (no ``*.yaml`` file at all) is written ``.``, the case directory.
- ``LINE`` is the 1-based line the engineer must edit.
- ``TEXT`` must be a substring of the diagnostic's ``field: message``.
- ``warning `` expects a warning; otherwise an error is expected.

A comment ``# secret: TEXT`` says that the case holds a credential: ``TEXT`` must appear nowhere in what
``restore validate`` prints, since a message that repeats a secret leaks it a second time.

Each expected line must match exactly one diagnostic, and there must be no diagnostic beyond those
expected: a case with errors loads no estate and makes ``restore validate`` exit with status 2; a case
with warnings only loads an estate and exits with status 0.

Every case is also run in a child process of its own, which must answer within ``MAX_SECONDS`` and
``MAX_RSS_MB`` (hostile input: alias bombs, huge ranges, dense dependencies).

To add a case: write the inventory, run ``restore validate`` on it, check that what it says is right,
then write ``expected.txt`` for the right behaviour. ``restore validate`` with the case's directory
prints the same; the size of the corpus: ``pytest tests/inventory/test_broken_corpus.py --collect-only
-q -k bounds``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from restore_flows.cli import EXIT_INVALID, app
from restore_flows.errors import Diagnostic, Severity
from restore_flows.inventory.loader import LoadResult, load_inventory

CORPUS = Path(__file__).parent / "broken"
CASES = sorted(path for path in CORPUS.iterdir() if path.is_dir())
DIRECTORY = "."
"""How ``expected.txt`` names the case directory itself."""

_SECRET_LINE = re.compile(r"^#\s*secret:\s(?P<text>.+)$")
MAX_SECONDS = 5.0
MAX_RSS_MB = 500
_EXPECTED_LINE = re.compile(r"^(?:(?P<warning>warning) )?(?P<file>[^\s:]+):(?P<line>[0-9]+): (?P<text>.+)$")


@dataclass(frozen=True, slots=True)
class Expected:
    """One line of ``expected.txt``."""

    file: str
    line: int
    text: str
    severity: Severity
    origin: str
    """Where the expectation is written (``expected.txt:3``), for failure messages."""

    def matches(self, found: Found) -> bool:
        return (
            found.severity is self.severity
            and found.file == self.file
            and found.line == self.line
            and self.text in found.text
        )


@dataclass(frozen=True, slots=True)
class Found:
    """A diagnostic with its file made relative to the case directory."""

    file: str
    line: int
    text: str
    severity: Severity

    def __str__(self) -> str:
        prefix = "warning " if self.severity is Severity.WARNING else ""
        return f"{prefix}{self.file}:{self.line}: {self.text}"


def read_expected(case: Path) -> list[Expected]:
    expected_file = case / "expected.txt"
    assert expected_file.is_file(), f"{case.name}: no expected.txt"
    expected: list[Expected] = []
    for number, raw in enumerate(expected_file.read_text(encoding="utf-8").splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        origin = f"{expected_file}:{number}"
        match = _EXPECTED_LINE.match(text)
        assert match is not None, f"{origin}: not '[warning ]FILE:LINE: TEXT': {raw!r}"
        severity = Severity.WARNING if match["warning"] else Severity.ERROR
        expected.append(Expected(match["file"], int(match["line"]), match["text"], severity, origin))
    assert expected, f"{expected_file}: expects nothing; every case must expect at least one diagnostic"
    return expected


def read_secrets(case: Path) -> list[str]:
    text = (case / "expected.txt").read_text(encoding="utf-8")
    return [m["text"] for line in text.splitlines() if (m := _SECRET_LINE.match(line.strip()))]


def relative_file(diagnostic: Diagnostic, case: Path) -> str:
    """The diagnostic's file relative to the case directory: ``.`` for the directory itself.

    The file itself is not resolved: a diagnostic about a link names the link."""
    written = Path(diagnostic.file)
    path = written.parent.resolve() / written.name
    try:
        return path.relative_to(case.resolve()).as_posix()
    except ValueError:
        return str(path)  # outside the case: can never match an expectation, shown as it is


def found_in(result: LoadResult, case: Path) -> list[Found]:
    return [
        Found(
            relative_file(d, case),
            d.line,
            f"{d.field}: {d.message}" if d.field else d.message,
            d.severity,
        )
        for d in result.diagnostics
    ]


def describe(found: list[Found]) -> str:
    return "\n".join(f"    {f}" for f in found) or "    (nothing)"


def count(items: list[Expected] | list[Found], severity: Severity) -> int:
    return sum(1 for item in items if item.severity is severity)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_expected_txt_points_into_the_case(case: Path) -> None:
    """A typo in ``expected.txt`` must not pass for a loader bug: FILE exists and LINE is in it."""
    for expected in read_expected(case):
        if expected.file == DIRECTORY:
            assert expected.line == 1, f"{expected.origin}: the directory itself is always line 1"
            continue
        target = case / expected.file
        if target.is_symlink() and not target.exists():
            assert expected.line == 1, f"{expected.origin}: a dangling link has no lines but line 1"
            continue
        assert target.is_file(), f"{expected.origin}: no file {expected.file} in {case.name}"
        lines = len(target.read_bytes().splitlines())  # bytes: a case may hold invalid UTF-8
        assert 1 <= expected.line <= lines, f"{expected.origin}: {expected.file} has {lines} lines"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_loader_reports_exactly_the_expected_diagnostics(case: Path) -> None:
    expected = read_expected(case)
    result = load_inventory(case)
    found = found_in(result, case)
    report = f"\n  {case.name} reported:\n{describe(found)}"

    for item in expected:
        matching = [f for f in found if item.matches(f)]
        assert len(matching) == 1, (
            f"{item.origin}: expected exactly one {item.severity.value} "
            f"'{item.file}:{item.line}: ...{item.text}...', got {len(matching)}{report}"
        )
    for severity in (Severity.ERROR, Severity.WARNING):
        reported, wanted = count(found, severity), count(expected, severity)
        assert reported == wanted, (
            f"{case.name}: {reported} {severity.value}(s) reported, {wanted} expected{report}"
        )
    if count(expected, Severity.ERROR):
        assert result.estate is None, f"{case.name}: an inventory with errors must load no estate"
    else:
        assert result.estate is not None, f"{case.name}: warnings must not block the estate{report}"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_validate_command_prints_each_location(case: Path) -> None:
    """``restore validate`` prints every diagnostic with its location, never a traceback.

    The command prints paths as given (relative to the working directory, or absolute), so a
    location is looked for as ``FILE:LINE:`` at the end of a path; the directory itself is found by
    its name.
    """
    expected = read_expected(case)
    result = CliRunner().invoke(app, ["validate", str(case)])
    output = result.output

    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), output
    for secret in read_secrets(case):
        assert secret not in output, f"{case.name}: the secret is repeated in what is printed:\n{output}"
    has_errors = count(expected, Severity.ERROR) > 0
    assert result.exit_code == (EXIT_INVALID if has_errors else 0), output
    if not has_errors:
        assert "inventory OK" in output, output
    lines = output.splitlines()
    for item in expected:
        name = case.name if item.file == DIRECTORY else item.file
        where = re.compile(rf"(?:^|[/\\]){re.escape(name)}:{item.line}: ")
        printed = [line for line in lines if where.search(line) and item.text in line]
        assert printed, f"{item.origin}: '{name}:{item.line}: ...{item.text}' not printed:\n{output}"
        if item.severity is Severity.WARNING:
            assert all("warning: " in line for line in printed), output


def _validate_in_child(case: Path, write_end: int) -> None:
    """In the forked child: run ``restore validate``, send back exit status, output and the memory it
    took (its peak resident size over what it had when forked, in kB); never return."""
    status = 1
    try:
        address_space, resident = _statm()
        # A safety net for the machine, well above the bound that the parent checks.
        limit = 4 * MAX_RSS_MB * 2**20 + address_space
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a hung case dies, whatever handlers it inherited
        signal.alarm(int(MAX_SECONDS * 6))
        result = CliRunner().invoke(app, ["validate", str(case)])
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - resident // 1024
        crashed = None
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            crashed = repr(result.exception)
        reply = [result.exit_code, result.output[-4000:], crashed, grown]
        os.write(write_end, json.dumps(reply).encode())
        status = 0
    finally:
        os._exit(status)


def _statm() -> tuple[int, int]:
    """This process's address space and resident size, in bytes."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        size, resident = (int(field) for field in statm.read().split()[:2])
    page = os.sysconf("SC_PAGE_SIZE")
    return size * page, resident * page


@pytest.fixture(scope="module")
def cli_baseline_mb() -> float:
    """What a fresh ``restore`` process holds before it reads anything: the interpreter and the CLI's
    imports. A case's peak is this plus what validating it added."""
    measured = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, restore_flows.cli; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(measured.stdout) / 1024


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_case_is_answered_within_bounds(case: Path, cli_baseline_mb: float) -> None:
    """Exit 2 (or 0 for warnings only) with no traceback, in under 5 s and 500 MB, in a process of its
    own so that time and peak memory are this case's (a fork of this one: no second start-up to pay)."""
    has_errors = count(read_expected(case), Severity.ERROR) > 0
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        _validate_in_child(case, write_end)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, wait_status, _ = os.wait4(pid, 0)
    elapsed = time.monotonic() - started
    assert os.waitstatus_to_exitcode(wait_status) == 0, f"{case.name}: the child died ({wait_status})"
    exit_code, output, crashed, grown_kb = json.loads(b"".join(chunks))
    peak_mb = cli_baseline_mb + grown_kb / 1024
    assert crashed is None, f"{case.name}: {crashed}\n{output}"
    assert "Traceback" not in output, output
    assert exit_code == (EXIT_INVALID if has_errors else 0), output
    assert elapsed <= MAX_SECONDS, f"{case.name}: {elapsed:.1f} s, more than {MAX_SECONDS} s"
    assert peak_mb <= MAX_RSS_MB, (
        f"{case.name}: peak {peak_mb:.0f} MB ({cli_baseline_mb:.0f} MB to start, {grown_kb / 1024:.0f} MB "
        f"to validate), more than {MAX_RSS_MB} MB"
    )


_READABLE = """
waves: [{name: rest, services: ["*"]}]
sites: [{name: dc1, kind: datacenter}]
roles: [{name: app, kind: server}]
hosts:
  - {name: app-01, role: app, site: dc1, depends_on: [db-01]}
"""
_HIDDEN = "hosts:\n  - {name: db-01, role: app, site: dc1}\n"
NOBODY = 65534


def _load_as_another_user(directory: Path) -> list[tuple[str, int, str]]:
    """Load ``directory`` in a child that cannot read what was made unreadable: the root user reads
    everything, so as root the child gives up its privileges first."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(read_end)
            if os.getuid() == 0:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            result = load_inventory(directory)
            found = [(relative_file(d, directory), d.line, d.message) for d in result.diagnostics]
            os.write(write_end, json.dumps(found).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, wait_status, _ = os.wait4(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    return [tuple(item) for item in json.loads(b"".join(chunks))]


@pytest.mark.parametrize("unreadable", ["more", "more/db.yaml"])
def test_an_unreadable_folder_or_file_is_reported_once(unreadable: str) -> None:
    """Never skipped in silence (its hosts would be missing from the plan), and what its absence causes
    elsewhere (app-01's unknown dependency) is not reported on top."""
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        directory.chmod(0o755)  # the unprivileged child must reach it
        (directory / "estate.yaml").write_text(_READABLE)
        (directory / "more").mkdir(mode=0o755)
        (directory / "more" / "db.yaml").write_text(_HIDDEN)
        (directory / "estate.yaml").chmod(0o644)
        (directory / unreadable).chmod(0o000)
        try:
            found = _load_as_another_user(directory)
        finally:
            (directory / unreadable).chmod(0o755)
    what = "folder" if unreadable == "more" else "file"
    assert len(found) == 1, found
    assert found[0][:2] == (unreadable, 1), found
    assert f"cannot read the {what}: Permission denied" in found[0][2], found
