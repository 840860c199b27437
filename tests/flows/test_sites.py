"""Sites for real: a Prefect server on PostgreSQL, the ledger on PostgreSQL, one worker per site (three
``restore worker`` processes on loopback), and one campaign scheduling them all from this process.

One site's worker is killed with ``kill -9`` in the middle of a stage: the other two sites finish
while it is down (they never wait on it), its hosts wait saying why, and once its worker is started
again they finish from where the ledger says they are, never wiped twice.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.execution.campaign import (
    Automatic,
    CampaignSettings,
    HostProgress,
    RunSummary,
    Selection,
    Status,
    run_campaign,
)
from restore_flows.flows.server import PrefectServer, running_server, stop_process_group
from restore_flows.flows.sites import POOL, FleetParameters, SiteExecutor, ensure_database
from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.audit import audit
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.ledger.tables import AttemptRow
from restore_flows.planning import plan
from restore_flows.scheduling.runner import Retries
from restore_flows.states import Event, HostState
from tests.conftest import POSTGRES_URL, WriteInventory, _postgres_admin
from tests.flows.served import eventually

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SITES = ("arl", "bas", "vir")
KILLED = "arl"

# Stages take simulated minutes: at the time scale below a wipe lasts about 9 s, long enough to kill
# its worker in the middle of it.
ESTATE = """
waves:
  - {name: core, services: [identity]}
  - {name: rest, services: ["*"]}
sites:
  - {name: arl, kind: hospital}
  - {name: bas, kind: hospital}
  - {name: vir, kind: hospital}
roles:
  - name: ws
    kind: workstation
    services: [clinical]
    durations: {wipe: 3, reimage: 1, verify: 0.5, release: 0.25}
groups:
  - defaults: {role: ws, site: arl}
    hosts: [{name: "ws-arl-[1:2]"}]
  - defaults: {role: ws, site: bas}
    hosts: [{name: "ws-bas-[1:2]"}]
  - defaults: {role: ws, site: vir}
    hosts: [{name: "ws-vir-[1:2]"}]
"""
TIME_SCALE = 0.05


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def prefect_on_postgres(tmp_path: Path) -> Iterator[PrefectServer]:
    """A Prefect server of this test's own, on a PostgreSQL database of its own."""
    admin = _postgres_admin()
    name = f"restore_prefect_{uuid.uuid4().hex[:10]}"
    url = make_url(POSTGRES_URL).set(drivername="postgresql+asyncpg", database=name)
    ensure_database(url.render_as_string(hide_password=False))
    try:
        with running_server(
            tmp_path / "prefect", port=_port(), database_url=url.render_as_string(hide_password=False)
        ) as server:
            yield server
    finally:
        with admin.connect() as db:
            db.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Workers:
    """``restore worker SITE`` processes, each in a session of its own (a kill takes all it started)."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, site: str) -> None:
        with open(self.logs / f"worker-{site}.log", "ab") as log:
            self.processes[site] = subprocess.Popen(
                [sys.executable, "-m", "restore_flows", "worker", site, "--name", f"{site}@worker"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self, site: str) -> None:
        os.killpg(self.processes[site].pid, signal.SIGKILL)
        self.processes[site].wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            stop_process_group(process, signal.SIGTERM, 20)


def _heard_since(since: float) -> set[str]:
    """Sites whose worker sent a heartbeat after ``since`` (epoch seconds)."""
    with get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(POOL)
    return {
        w.name.split("@")[0]
        for w in workers
        if w.last_heartbeat_time is not None and w.last_heartbeat_time.timestamp() > since
    }


def _wait(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    try:
        return eventually(probe, timeout=timeout, interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from exc


@pytest.mark.timeout(1200)  # each stage is a process on its worker: about 10 s each, 40 s on a busy machine
def test_sites_for_real(
    tmp_path: Path,
    write_inventory: WriteInventory,
    ledger_url_postgresql: str,
    prefect_on_postgres: PrefectServer,
) -> None:
    server = prefect_on_postgres
    inventory = write_inventory(estate=ESTATE)
    estate = load_estate(inventory)
    the_plan = plan(estate)
    engine = make_engine(ledger_url_postgresql)
    upgrade(engine)
    ledger = Ledger(engine)
    ledger.sync_inventory(estate, the_plan)
    hosts_of = {site: sorted(n for n, h in estate.hosts.items() if h.site == site) for site in SITES}

    env = server.client_env()
    env.update(
        {
            "RESTORE_INVENTORY": str(inventory),
            "RESTORE_DATA_DIR": str(tmp_path / "data"),
            "RESTORE_REHEARSAL_DATABASE_URL": ledger_url_postgresql,
            "RESTORE_WORKER_POLL_SECONDS": "1",
        }
    )
    workers = Workers(env, tmp_path)
    executor: SiteExecutor | None = None
    # This process's Prefect client talks to the test's server (its settings were read at import).
    prefect_settings = temporary_settings(
        updates={PREFECT_API_URL: server.api_url, PREFECT_SERVER_EPHEMERAL_ENABLED: False}
    )
    prefect_settings.__enter__()
    try:
        began = time.time()
        for site in SITES:
            workers.start(site)
        _wait(lambda: _heard_since(began) >= set(SITES), 120, "every site's worker is up")

        executor = SiteExecutor(
            ledger,
            ledger_url_postgresql,
            rehearsal=True,
            fleet=FleetParameters(time_scale=TIME_SCALE),
            silent_seconds=8.0,
            poll_seconds=0.5,
        ).open(SITES)
        seen: list[HostProgress] = []
        lock = threading.Lock()

        def changed(progress: HostProgress) -> None:
            with lock:
                seen.append(HostProgress(**vars(progress)))

        outcome: dict[str, Any] = {}

        def campaign() -> None:
            try:
                outcome["run"] = run_campaign(
                    ledger,
                    the_plan,
                    SimulatedFleet(),  # unused: the stages run on the sites' workers
                    Selection(),
                    mode="rehearsal",
                    actor="test",
                    approver=Automatic(),
                    settings=CampaignSettings(
                        lease_seconds=60,
                        heartbeat_seconds=2,
                        poll_seconds=0.25,
                        retries=Retries(backoff_minutes=(0.0,)),
                    ),
                    executor=executor,
                    on_change=changed,
                )
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=campaign, name="campaign", daemon=True)
        thread.start()

        # Kill arl's worker while one of its hosts is mid-wipe on it.
        def wiping_on_arl() -> bool:
            with engine.connect() as db:
                rows = db.execute(
                    select(AttemptRow.host, AttemptRow.executed_by).where(
                        AttemptRow.ended_at.is_(None), AttemptRow.stage == "wipe"
                    )
                ).all()
            return any(r.host in hosts_of[KILLED] and r.executed_by == f"{KILLED}@worker" for r in rows)

        _wait(wiping_on_arl, 120, "a wipe of arl runs on arl's worker")
        workers.kill(KILLED)
        killed_at = time.monotonic()

        # The other sites finish while arl has no worker; arl's hosts wait, saying why.
        others = [n for site in SITES if site != KILLED for n in hosts_of[site]]
        _wait(
            lambda: all(s is HostState.ONLINE for s in ledger.states(others).values()),
            480,
            "the other sites' hosts come online without arl's worker",
        )
        assert "error" not in outcome, outcome.get("error")
        assert all(s is not HostState.ONLINE for s in ledger.states(hosts_of[KILLED]).values())
        with lock:
            reasons = [p.reason or "" for p in seen if p.host in hosts_of[KILLED]]
        assert any("site arl: no worker since" in r for r in reasons), reasons[-5:]
        down_for = time.monotonic() - killed_at

        workers.start(KILLED)
        thread.join(timeout=480)
        assert not thread.is_alive(), "the campaign did not end after arl's worker came back"
        assert "error" not in outcome, outcome.get("error")
        _run_id, summary = outcome["run"]
        assert isinstance(summary, RunSummary)
        assert summary.ok, {n: (p.status, p.error, p.reason) for n, p in summary.hosts.items()}
        assert all(p.status is Status.ONLINE for p in summary.hosts.values())
        assert down_for > 0

        # Every stage ran on its own site's worker.
        with engine.connect() as db:
            attempts = db.execute(select(AttemptRow.host, AttemptRow.stage, AttemptRow.executed_by)).all()
        assert len(attempts) >= 4 * len(estate.hosts)
        wrong = [
            (a.host, a.stage, a.executed_by)
            for a in attempts
            if a.executed_by != f"{estate.hosts[a.host].site}@worker"
        ]
        assert not wrong, wrong

        # No double wipe: the ledger's own audit, and one finished wipe per host.
        found = audit(engine)
        assert found.ok, found.problems
        for name in estate.hosts:
            events = [t.event for t in ledger.history(name).transitions]
            assert events.count(Event.WIPE_DONE.value) == 1, (name, events)
        # The wipe killed with its worker was seen as not finished and resolved by the next attempt.
        resolved = [
            t
            for n in hosts_of[KILLED]
            for t in ledger.history(n).transitions
            if t.event == Event.INTERRUPTED.value or "was lost" in (t.detail or "")
        ]
        assert resolved, "no sign in the ledger of the wipe lost with arl's worker"
        # Its session is not left Running in Prefect, and a new one took over: each site's flow runs
        # hold that site's stages only, as task runs.
        assert executor.lost + _crashed() >= 1
        sessions = _sessions(executor.sessions)
        assert sorted(site for site, _ in sessions) == sorted([*SITES, KILLED]), sessions
        for site, stages in sessions:
            assert stages, site
            assert all(label.split(" ")[1] in hosts_of[site] for label in stages), (site, stages)
        # The sites that never lost their worker: a task run for each stage attempt, no more.
        ran = sorted(label for site, stages in sessions for label in stages if site != KILLED)
        assert ran == sorted(f"{a.stage} {a.host}" for a in attempts if a.host not in hosts_of[KILLED])
    finally:
        workers.stop()
        if executor is not None:
            executor.close()
        prefect_settings.__exit__(None, None, None)
        engine.dispose()


def _sessions(flow_runs: list[Any]) -> list[tuple[str, list[str]]]:
    """Each session flow run's site (from its tag) and its task runs' names, once the server has
    recorded them all (it records task runs from events, a moment after they ran)."""
    with get_client(sync_client=True) as client:

        def read() -> list[tuple[str, list[str]]]:
            found = []
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(id={"any_": flow_runs})):
                site = next(t.removeprefix("site:") for t in run.tags if t.startswith("site:"))
                tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
                found.append((site, sorted(t.name for t in tasks)))
            return sorted(found)

        previous: list[tuple[str, list[str]]] = []

        def settled() -> list[tuple[str, list[str]]] | None:
            nonlocal previous
            now = read()
            same = now == previous
            previous = now
            return now if same else None

        found: list[tuple[str, list[str]]] = _wait(settled, 60, "the sessions' task runs are recorded")
        return found


def _crashed() -> int:
    """Stage flow runs marked Crashed (lost with their worker, or found by it when it restarted)."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED]))
            )
        )
    return len(runs)
