"""Small estates written as inventories, planned; the scheduler and the forecast read them as data."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from restore_flows.inventory.loader import load_estate
from restore_flows.planning import Plan, plan
from tests.conftest import WriteInventory

PlanOf = Callable[[str], Plan]


@pytest.fixture
def plan_of(write_inventory: WriteInventory) -> PlanOf:
    def make(text: str) -> Plan:
        return plan(load_estate(write_inventory(estate=text)))

    return make


# Two waves, one imaging slot; the DC is a backup restore (60 min), workstations reimage (10 + 25).
ESTATE = """
waves:
  - {name: core, services: [identity]}
  - {name: icu, services: [icu]}
  - {name: radiology, services: [radiology]}
sites:
  - {name: arl, kind: hospital}
pools:
  - {name: imaging, capacity: 1}
  - {name: backup, capacity: 1}
roles:
  - {name: dc, kind: server, services: [identity], restore_method: backup, pools: {restore: [backup]}}
  - name: icu-ws
    kind: workstation
    services: [icu]
    depends_on: [dc-icu]
    pools: {reimage: [imaging]}
  - name: rad-ws
    kind: workstation
    services: [radiology]
    depends_on: [dc-rad]
    pools: {reimage: [imaging]}
hosts:
  - {name: dc-icu, role: dc, site: arl}
  - {name: dc-rad, role: dc, site: arl}
  - {name: ws-icu-01, role: icu-ws, site: arl}
  - {name: ws-rad-01, role: rad-ws, site: arl}
"""
