"""Small estates in known states, for the overview, the report and the dashboard.

Two sites, three waves. ``troubled``: a run finished with a failed gateway (its error hostile HTML),
the workstations behind it blocked, an office PC on hold (a hostile reason), a named approver whose
name is hostile too, evidence captured by the run and registered by hand (a hostile location).
``Paused``: a run held inside the Arlon gateway's verification, its workstations waiting for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from restore_flows.drivers.base import DriverError, Verification
from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.execution.campaign import RunSummary
from restore_flows.inventory.estate import Host
from restore_flows.inventory.loader import load_estate
from restore_flows.inventory.models import Stage
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan, plan
from restore_flows.states import Event
from tests.execution.conftest import run_threads

ESTATE = """
waves:
  - {name: core, services: [identity]}
  - {name: icu, services: [icu]}
  - {name: rest, services: ["*"]}
sites:
  - {name: arl, kind: hospital}
  - {name: brg, kind: hospital}
pools:
  - {name: imaging, capacity: 4}
roles:
  - {name: dc, kind: server, department: infrastructure, services: [identity]}
  - {name: gw, kind: server, department: icu, services: [icu], depends_on: [dc-01]}
  - name: icu-ws
    kind: workstation
    department: icu
    services: [icu]
    depends_on: ["gw-{site}"]
    pools: {reimage: [imaging]}
  - {name: office, kind: workstation, department: admin, services: [office], depends_on: [dc-01]}
hosts:
  - {name: dc-01, role: dc, site: arl, forensic_hold: true}
  - {name: gw-arl, role: gw, site: arl}
  - {name: gw-brg, role: gw, site: brg}
groups:
  - defaults: {role: icu-ws, site: arl}
    hosts:
      - name: ws-arl-[01:03]
  - defaults: {role: icu-ws, site: brg}
    hosts:
      - name: ws-brg-[01:03]
  - defaults: {role: office, site: brg}
    hosts:
      - name: pc-brg-[01:02]
"""

HOSTILE_ERROR = "<script>alert('gw')</script> disk & controller said \"no\""
HOSTILE_REASON = "vendor <b>RMA</b> & <img src=x onerror=alert(1)>"
HOSTILE_APPROVER = 'Dr. <i>A.</i> "Osei" & co'
HOSTILE_LOCATION = "<a href='https://evil.example/'>vault</a> shelf 3"
EVIDENCE_DIGEST = "ab" * 32


class TroubledFleet(SimulatedFleet):
    """The simulated fleet, with gw-brg's reimage failing for good with an error full of HTML."""

    def reimage(self, host: Host) -> None:
        if host.name == "gw-brg":
            raise DriverError(host.name, Stage.REIMAGE, HOSTILE_ERROR, retryable=False)
        super().reimage(host)


class PausedFleet(SimulatedFleet):
    """Holds gw-arl's verification until ``go`` is set: its workstations wait for it meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = threading.Event()
        self.go = threading.Event()

    def verify(self, host: Host) -> Verification:
        if host.name == "gw-arl":
            self.inside.set()
            assert self.go.wait(60), "the test never let the gateway's verification finish"
        return super().verify(host)


@dataclass
class Scenario:
    plan: Plan
    ledger: Ledger
    engine: Engine
    url: str
    inventory: Path


def new_ledger(tmp_path: Path, write_inventory: Callable[..., Path], name: str = "ledger") -> Scenario:
    engine = make_engine(f"sqlite:///{tmp_path / f'{name}.sqlite3'}")
    upgrade(engine)
    return on_engine(engine, write_inventory)


def on_engine(engine: Engine, write_inventory: Callable[..., Path]) -> Scenario:
    """The estate enrolled in the (migrated) ledger database of ``engine``."""
    inventory = write_inventory(estate=ESTATE)
    the_plan = plan(load_estate(inventory))
    url = engine.url.render_as_string(hide_password=False)
    ledger = Ledger(engine)
    ledger.sync_inventory(the_plan.estate, the_plan)
    return Scenario(the_plan, ledger, engine, url, inventory)


def troubled(scenario: Scenario) -> RunSummary:
    ledger = scenario.ledger
    ledger.operator_event("pc-brg-02", Event.HOLD, actor="ops <night>", reason=HOSTILE_REASON)
    _run_id, summary = run_threads(ledger, scenario.plan, TroubledFleet(), approver=HOSTILE_APPROVER)
    ledger.add_evidence("gw-brg", EVIDENCE_DIGEST, HOSTILE_LOCATION, "CERT <team>")
    # An automatic approval too, as a rehearsal records it.
    run = ledger.start_run("rehearsal", "rest", "test")
    ledger.record_approval(run, "rest", ["pc-brg-01"], "automatic (rehearsal)", "shown", automatic=True)
    ledger.finish_run(run, "done")
    return summary
