"""Full rehearsal of the sample estate as one campaign: through a real Prefect server, and bypassed.

(a) every wave of the sample estate (1,700 hosts), zero-duration stages, through the restore-estate
    flow against a real local Prefect server (tuned batching): one task run per stage;
(b) the same campaign runner on plain threads, no Prefect;
then the ratio (a)/(b), and the size of the flow run's graph (task runs), which the UI draws up to
10,000 nodes. How long the restore itself would take is ``benchmarks/schedule.py``'s subject.

    .venv/bin/python benchmarks/rehearsal.py [--inventory inventory]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import httpx

from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.execution.campaign import Automatic, CampaignSettings, Selection, run_campaign
from restore_flows.flows.server import client_settings, running_server
from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import Plan, plan
from restore_flows.scheduling.runner import Retries


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bypass(the_plan: Plan, scratch: Path) -> float:
    engine = make_engine(f"sqlite:///{scratch / 'bypass.sqlite3'}")
    upgrade(engine)
    ledger = Ledger(engine)
    ledger.sync_inventory(the_plan.estate, the_plan)
    started = time.perf_counter()
    _, summary = run_campaign(
        ledger,
        the_plan,
        SimulatedFleet(),
        Selection(),
        mode="rehearsal",
        actor="bench",
        approver=Automatic(),
        settings=CampaignSettings(retries=Retries(backoff_minutes=(0.0,))),
    )
    elapsed = time.perf_counter() - started
    assert summary.ok
    engine.dispose()
    return elapsed


def through_prefect(inventory: Path, scratch: Path) -> tuple[float, float, int]:
    """Returns (server start seconds, rehearsal seconds, task runs of the flow run)."""
    with running_server(scratch / "prefect", port=_port()) as server:
        os.environ.update(client_settings(server.api_url, server.home))
        os.environ["RESTORE_INVENTORY"] = str(inventory)
        os.environ["RESTORE_DATA_DIR"] = str(scratch / "data")
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
        from restore_flows.flows.restore import EstateParameters, restore_estate

        started = time.perf_counter()
        state = restore_estate(EstateParameters(), return_state=True)
        elapsed = time.perf_counter() - started
        assert state.is_completed(), state.message
        flow_run_id = state.state_details.flow_run_id
        assert flow_run_id is not None
        nodes = 0
        deadline = time.monotonic() + 120
        query = {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}}
        with httpx.Client(base_url=server.api_url, timeout=30) as http:
            # The server records task runs from their events, a moment after they ran: count until stable.
            while time.monotonic() < deadline:
                counted = int(http.post("/task_runs/count", json=query).json())
                if counted == nodes and nodes:
                    break
                nodes = counted
                time.sleep(2)
        return server.started_in, elapsed, nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inventory", type=Path, default=Path("inventory"))
    args = parser.parse_args()
    the_plan = plan(load_estate(args.inventory))
    hosts = len(the_plan.hosts)
    with tempfile.TemporaryDirectory(prefix="restore-rehearsal-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        b = bypass(the_plan, scratch)
        print(f"(b) campaign runner on threads, Prefect bypassed: {hosts:,} hosts in {b:.1f} s", flush=True)
        # Last: once a flow has run in this process, Prefect's log shipping expects the server.
        start, a, nodes = through_prefect(args.inventory.resolve(), scratch)
        print(
            f"(a) through a real Prefect server:                {hosts:,} hosts in {a:.1f} s "
            f"(server start {start:.0f} s, not counted)"
        )
        print(
            f"ratio (a)/(b): {a / b:.2f}; the campaign's flow run has {nodes:,} task runs (UI limit 10,000)"
        )


if __name__ == "__main__":
    main()
