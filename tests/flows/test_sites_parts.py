"""The site mode's parts without a server: the stage result through a flow run's state message, what
a site's worker status says, and what a worker refuses before touching the ledger."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from restore_flows.execution.stages import StageResult
from restore_flows.flows.sites import (
    SITES_ENV,
    SiteStatus,
    StageParameters,
    decode,
    encode,
    run_stage_here,
    shown_url,
    sites_of_worker,
)
from restore_flows.inventory.models import Stage
from restore_flows.settings import Settings
from restore_flows.states import HostState
from tests.conftest import WriteInventory

ESTATE = """
waves:
  - {name: rest, services: ["*"]}
sites:
  - {name: arl, kind: hospital}
  - {name: bas, kind: hospital}
roles:
  - {name: ws, kind: workstation, services: [clinical]}
hosts:
  - {name: ws-arl-1, role: ws, site: arl}
"""


@pytest.mark.parametrize(
    "result",
    [
        StageResult("ws-1", HostState.WIPED),
        StageResult("ws-1", HostState.WIPE_FAILED, "disk busy", retryable=True),
        StageResult("ws-1", None, held_by="waiting: host ws-1 is held by run r2"),
        StageResult("ws-1", HostState.WIPING, "ledger refused: no | result= here", gave_up=True),
    ],
)
def test_a_stage_result_survives_the_state_message(result: StageResult) -> None:
    assert decode("wipe ws-1: whatever | result=" + encode(result)) == result


@pytest.mark.parametrize(
    "message", [None, "", "Crashed by the worker", "x | result={not json", "x | result={}"]
)
def test_a_message_without_a_result_is_none(message: str | None) -> None:
    assert decode(message) is None


def test_a_site_is_up_while_its_worker_was_heard_from_recently() -> None:
    now = dt.datetime(2026, 12, 1, 3, 45, tzinfo=dt.UTC)
    heard = SiteStatus("arl", now - dt.timedelta(seconds=10), silent_seconds=30)
    silent = SiteStatus("arl", now - dt.timedelta(seconds=31), silent_seconds=30)
    never = SiteStatus("arl", None, silent_seconds=30)
    assert heard.up(now)
    assert not silent.up(now)
    assert not never.up(now)
    since = (now - dt.timedelta(seconds=31)).astimezone().strftime("%H:%M")
    assert silent.why() == f"site arl: no worker since {since}"
    assert "no worker yet" in never.why()


def test_a_worker_name_says_its_sites() -> None:
    assert sites_of_worker("arl@vm-01") == ["arl"]
    assert sites_of_worker("arl+bas@vm-01") == ["arl", "bas"]
    assert sites_of_worker("some-worker") == []


def test_a_stage_never_carries_a_password() -> None:
    assert "s3cret" not in shown_url("postgresql+psycopg://restore:s3cret@db.example:5432/ledger")


def _params(**changes: object) -> StageParameters:
    fields: dict[str, object] = {
        "host": "ws-arl-1",
        "stage": Stage.WIPE,
        "site": "arl",
        "run_id": "r1",
        "ledger": "sqlite:///elsewhere.sqlite3",
    }
    fields.update(changes)
    return StageParameters.model_validate(fields)


def test_a_worker_refuses_a_stage_for_another_ledger(tmp_path: Path, write_inventory: WriteInventory) -> None:
    settings = Settings(inventory=write_inventory(estate=ESTATE), data_dir=tmp_path)
    result = run_stage_here(_params(), settings, "arl@vm")
    assert result.gave_up
    assert result.state is None
    assert "refused" in (result.error or "")
    assert not (tmp_path / "rehearsal.sqlite3").exists()  # the ledger was not even opened


def test_a_worker_refuses_a_stage_of_another_site(
    tmp_path: Path, write_inventory: WriteInventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(inventory=write_inventory(estate=ESTATE), data_dir=tmp_path)
    ledger = shown_url(settings.ledger_url(rehearsal=True))
    monkeypatch.setenv(SITES_ENV, "bas")
    result = run_stage_here(_params(ledger=ledger), settings, "bas@vm")
    assert result.gave_up
    assert result.error == "a worker of bas got a stage of site arl"
    monkeypatch.setenv(SITES_ENV, "arl")
    result = run_stage_here(_params(ledger=ledger, site="arl", host="ws-bas-9"), settings, "arl@vm")
    assert result.gave_up
    assert result.error == "ws-bas-9 is not a host of site arl here"
    assert not (tmp_path / "rehearsal.sqlite3").exists()
