"""The site mode at scale: plan and forecast of an estate 10x the sample, and a zero-duration rehearsal
through Prefect with a flow run per site, against today's single process.

1. A generated estate 10x the sample (17,000 hosts, regrouped into 60 sites): plan (< 3 s target) and
   forecast of the campaign (< 10 s target).
2. A zero-duration rehearsal of an estate of SITES x HOSTS workstations (no dependencies between
   them; 60 x 284 = 17,040 by default), through one real Prefect server on PostgreSQL with the
   ledger on PostgreSQL:
   (a) today's one process: the restore-estate flow here, each stage a task run of its one flow run;
   (b) the site mode: ``restore worker`` processes (each for SITES_PER_WORKER sites), one session
       flow run per site on its worker, each stage a task run of its site's session, scheduled by one
       campaign here.
   Wall time, stages (task runs) per second, and the largest flow run's node count (the UI draws up
   to 10,000).

    .venv/bin/python benchmarks/sites.py [--sites 60] [--hosts 284] [--sites-per-worker 10]
        [--skip-one-flow] [--skip-rehearsal]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
from estates import copies
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url

from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.execution.campaign import Automatic, CampaignSettings, Selection, Status, run_campaign
from restore_flows.flows.server import client_settings, running_server, stop_process_group
from restore_flows.inventory.estate import Estate
from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.ledger.tables import StageOrderRow
from restore_flows.planning import Plan, plan
from restore_flows.scheduling.forecast import forecast
from restore_flows.scheduling.runner import Retries

POSTGRES = os.environ.get("RESTORE_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def regrouped(estate: Estate, sites: int) -> Estate:
    """The same hosts and pools, their sites folded into ``sites`` sites (round robin by name)."""
    names = sorted(estate.sites)
    target = {name: names[i % sites] for i, name in enumerate(names)}
    kept = {name: estate.sites[name] for name in names[:sites]}
    hosts = {n: replace(h, site=target[h.site]) for n, h in estate.hosts.items()}
    return replace(estate, sites=kept, hosts=hosts)


def scale(inventory: Path) -> None:
    sample = load_estate(inventory)
    estate = regrouped(copies(sample, 10), 60)
    started = time.perf_counter()
    the_plan = plan(estate)
    planned = time.perf_counter() - started
    started = time.perf_counter()
    result = forecast(the_plan)
    forecasted = time.perf_counter() - started
    print(
        f"(1) {len(estate.hosts):,} hosts, {len(estate.sites)} sites: plan {planned:.2f} s (target < 3), "
        f"forecast {forecasted:.2f} s (target < 10; campaign {(result.makespan_minutes or 0) / 60:.1f} h)",
        flush=True,
    )


ESTATE = """
waves:
  - {{name: core, services: [identity]}}
  - {{name: rest, services: ["*"]}}
sites:
{sites}
roles:
  - {{name: ws, kind: workstation, services: [clinical]}}
groups:
{groups}
"""


def small_inventory(directory: Path, sites: int, hosts: int) -> list[str]:
    names = [f"s{i:02d}" for i in range(sites)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "estate.yaml").write_text(
        ESTATE.format(
            sites="\n".join(f"  - {{name: {s}, kind: hospital}}" for s in names),
            groups="\n".join(
                f'  - defaults: {{role: ws, site: {s}}}\n    hosts: [{{name: "ws-{s}-[1:{hosts}]"}}]'
                for s in names
            ),
        )
    )
    return names


def _database(name: str) -> tuple[str, str]:
    """A fresh PostgreSQL database: (psycopg URL, asyncpg URL)."""
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as db:
        db.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(POSTGRES).set(database=name)
    return (
        url.render_as_string(hide_password=False),
        url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False),
    )


def _drop(*names: str) -> None:
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as db:
        for name in names:
            db.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _largest(api_url: str, flow_run_ids: list[str]) -> int:
    """Task runs of the largest of these flow runs, once the server has recorded them all (it records
    them from events, a moment after the flow run ends)."""
    with httpx.Client(base_url=api_url, timeout=60) as http:
        counts: dict[str, int] = {}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            now = {
                run: int(http.post("/task_runs/count", json={"flow_runs": {"id": {"any_": [run]}}}).json())
                for run in flow_run_ids
            }
            if now == counts:
                break
            counts = now
            time.sleep(3)
    return max(counts.values(), default=0)


def one_flow(stages: int, api_url: str) -> float:
    """(a) today: the restore-estate flow in this process, each stage a task run of its flow run."""
    from restore_flows.flows.restore import EstateParameters, restore_estate

    started = time.perf_counter()
    state = restore_estate(EstateParameters(), return_state=True)
    elapsed = time.perf_counter() - started
    assert state.is_completed(), state.message
    nodes = _largest(api_url, [str(state.state_details.flow_run_id)])
    print(
        f"(2a) one flow, a task run per stage: {stages} stages in {elapsed:.1f} s = "
        f"{stages / elapsed:.1f} stages/s; its flow run: {nodes} task runs",
        flush=True,
    )
    return elapsed


def start_workers(
    names: list[str], env: dict[str, str], logs: Path, per_worker: int
) -> list[subprocess.Popen[bytes]]:
    """``restore worker`` processes, each for ``per_worker`` sites, returned once every site's worker
    has sent a heartbeat."""
    from prefect.client.orchestration import get_client

    from restore_flows.flows.sites import POOL, prepare_sites, sites_of_worker

    with get_client(sync_client=True) as client:
        prepare_sites(client, names)
    logs.mkdir()
    began = time.time()
    workers = []
    for at in range(0, len(names), per_worker):
        sites = names[at : at + per_worker]
        with open(logs / f"{sites[0]}.log", "ab") as log:
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "restore_flows", "worker", *sites, "--limit", str(len(sites) + 2)],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    deadline = time.monotonic() + 180
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            heard = {
                site
                for w in client.read_workers_for_work_pool(POOL)
                if w.last_heartbeat_time and w.last_heartbeat_time.timestamp() > began
                for site in sites_of_worker(w.name)
            }
            if heard >= set(names):
                return workers
            time.sleep(1)
    raise SystemExit("the site workers did not start within 180 s")


def per_site(the_plan: Plan, names: list[str], ledger_url: str, api_url: str) -> float:
    """(b) the site mode: one campaign here, each stage a task run of its site's session flow run."""
    from restore_flows.flows.sites import SiteExecutor

    engine = make_engine(ledger_url, pool_size=8, max_overflow=0)  # 100 connections: see rehearsal()
    upgrade(engine)
    ledger = Ledger(engine)
    ledger.sync_inventory(the_plan.estate, the_plan)
    # No worker is stopped here: one whose heartbeats a busy server records late is not lost.
    executor = SiteExecutor(ledger, ledger_url, rehearsal=True, silent_seconds=300, poll_seconds=0.25)
    executor.open(names)
    started = time.perf_counter()
    _, summary = run_campaign(
        ledger,
        the_plan,
        SimulatedFleet(),
        Selection(),
        mode="rehearsal",
        actor="bench",
        approver=Automatic(),
        settings=CampaignSettings(poll_seconds=0.25, retries=Retries(backoff_minutes=(0.0,))),
        executor=executor,
    )
    elapsed = time.perf_counter() - started
    ended = dt.datetime.now(dt.UTC)
    if not summary.ok:
        left = [p for p in summary.hosts.values() if p.status is not Status.ONLINE]
        statuses = Counter(p.status.value for p in left)
        print(f"(2b) after {elapsed:.1f} s, {len(left)} host(s) not online: {dict(statuses)}", flush=True)
        for p in left[:5]:
            print(f"     {p.host}: {p.status} {p.state} {p.error or p.reason}")
        raise SystemExit(1)
    sessions = [str(s) for s in executor.sessions]
    nodes = _largest(api_url, sessions)
    print(
        f"(2b) a worker per site, a session flow run per site: {executor.submitted} stages in "
        f"{elapsed:.1f} s = {executor.submitted / elapsed:.1f} stages/s; {len(sessions)} session flow "
        f"runs, the largest {nodes} task runs",
        flush=True,
    )
    _steady(api_url, sessions, engine, ended - dt.timedelta(seconds=elapsed), ended)
    engine.dispose()
    return elapsed


def _steady(
    api_url: str, sessions: list[str], engine: Engine, began: dt.datetime, ended: dt.datetime
) -> None:
    """Where (2b)'s time went: until the last session flow run was running (a process each on its
    worker, started one after another), then the stages per second once every site had its session."""
    with httpx.Client(base_url=api_url, timeout=60) as http:
        runs = http.post("/flow_runs/filter", json={"flow_runs": {"id": {"any_": sessions}}}).json()
    starts = [dt.datetime.fromisoformat(r["start_time"]) for r in runs if r.get("start_time")]
    if len(starts) < len(sessions):
        print(f"     sessions: {len(starts)} of {len(sessions)} have a start time on the server", flush=True)
        return
    last = max(starts)
    with engine.connect() as db:
        after = db.execute(
            select(func.count()).select_from(StageOrderRow).where(StageOrderRow.updated_at >= last)
        ).scalar_one()
    steady = (ended - last).total_seconds()
    print(
        f"     sessions: the first running after {(min(starts) - began).total_seconds():.1f} s, the last "
        f"after {(last - began).total_seconds():.1f} s; from then {after} stages in {steady:.1f} s = "
        f"{after / max(steady, 1e-9):.1f} stages/s",
        flush=True,
    )


def rehearsal(sites: int, hosts: int, per_worker: int, scratch: Path, skip_one_flow: bool) -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    inventory = scratch / "inventory"
    names = small_inventory(inventory, sites, hosts)
    the_plan = plan(load_estate(inventory))
    tag = uuid.uuid4().hex[:8]
    ledger_a, _ = _database(f"restore_bench_a_{tag}")
    ledger_b, _ = _database(f"restore_bench_b_{tag}")
    _, prefect_db = _database(f"restore_bench_prefect_{tag}")
    workers: list[subprocess.Popen[bytes]] = []
    # PostgreSQL's 100 connections, shared: the server 20 at most, the scheduler 8, each of the
    # sites' sessions 1 (RESTORE_SITE_SESSION_POOL below). With 10, the server ran out of them
    # while 60 sessions started together, and answered 500 for 30 s.
    os.environ["PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE"] = "5"
    os.environ["PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW"] = "15"
    try:
        with running_server(scratch / "prefect", port=_port(), database_url=prefect_db) as server:
            os.environ.update(client_settings(server.api_url, server.home))
            os.environ.update(
                {
                    "RESTORE_INVENTORY": str(inventory),
                    "RESTORE_DATA_DIR": str(scratch / "data"),
                    "RESTORE_REHEARSAL_DATABASE_URL": ledger_a,
                    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
                }
            )
            updates = {PREFECT_API_URL: server.api_url, PREFECT_SERVER_EPHEMERAL_ENABLED: False}
            with temporary_settings(updates=updates):
                print(f"(2) {sites} sites x {hosts} workstations, zero-duration stages:", flush=True)
                a = None if skip_one_flow else one_flow(4 * len(the_plan.hosts), server.api_url)
                env = {
                    **os.environ,
                    "RESTORE_REHEARSAL_DATABASE_URL": ledger_b,
                    "RESTORE_WORKER_POLL_SECONDS": "1",
                    # 60 sessions share PostgreSQL's 100 connections with the scheduler and the server.
                    "RESTORE_SITE_SESSION_POOL": "1",
                }
                workers = start_workers(names, env, scratch / "workers", per_worker)
                b = per_site(the_plan, names, ledger_b, server.api_url)
                if a is not None:
                    print(f"ratio (2b)/(2a): {b / a:.2f}x the wall time of one flow", flush=True)
                for process in workers:
                    stop_process_group(process, signal.SIGTERM, 20)
                workers = []
    finally:
        for process in workers:
            stop_process_group(process, signal.SIGTERM, 20)
        _drop(*(make_url(url).database or "" for url in (ledger_a, ledger_b, prefect_db)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inventory", type=Path, default=ROOT / "inventory")
    parser.add_argument("--sites", type=int, default=60, help="sites of the rehearsal (a session each)")
    parser.add_argument("--hosts", type=int, default=284, help="workstations per site in the rehearsal")
    parser.add_argument("--sites-per-worker", type=int, default=10, help="sites each worker process polls")
    parser.add_argument("--skip-rehearsal", action="store_true", help="plan and forecast only")
    parser.add_argument("--skip-one-flow", action="store_true", help="the site mode only, not (2a)")
    args = parser.parse_args()
    scale(args.inventory)
    if args.skip_rehearsal:
        return
    with tempfile.TemporaryDirectory(prefix="restore-sites-bench-") as scratch:
        rehearsal(args.sites, args.hosts, args.sites_per_worker, Path(scratch), args.skip_one_flow)


if __name__ == "__main__":
    main()
