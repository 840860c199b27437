"""Fixtures for the campaign runner: a migrated SQLite ledger with a small estate enrolled, and a run
on threads."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from restore_flows.drivers.base import Fleet
from restore_flows.execution.campaign import (
    Approver,
    Automatic,
    CampaignSettings,
    HostProgress,
    Named,
    RunSummary,
    Selection,
    run_campaign,
)
from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan, plan
from restore_flows.scheduling.runner import Retries
from tests.conftest import WriteInventory

SMALL = """
waves:
  - {name: core, services: [identity]}
  - {name: icu, services: [icu]}
  - {name: rest, services: ["*"]}
sites:
  - {name: arl, kind: hospital}
pools:
  - {name: imaging-arl, capacity: 2}
roles:
  - {name: dc, kind: server, services: [identity]}
  - {name: gw, kind: server, services: [icu], depends_on: [dc-01]}
  - {name: db, kind: server, services: [icu], restore_method: backup, depends_on: [dc-01]}
  - name: ws
    kind: workstation
    services: [icu]
    depends_on: [gw-01, db-01]
    pools: {reimage: [imaging-arl], wipe: [imaging-arl]}
hosts:
  - {name: dc-01, role: dc, site: arl, forensic_hold: true}
  - {name: gw-01, role: gw, site: arl}
  - {name: db-01, role: db, site: arl}
  - {name: gw-02, role: gw, site: arl}
groups:
  - defaults: {role: ws, site: arl}
    hosts:
      - name: ws-[01:06]
      - {name: ws-07, depends_on: [gw-02]}
"""


class Clock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 29, 8, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def small_plan(write_inventory: WriteInventory) -> Plan:
    return plan(load_estate(write_inventory(estate=SMALL)))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(engine: Engine, small_plan: Plan, clock: Clock) -> Ledger:
    ledger = Ledger(engine, clock=clock)
    ledger.sync_inventory(small_plan.estate, small_plan)
    return ledger


# pace 0: planned minutes take no real time (a procedure step's 10 h wait included), as on a zero-time fleet.
FAST = CampaignSettings(retries=Retries(backoff_minutes=(0.0,)), poll_seconds=0.02, pace=0.0)


def run_threads(
    ledger: Ledger,
    the_plan: Plan,
    fleet: Fleet,
    *waves: str,
    hosts: tuple[str, ...] = (),
    sites: tuple[str, ...] = (),
    mode: str = "rehearsal",
    approver: Approver | str | None = None,
    settings: CampaignSettings = FAST,
    on_change: Callable[[HostProgress], None] = lambda progress: None,
) -> tuple[str, RunSummary]:
    """A campaign over ``waves`` (default: all) on threads, approved automatically unless told."""
    chosen: Approver = (
        Automatic() if approver is None else Named(approver) if isinstance(approver, str) else approver
    )
    return run_campaign(
        ledger,
        the_plan,
        fleet,
        Selection(tuple(waves), sites, hosts),
        mode=mode,
        actor="test",
        approver=chosen,
        settings=settings,
        on_change=on_change,
    )
