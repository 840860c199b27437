"""The ledger commands as an operator runs them: db upgrade, status, history, evidence add, decide."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from restore_flows.cli import app
from restore_flows.ledger.db import head_revision

INVENTORY = str(Path(__file__).resolve().parents[2] / "inventory")
DIGEST = "ab" * 32


@pytest.fixture
def restore(ledger_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.setenv("RESTORE_DATABASE_URL", ledger_url)
    monkeypatch.setenv("RESTORE_INVENTORY", INVENTORY)
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def _run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(app, list(args))


def test_commands_refuse_an_unmigrated_database(restore: CliRunner) -> None:
    result = _run(restore, "status")
    assert result.exit_code == 2
    assert "not set up: run 'restore db upgrade'" in result.stderr
    assert "Traceback" not in result.output


def test_status_history_evidence_decide(restore: CliRunner) -> None:
    result = _run(restore, "db", "upgrade")
    assert result.exit_code == 0, result.output
    assert f"-> {head_revision()}" in result.stdout

    result = _run(restore, "status", "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["estate"]["total"] == 1700
    assert status["hosts"]["dc-arl-01"]["state"] == "compromised"
    assert status["hosts"]["dc-arl-01"]["wave"] == "core"
    assert list(status["waves"])[:4] == ["core", "icu", "lab", "radiology"]
    assert status["waves"]["icu"]["total"] == sum(1 for h in status["hosts"].values() if h["wave"] == "icu")
    assert status["waves"]["icu"]["percent"] == 0.0
    # Nothing observed yet: the forecast runs on the plan's own durations, as 'forecast --fresh' does.
    fresh = json.loads(_run(restore, "forecast", "--fresh", "--json").stdout)
    assert status["waves"]["icu"]["eta_minutes"] == fresh["waves"]["icu"]["finish_minutes"]
    assert status["estate"]["eta_minutes"] == fresh["makespan_minutes"]
    # A read command writes nothing: the hosts are counted, not enrolled.
    assert "1,700 host(s) of the inventory are not in the ledger yet" in result.stderr

    result = _run(restore, "forecast")
    assert result.exit_code == 0, result.output
    assert "Forecast (campaign): every chosen host back in" in result.stdout
    assert "icu" in result.stdout

    result = _run(restore, "status")
    assert result.exit_code == 0
    assert "0.0% online: 0 of 1,700 hosts" in result.stdout

    result = _run(
        restore,
        "evidence",
        "add",
        "dc-arl-01",
        "--sha256",
        DIGEST,
        "--location",
        "locker 3",
        "--custodian",
        "Insp. Meyer",
    )
    assert result.exit_code == 0, result.output
    assert "(now evidence_captured)" in result.stdout

    result = _run(restore, "decide", "hold", "dc-arl-01", "--actor", "ops")
    assert result.exit_code == 1
    assert "needs a reason" in result.stderr

    result = _run(restore, "decide", "hold", "dc-arl-01", "--actor", "ops", "--reason", "police")
    assert result.exit_code == 0, result.output

    # A host on hold will not come back without an operator: the forecast says so, and what it blocks.
    held = json.loads(_run(restore, "forecast", "--json").stdout)
    assert held["makespan_minutes"] is None
    assert held["waves"]["core"]["finish_minutes"] is None
    assert held["waves"]["core"]["will_not_finish"]["dc-arl-01"] == "is on_hold"

    result = _run(restore, "decide", "start_wipe", "dc-arl-01", "--actor", "ops")
    assert result.exit_code == 2
    assert "not an operator decision" in result.stderr

    result = _run(restore, "history", "dc-arl-01", "--json")
    assert result.exit_code == 0, result.output
    history = json.loads(result.stdout)
    assert history["host"] == "dc-arl-01"
    assert history["state"] == "on_hold"
    assert [(t["from"], t["event"], t["to"], t["actor"]) for t in history["transitions"]] == [
        (None, "enroll", "compromised", "inventory"),
        ("compromised", "evidence_captured", "evidence_captured", "Insp. Meyer"),
        ("evidence_captured", "hold", "on_hold", "ops"),
    ]
    assert all(t["at"].endswith("Z") and t["at"].startswith("20") for t in history["transitions"])
    assert history["evidence"][0]["sha256"] == DIGEST

    result = _run(restore, "history", "dc-arl-01")
    assert result.exit_code == 0
    assert "on_hold" in result.stdout

    result = _run(restore, "history", "nope")
    assert result.exit_code == 2
    assert "no host named 'nope'" in result.stderr


def test_a_live_run_shows_what_it_would_wipe_and_needs_a_named_approver(restore: CliRunner) -> None:
    assert _run(restore, "db", "upgrade").exit_code == 0
    for extra in (
        [],
        ["--approver", "Dr. Ada Osei"],
        ["--approver", " ", "--confirm", "core"],
        ["--approver", "Dr. Ada Osei", "--confirm", "icu"],
    ):
        result = _run(restore, "run", "core", *extra)
        assert result.exit_code == 2, extra
        assert "host(s) will be wiped and rebuilt" in result.stdout
        assert "nothing was done: a live run needs --approver" in result.stderr
    result = _run(restore, "run", "nowhere", "--approver", "Dr. Ada Osei", "--confirm", "nowhere")
    assert result.exit_code == 2
    assert "no wave named 'nowhere'" in result.stderr
    result = _run(restore, "history", "dc-arl-01", "--json")
    assert [t["event"] for t in json.loads(result.stdout)["transitions"]] == ["enroll"]


def test_forecast_what_ifs_and_their_mistakes(restore: CliRunner) -> None:
    fresh = json.loads(_run(restore, "forecast", "--fresh", "--json").stdout)
    assert fresh["policy"] == "campaign"
    assert fresh["makespan_minutes"] >= fresh["bound_minutes"] > 0
    assert all(w["finish_minutes"] >= w["bound_minutes"] for w in fresh["waves"].values())
    barrier = json.loads(_run(restore, "forecast", "--fresh", "--json", "--policy", "barrier").stdout)
    assert barrier["makespan_minutes"] > fresh["makespan_minutes"]
    wider = json.loads(
        _run(restore, "forecast", "--fresh", "--json", "--capacity", "backup-streams=12").stdout
    )
    assert wider["makespan_minutes"] < fresh["makespan_minutes"]
    some = json.loads(_run(restore, "forecast", "--fresh", "--json", "-w", "core", "-w", "icu").stdout)
    assert list(some["waves"]) == ["core", "icu"]
    for bad, message in (
        (["--capacity", "backup-streams=0"], "expected POOL=N"),
        (["--capacity", "nosuch=3"], "expected POOL=N"),
        (["--policy", "srm"], "unknown policy 'srm'"),
        (["--wave", "nosuch"], "no wave named 'nosuch'"),
    ):
        result = _run(restore, "forecast", "--fresh", *bad)
        assert result.exit_code == 2, bad
        assert message in result.stderr, result.stderr
