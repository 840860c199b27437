"""Every way an operator can get a command wrong ends in 'error: ...' (exit 2) or 'refused: ...' (exit 1):
never a traceback, never markup read into user text, and before any server is started.

Each case is one row: the command line, what the environment is made to be, the exit status and a
part of the message. Read commands are also checked to leave the ledger file untouched.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from restore_flows.cli import app

ROOT = Path(__file__).resolve().parents[1]
INVENTORY = str(ROOT / "inventory")
DIGEST = "ab" * 32
Setup = Callable[[Path], dict[str, str]]


def _migrated(tmp: Path) -> dict[str, str]:
    url = f"sqlite:///{tmp / 'ledger.sqlite3'}"
    assert CliRunner().invoke(app, ["db", "upgrade"], env={"RESTORE_DATABASE_URL": url}).exit_code == 0
    return {"RESTORE_DATABASE_URL": url}


def _unmigrated(tmp: Path) -> dict[str, str]:
    return {"RESTORE_DATABASE_URL": f"sqlite:///{tmp / 'empty.sqlite3'}"}


def _corrupted(tmp: Path) -> dict[str, str]:
    (tmp / "broken.sqlite3").write_bytes(b"this is not a database, it was overwritten" * 100)
    return {"RESTORE_DATABASE_URL": f"sqlite:///{tmp / 'broken.sqlite3'}"}


def _read_only(tmp: Path) -> dict[str, str]:
    path = tmp / "ro.sqlite3"
    sqlite3.connect(path).close()
    return {"RESTORE_DATABASE_URL": f"sqlite:///file:{path}?mode=ro&uri=true"}


def _data_dir_is_a_file(tmp: Path) -> dict[str, str]:
    (tmp / "data").write_text("a file where the data directory should be")
    return {"RESTORE_DATA_DIR": str(tmp / "data" / "sub")}


def _unreachable(tmp: Path) -> dict[str, str]:
    return {"RESTORE_DATABASE_URL": "postgresql+psycopg://restore@127.0.0.1:9/ledger?connect_timeout=2"}


def _malformed(tmp: Path) -> dict[str, str]:
    return {"RESTORE_DATABASE_URL": "not a database url"}


def _unknown_driver(tmp: Path) -> dict[str, str]:
    return {"RESTORE_DATABASE_URL": "oracle+nosuchdriver://u@127.0.0.1/x"}


def _broken_inventory(tmp: Path) -> dict[str, str]:
    (tmp / "inv").mkdir()
    (tmp / "inv" / "x.yaml").write_text("waves: [\n")
    return {**_migrated(tmp), "RESTORE_INVENTORY": str(tmp / "inv")}


def _no_env(tmp: Path) -> dict[str, str]:
    return {}


def _read_only_data_dir(tmp: Path) -> dict[str, str]:
    # /proc refuses new directories whoever asks (chmod would not stop the root user of a CI box).
    return {"RESTORE_DATA_DIR": "/proc/restore-data"}


def _infinite_duration(tmp: Path) -> dict[str, str]:
    # Accepted once, this sent a host to 'wiping' with an OverflowError that no operator could undo.
    (tmp / "inf").mkdir()
    (tmp / "inf" / "x.yaml").write_text(
        "waves: [{name: rest, services: ['*']}]\nsites: [{name: x, kind: hospital}]\n"
        "roles: [{name: r, kind: server}]\nhosts: [{name: h-01, role: r, site: x, durations: {wipe: .inf}}]\n"
    )
    return {**_migrated(tmp), "RESTORE_INVENTORY": str(tmp / "inf")}


def _alias_bomb(tmp: Path) -> dict[str, str]:
    (tmp / "bomb").mkdir()
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    (tmp / "bomb" / "x.yaml").write_text("\n".join(levels) + "\n")
    return {**_migrated(tmp), "RESTORE_INVENTORY": str(tmp / "bomb")}


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]
    setup: Setup = _migrated
    status: int = 2
    says: str = "error: "
    extra: dict[str, str] = field(default_factory=dict)


CASES = [
    # The ledger database: unreachable, malformed, corrupted, read-only, unmigrated, unknown revision.
    *(
        Case(f"{name}-{command[0]}", command, setup, 2, says)
        for name, setup, says in (
            ("unreachable", _unreachable, "the ledger database cannot be used"),
            ("malformed", _malformed, "the ledger database cannot be used"),
            ("unknown-driver", _unknown_driver, "the ledger database cannot be used"),
            ("corrupted", _corrupted, "the ledger database cannot be used: file is not a database"),
            ("unmigrated", _unmigrated, "not set up: run 'restore db upgrade'"),
        )
        for command in (
            ["status"],
            ["history", "dc-arl-01"],
            ["forecast"],
            ["db", "current"],
            ["report", "--html", "report.html"],
        )
        if not (name == "unmigrated" and command[0] == "db")  # saying it is not set up is its job
    ),
    Case("corrupted-upgrade", ["db", "upgrade"], _corrupted, 2, "file is not a database"),
    Case("read-only-upgrade", ["db", "upgrade"], _read_only, 2, "readonly database"),
    Case("data-dir-is-a-file", ["db", "upgrade"], _data_dir_is_a_file, 2, "error: "),
    Case("data-dir-read-only-upgrade", ["db", "upgrade"], _read_only_data_dir, 2, "error: "),
    Case("data-dir-read-only-status", ["status"], _read_only_data_dir, 2, "error: "),
    Case(
        "rehearsal-url-malformed",
        ["rehearse", "--reset"],
        _migrated,
        2,
        "the ledger database cannot be used",
        {"RESTORE_REHEARSAL_DATABASE_URL": "not a database url"},
    ),
    Case("unknown-revision", ["db", "upgrade", "nosuch"], _migrated, 2, "cannot migrate to 'nosuch'"),
    Case(
        "unmigrated-decide", ["decide", "retry", "dc-arl-01", "--actor", "ops"], _unmigrated, 2, "not set up"
    ),
    # Files and directories.
    Case("schema-bad-path", ["schema", "-o", "/proc/nonexistent/dir/schema.json"], _no_env, 2, "error: "),
    Case("report-bad-path", ["report", "--html", "/proc/nonexistent/report.html"], _migrated, 2, "error: "),
    Case("validate-alias-bomb", ["validate"], _alias_bomb, 2, "refused as an alias bomb"),
    Case("plan-alias-bomb", ["plan"], _alias_bomb, 2, "the inventory cannot be used"),
    Case("status-alias-bomb", ["status"], _alias_bomb, 2, "the inventory cannot be used"),
    Case(
        "rehearse-infinite-duration",
        ["rehearse"],
        _infinite_duration,
        2,
        "durations.wipe: Input should be a finite",
    ),
    Case(
        "forecast-infinite-duration",
        ["forecast", "--fresh"],
        _infinite_duration,
        2,
        "should be a finite number",
    ),
    Case("run-infinite-duration", ["run", "rest"], _infinite_duration, 2, "the inventory cannot be used"),
    Case("validate-missing-dir", ["validate", "nowhere"], _no_env, 2, "does not exist"),
    Case("plan-missing-dir", ["plan", "nowhere"], _no_env, 2, "does not exist"),
    Case("status-missing-inventory", ["status", "-i", "nowhere"], _migrated, 2, "does not exist"),
    Case("forecast-broken-inventory", ["forecast"], _broken_inventory, 2, "the inventory cannot be used"),
    Case("status-broken-inventory", ["status"], _broken_inventory, 2, "the inventory cannot be used"),
    Case("validate-broken-inventory", ["validate"], _broken_inventory, 2, "the inventory cannot be used"),
    # Hosts, events and decisions.
    Case("history-markup", ["history", "[/x]"], _migrated, 2, "no host named '[/x]'"),
    Case(
        "history-markup-bold", ["history", "[bold]x[/bold]"], _migrated, 2, "no host named '[bold]x[/bold]'"
    ),
    Case("history-unknown", ["history", "nope"], _migrated, 2, "no host named 'nope'"),
    Case("history-escape-sequence", ["history", "\x1b[31mx"], _migrated, 2, "no host named '\\x1b[31mx'"),
    Case(
        "decide-markup-host",
        ["decide", "retry", "[red]x[/red]", "--actor", "ops"],
        _migrated,
        2,
        "no host named '[red]x[/red]'",
    ),
    Case(
        "decide-unknown-host",
        ["decide", "retry", "nope", "--actor", "ops"],
        _migrated,
        2,
        "no host named 'nope'",
    ),
    Case(
        "decide-not-a-decision",
        ["decide", "start_wipe", "dc-arl-01", "--actor", "ops"],
        _migrated,
        2,
        "not an operator decision",
    ),
    Case(
        "decide-illegal",
        ["decide", "retry", "dc-arl-01", "--actor", "ops"],
        _migrated,
        1,
        "refused: event 'retry' is not allowed in state 'compromised'",
    ),
    Case(
        "decide-no-reason", ["decide", "hold", "dc-arl-01", "--actor", "ops"], _migrated, 1, "needs a reason"
    ),
    Case(
        "decide-no-actor",
        ["decide", "hold", "dc-arl-01", "--actor", " ", "--reason", "x"],
        _migrated,
        1,
        "must name the operator",
    ),
    Case(
        "evidence-bad-digest",
        ["evidence", "add", "dc-arl-01", "--sha256", "abc", "--location", "l", "--custodian", "c"],
        _migrated,
        1,
        "is not a SHA-256 digest",
    ),
    Case(
        "evidence-no-custodian",
        ["evidence", "add", "dc-arl-01", "--sha256", DIGEST, "--location", "l", "--custodian", " "],
        _migrated,
        1,
        "needs a storage location and a custodian",
    ),
    Case(
        "evidence-unknown-host",
        ["evidence", "add", "nope", "--sha256", DIGEST, "--location", "l", "--custodian", "c"],
        _migrated,
        2,
        "no host named 'nope'",
    ),
    # Rehearsals: refused before a server is started.
    Case("rehearse-unknown-wave", ["rehearse", "--wave", "nosuch"], _migrated, 2, "no wave named 'nosuch'"),
    Case("rehearse-negative-scale", ["rehearse", "--time-scale", "-1"], _migrated, 2, "--time-scale"),
    Case("rehearse-huge-scale", ["rehearse", "--time-scale", "1e9"], _migrated, 2, "--time-scale"),
    Case("rehearse-nan-scale", ["rehearse", "--time-scale", "nan"], _migrated, 2, "--time-scale"),
    Case("rehearse-fail-rate", ["rehearse", "--fail-rate", "2"], _migrated, 2, "--fail-rate"),
    Case("rehearse-nan-fail-rate", ["rehearse", "--fail-rate", "nan"], _migrated, 2, "--fail-rate"),
    Case("rehearse-inf-scale", ["rehearse", "--time-scale", "inf"], _migrated, 2, "--time-scale"),
    Case("rehearse-nan-noise", ["rehearse", "--duration-noise", "nan"], _migrated, 2, "--duration-noise"),
    Case("rehearse-negative-fail-rate", ["rehearse", "--fail-rate", "-0.1"], _migrated, 2, "--fail-rate"),
    Case("rehearse-noise", ["rehearse", "--duration-noise", "5"], _migrated, 2, "--duration-noise"),
    Case("rehearse-not-a-number", ["rehearse", "--time-scale", "fast"], _migrated, 2, "Invalid value"),
    Case("rehearse-broken-inventory", ["rehearse"], _broken_inventory, 2, "the inventory cannot be used"),
    Case("rehearse-missing-inventory", ["rehearse", "nowhere"], _migrated, 2, "does not exist"),
    Case("rehearse-workers-gone", ["rehearse", "--workers", "0"], _migrated, 2, "No such option"),
    # Live runs.
    Case(
        "run-unknown-wave",
        ["run", "nowhere", "--approver", "Dr. A", "--confirm", "nowhere"],
        _migrated,
        2,
        "no wave named 'nowhere'",
    ),
    Case("run-no-approver", ["run", "core"], _migrated, 2, "nothing was done: a live run needs --approver"),
    Case(
        "run-wrong-confirm",
        ["run", "core", "--approver", "Dr. A", "--confirm", "icu"],
        _migrated,
        2,
        "nothing was done",
    ),
    Case(
        "run-blank-approver",
        ["run", "core", "--approver", " ", "--confirm", "core"],
        _migrated,
        2,
        "nothing was done",
    ),
    Case(
        "run-unknown-host",
        ["run", "core", "--host", "nope", "--approver", "A", "--confirm", "core"],
        _migrated,
        2,
        "not in the chosen waves: nope",
    ),
    Case(
        "run-unknown-site",
        ["run", "core", "--site", "atlantis", "--approver", "A", "--confirm", "core"],
        _migrated,
        2,
        "no site named 'atlantis'",
    ),
    Case(
        "run-unmigrated",
        ["run", "core", "--approver", "A", "--confirm", "core"],
        _unmigrated,
        2,
        "not set up",
    ),
    # Forecast what-ifs.
    Case(
        "forecast-zero-capacity",
        ["forecast", "--fresh", "--capacity", "backup-streams=0"],
        _no_env,
        2,
        "POOL=N",
    ),
    Case("forecast-unknown-pool", ["forecast", "--fresh", "--capacity", "nosuch=3"], _no_env, 2, "POOL=N"),
    Case("forecast-no-equals", ["forecast", "--fresh", "--capacity", "backup-streams"], _no_env, 2, "POOL=N"),
    Case(
        "forecast-negative", ["forecast", "--fresh", "--capacity", "backup-streams=-3"], _no_env, 2, "POOL=N"
    ),
    Case(
        "forecast-huge",
        ["forecast", "--fresh", "--capacity", "backup-streams=99999999999"],
        _no_env,
        2,
        "POOL=N",
    ),
    Case(
        "forecast-superscript-digit",
        ["forecast", "--fresh", "--capacity", "backup-streams=\u00b2"],
        _no_env,
        2,
        "POOL=N",
    ),
    Case(
        "forecast-fullwidth-digit",
        ["forecast", "--fresh", "--capacity", "backup-streams=\uff13"],
        _no_env,
        2,
        "POOL=N",
    ),
    Case("forecast-policy", ["forecast", "--fresh", "--policy", "srm"], _no_env, 2, "unknown policy 'srm'"),
    Case("forecast-wave", ["forecast", "--fresh", "--wave", "nosuch"], _no_env, 2, "no wave named 'nosuch'"),
    # The command line itself.
    Case("log-level", ["--log-level", "loud", "status"], _migrated, 2, "unknown log level"),
    Case("unknown-command", ["restore-everything"], _no_env, 2, "No such command"),
    Case("unknown-option", ["status", "--colour"], _migrated, 2, "No such option"),
    Case("missing-argument", ["history"], _migrated, 2, "Missing argument"),
    Case("db-unknown", ["db", "drop"], _migrated, 2, "No such command"),
    # Settings from the environment.
    Case(
        "setting-not-a-number", ["status"], _migrated, 2, "RESTORE_MAX_HOSTS", {"RESTORE_MAX_HOSTS": "lots"}
    ),
    Case(
        "setting-out-of-range",
        ["rehearse"],
        _migrated,
        2,
        "RESTORE_LEASE_SECONDS",
        {"RESTORE_LEASE_SECONDS": "-1"},
    ),
    Case(
        "setting-bad-port",
        ["rehearse"],
        _migrated,
        2,
        "RESTORE_PREFECT_PORT",
        {"RESTORE_PREFECT_PORT": "99999"},
    ),
    Case("setting-max-hosts", ["validate"], _migrated, 2, "RESTORE_MAX_HOSTS", {"RESTORE_MAX_HOSTS": "100"}),
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("RESTORE_DATABASE_URL", "RESTORE_DATA_DIR", "RESTORE_REHEARSAL_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RESTORE_INVENTORY", INVENTORY)
    monkeypatch.setenv("RESTORE_DATA_DIR", str(tmp_path / "data"))
    # A server on this port would be a bug: nothing here may start one.
    monkeypatch.setenv("RESTORE_PREFECT_PORT", "9")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_a_mistake_is_answered_in_words(case: Case, clean_env: Path) -> None:
    env = case.setup(clean_env)
    result = CliRunner().invoke(app, case.args, env={**env, **case.extra})
    output = result.output
    assert result.exit_code == case.status, (result.exit_code, output, result.exception)
    assert case.says in output, output
    assert "Traceback" not in output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert not (clean_env / "data" / "prefect" / "server.json").exists()


def _contents(path: Path) -> str:
    """Every row of every table: what a read must not change (the file's bytes may, at a checkpoint)."""
    with sqlite3.connect(path) as db:
        tables = [
            r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        ]
        rows = [f"{t}: {sorted(map(repr, db.execute(f'SELECT * FROM {t}')))}" for t in tables]
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--json"],
        ["forecast"],
        ["forecast", "--json"],
        ["history", "dc-arl-01"],
        ["report", "--html", "report.html"],
        ["plan"],
    ],
    ids=" ".join,
)
def test_read_commands_write_nothing(args: list[str], clean_env: Path, tmp_path: Path) -> None:
    env = _migrated(tmp_path)
    ledger = tmp_path / "ledger.sqlite3"
    runner = CliRunner()
    # Another inventory, one host of which is in the ledger: reading with it enrolls and retires nothing.
    assert runner.invoke(app, ["db", "sync"], env=env).exit_code == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "estate.yaml").write_text(
        "waves: [{name: rest, services: ['*']}]\nsites: [{name: x, kind: hospital}]\n"
        "roles: [{name: r, kind: server}]\n"
        "hosts: [{name: dc-arl-01, role: r, site: x}, {name: new-01, role: r, site: x}]\n"
    )
    before = _contents(ledger)
    where = {
        "status": ["-i", str(other)],
        "forecast": [str(other)],
        "history": [],
        "report": ["-i", str(other)],
        "plan": [str(other)],
    }[args[0]]
    result = runner.invoke(app, [*args, *where], env=env)
    assert result.exit_code == 0, result.output
    assert _contents(ledger) == before
