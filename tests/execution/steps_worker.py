"""A campaign in a process of its own, for the kill -9 tests of procedure steps (not a test module).

    python tests/execution/steps_worker.py INVENTORY LEDGER_URL TIME_SCALE PACE

Runs every wave of INVENTORY on the simulated fleet (each planned minute takes TIME_SCALE real
seconds x 60), with waits between steps scaled by PACE, into the ledger at LEDGER_URL, approved
automatically; prints one line with the run's outcome at the end. The tests kill it mid-run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.execution.campaign import Automatic, CampaignSettings, Selection, run_campaign
from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import make_engine
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import plan
from restore_flows.scheduling.runner import Retries


def main(inventory: str, url: str, time_scale: str, pace: str) -> None:
    the_plan = plan(load_estate(Path(inventory)))
    ledger = Ledger(make_engine(url))
    ledger.sync_inventory(the_plan.estate, the_plan)
    settings = CampaignSettings(
        retries=Retries(backoff_minutes=(0.0,)), poll_seconds=0.05, heartbeat_seconds=0.5, pace=float(pace)
    )
    run_id, summary = run_campaign(
        ledger,
        the_plan,
        SimulatedFleet(time_scale=float(time_scale)),
        Selection(),
        mode="rehearsal",
        actor="steps-worker",
        approver=Automatic(),
        settings=settings,
    )
    print(run_id, "ok" if summary.ok else "not complete", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
