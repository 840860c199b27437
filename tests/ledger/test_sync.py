"""Re-syncing the inventory: new hosts enrolled, removed ones retired (never deleted), renames reported."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.records import SyncReport
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import plan
from restore_flows.states import HostState
from tests.conftest import WriteInventory

BASE = """
waves:
  - {name: core, services: [identity]}
  - {name: rest, services: ["*"]}
sites:
  - {name: arl, kind: hospital}
roles:
  - {name: dc, kind: server, services: [identity]}
  - {name: fs, kind: server, services: [files]}
"""


def _sync(ledger: Ledger, directory: Path) -> SyncReport:
    estate = load_estate(directory)
    return ledger.sync_inventory(estate, plan(estate))


def test_added_removed_renamed(engine: Engine, write_inventory: WriteInventory) -> None:
    ledger = Ledger(engine)
    first = write_inventory(
        base=BASE,
        hosts="""
        hosts:
          - {name: dc-01, role: dc, site: arl}
          - {name: fs-01, role: fs, site: arl}
          - {name: fs-02, role: fs, site: arl}
        """,
    )
    report = _sync(ledger, first)
    assert report.enrolled == ("dc-01", "fs-01", "fs-02")
    # A second sync of the same inventory changes nothing.
    again = _sync(ledger, first)
    assert (again.enrolled, again.retired, again.updated) == ((), (), ())

    second = write_inventory(
        base=BASE,
        hosts="""
        hosts:
          - {name: dc-01, role: fs, site: arl}
          - {name: fs-01, role: fs, site: arl}
          - {name: dc-02, role: dc, site: arl}
        """,
    )
    report = _sync(ledger, second)
    assert report.enrolled == ("dc-02",)
    assert report.retired == ("fs-02",)
    assert report.updated == ("dc-01",)
    assert report.possible_renames == ()
    retired = ledger.host("fs-02")
    assert retired.retired
    assert [h.name for h in ledger.hosts()] == ["dc-01", "dc-02", "fs-01"]
    assert "fs-02" in [h.name for h in ledger.hosts(include_retired=True)]
    assert ledger.history("fs-02").transitions[0].event == "enroll"
    assert ledger.host("dc-01").role == "fs"

    third = write_inventory(
        base=BASE,
        hosts="""
        hosts:
          - {name: dc-01, role: fs, site: arl}
          - {name: fs-01-new, role: fs, site: arl}
          - {name: dc-02, role: dc, site: arl}
          - {name: fs-02, role: fs, site: arl}
        """,
    )
    report = _sync(ledger, third)
    assert report.returned == ("fs-02",)
    assert report.possible_renames == (("fs-01", "fs-01-new"),)
    # Reported, never merged: both exist, the new one starts compromised, the old one is retired.
    assert ledger.host("fs-01").retired
    assert ledger.host("fs-01-new").state is HostState.COMPROMISED
    assert not ledger.host("fs-02").retired
