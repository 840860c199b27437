"""A worker per site: each host's stages run on its site's Prefect worker, from the site's network,
while one campaign (one scheduler, the ledger's pools and priorities) decides centrally.

* The work pool ``restore-sites`` (process type) has one work queue per site. ``restore worker SITE``
  starts the worker that polls it; each stage it picks up runs in a process of its own on that machine.
* :class:`SiteExecutor` is the campaign's executor in this mode: each stage the scheduler starts becomes
  a flow run of the ``restore-stage`` deployment on the host's site's queue. Its parameters say what to
  do (host, stage, ledger run, mode, the pool claims granted) and hold no secret: the worker reads the
  ledger's URL and any secret from its own settings.
* ``restore-stage`` runs :class:`~restore_flows.execution.stages.StageRunner` against the shared ledger
  under the campaign's run (its approvals, its lease, a fresh fencing token), records which worker ran
  the stage (``attempts.executed_by``) and ends with the stage's result in its state message, which
  the executor reads back and turns into the scheduler's outcome.

A site whose worker has not been heard from (queue polled, heartbeat) for ``silent_seconds`` has no
worker: its stages are not sent (each host waits, saying "site arl: no worker since 03:41"), nothing
is held for them, and every other site goes on. A stage flow run its worker had taken when it went
silent is marked Crashed (and so are those a worker finds left Running when it starts again: one
worker per site) and started again once a worker is back: the ledger shows the host mid-stage, and
the stage is resolved from the host's facts (done, or started again) under a new fencing token that
refuses any late write of the lost one. A stage process watches its worker and ends within half a
second if the worker dies, so the stage that takes over does not run beside it.

Each stage costs its worker a process (Prefect's process worker): seconds, against milliseconds for a
task run in one flow. The site mode is for reaching each site's network, not for speed.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterWorkQueueName,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.states import Cancelled, Completed, Crashed, Failed
from prefect.types.entrypoint import EntrypointType
from pydantic import BaseModel, Field
from sqlalchemy.engine import make_url

from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.execution.campaign import StageOrder
from restore_flows.execution.stages import StageResult, StageRunner
from restore_flows.inventory.loader import load_estate
from restore_flows.inventory.models import Stage
from restore_flows.ledger.repository import Ledger
from restore_flows.scheduling.clock import Outcome, Result
from restore_flows.settings import Settings
from restore_flows.states import HostState

log = logging.getLogger(__name__)

POOL = "restore-sites"
STAGE_FLOW = "restore-stage"
STAGE_DEPLOYMENT = f"{STAGE_FLOW}/{STAGE_FLOW}"
SITES_ENV = "RESTORE_WORKER_SITES"
"""Set by ``restore worker``: the sites whose queues the worker polls (a stage of another site is refused)."""
RESULT_MARK = " | result="


def shown_url(url: str) -> str:
    """A database URL without its password: what a stage's parameters may carry."""
    return make_url(url).render_as_string(hide_password=True)


class StageParameters(BaseModel):
    """One stage of one host, as the scheduler sends it to the host's site. No secret in here."""

    host: str = Field(description="The host.")
    stage: Stage = Field(description="The stage to run.")
    site: str = Field(description="The host's site: the queue this was sent to.")
    run_id: str = Field(description="The ledger run (the campaign) this stage belongs to.")
    rehearsal: bool = Field(default=True, description="Rehearsal: the simulated fleet and rehearsal ledger.")
    ledger: str = Field(description="The scheduler's ledger, password hidden: the worker's must be the same.")
    claims: list[int] = Field(default_factory=list, description="Pool claims granted to the stage.")
    time_scale: float = Field(default=0.0, ge=0, description="Rehearsal: the simulated fleet's time scale.")
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    duration_noise: float = Field(default=0.0, ge=0, le=0.9)
    seed: int = 0
    broken_hosts: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class FleetParameters:
    """How a rehearsal's simulated fleet behaves, the same on every worker."""

    time_scale: float = 0.0
    fail_rate: float = 0.0
    duration_noise: float = 0.0
    seed: int = 0
    broken_hosts: tuple[str, ...] = ()


# -- the stage, on a site's worker ------------------------------------------------------------------


def worker_name() -> str:
    """This process's worker: the name Prefect's worker gave its flow-run process, else the process."""
    return os.environ.get("PREFECT__WORKER_NAME") or f"{socket.gethostname()}:{os.getpid()}"


def _watch_parent(every: float = 0.5) -> None:
    """End this stage's process at once if its worker dies (a ``kill -9`` of the worker): the stage
    the scheduler starts again elsewhere must never run beside this one. The ledger's fencing refuses
    a late write anyway; this stops the work itself."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()


def encode(result: StageResult) -> str:
    state = result.state.value if result.state is not None else None
    return json.dumps(
        {
            "host": result.host,
            "state": state,
            "error": result.error,
            "retryable": result.retryable,
            "held_by": result.held_by,
            "gave_up": result.gave_up,
        },
        separators=(",", ":"),
    )


def decode(message: str | None) -> StageResult | None:
    """The stage's result from its flow run's final state message; None if it carries none."""
    if not message:
        return None
    # The mark may be in the human part (an error's text) and in the JSON's strings: the result is
    # the first remainder that is JSON.
    data: Any = None
    at = message.find(RESULT_MARK)
    while at >= 0 and data is None:
        try:
            data = json.loads(message[at + len(RESULT_MARK) :])
        except ValueError:
            at = message.find(RESULT_MARK, at + 1)
    if not isinstance(data, dict):
        return None
    try:
        return StageResult(
            host=str(data["host"]),
            state=HostState(data["state"]) if data["state"] is not None else None,
            error=data["error"],
            retryable=bool(data["retryable"]),
            held_by=data["held_by"],
            gave_up=bool(data["gave_up"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


def run_stage_here(params: StageParameters, settings: Settings, executed_by: str) -> StageResult:
    """The stage through the ledger, on this machine: what ``restore-stage`` does, without Prefect."""
    from restore_flows.bootstrap import live_fleet, open_ledger

    url = settings.ledger_url(rehearsal=params.rehearsal)
    if shown_url(url) != params.ledger:
        return StageResult(
            params.host,
            None,
            f"this worker's ledger is {shown_url(url)}, the scheduler's {params.ledger}: refused",
            gave_up=True,
        )
    sites = [s for s in os.environ.get(SITES_ENV, "").split(",") if s]
    if sites and params.site not in sites:
        return StageResult(
            params.host,
            None,
            f"a worker of {', '.join(sites)} got a stage of site {params.site}",
            gave_up=True,
        )
    estate = load_estate(settings.inventory)
    host = estate.hosts.get(params.host)
    if host is None or host.site != params.site:
        return StageResult(
            params.host, None, f"{params.host} is not a host of site {params.site} here", gave_up=True
        )
    actor = f"worker {executed_by}"
    with open_ledger(settings, rehearsal=params.rehearsal) as context:
        ledger = context.ledger
        ledger.executed_by = executed_by
        if params.rehearsal:
            fleet: Any = SimulatedFleet(
                time_scale=params.time_scale,
                fail_rates=dict.fromkeys(Stage, params.fail_rate),
                seed=params.seed,
                broken=dict.fromkeys(params.broken_hosts, Stage.WIPE),
                noise=params.duration_noise,
            )
            # The fleet draws failures per attempt: continue the count the ledger has.
            done = [a for a in ledger.history(host.name).attempts if a.stage == params.stage.value]
            fleet._attempts[(host.name, params.stage)] = len(done)
            runner = StageRunner(ledger, fleet, params.run_id, actor, settings.lease_seconds)
            return runner.run(host, params.stage, lambda: params.claims)
        with live_fleet(settings, estate) as live:
            runner = StageRunner(ledger, live, params.run_id, actor, settings.lease_seconds)
            return runner.run(host, params.stage, lambda: params.claims)


@flow(name=STAGE_FLOW, flow_run_name="{params.stage} {params.host}", log_prints=False)
def restore_stage(params: StageParameters) -> State[Any]:
    """One stage of one host, on its site's worker, through the shared ledger."""
    _watch_parent()
    result = run_stage_here(params, Settings(), worker_name())
    said = result.state.value if result.state is not None else (result.held_by or "not run")
    text = f"{params.stage.value} {params.host}: {said}" + (f": {result.error}" if result.error else "")
    failed = result.gave_up or (result.state is not None and result.state.value.endswith("_failed"))
    message = text + RESULT_MARK + encode(result)
    return Failed(message=message) if failed else Completed(message=message)


# -- the pool, its queues and the stage deployment -------------------------------------------------


def stage_deployment() -> RunnerDeployment:
    """``restore-stage`` on the sites' pool, imported by module path: a worker with the package
    installed runs it from any directory."""
    return cast(
        RunnerDeployment,
        restore_stage.to_deployment(
            name=STAGE_FLOW,
            description="One stage of one host, on its site's worker (sent by a campaign's site executor).",
            tags=["restore", "site"],
            work_pool_name=POOL,
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
    )


def prepare_sites(client: SyncPrefectClient, sites: Iterable[str]) -> UUID:
    """The work pool, a queue per site and the stage deployment, created where missing."""
    from prefect.workers.process import ProcessWorker

    try:
        client.read_work_pool(POOL)
    except ObjectNotFound:
        with contextlib.suppress(ObjectAlreadyExists):  # another worker made it meanwhile
            client.create_work_pool(
                WorkPoolCreate(
                    name=POOL,
                    type="process",
                    description="One work queue per site; a worker per site runs its hosts' stages.",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
    known = {q.name for q in client.read_work_queues(work_pool_name=POOL)}
    for site in sorted(set(sites) - known):
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_queue(name=site, work_pool_name=POOL, description=f"Stages of site {site}")
    return cast(UUID, stage_deployment().apply(work_pool_name=POOL))


def sites_of_worker(name: str) -> list[str]:
    """The sites a worker drives, from its name ('arl@machine', 'arl+brg@machine')."""
    head, at, _ = name.partition("@")
    return [s for s in head.split("+") if s] if at else []


def worker_command(
    sites: Sequence[str], *, name: str | None = None, limit: int = 8, prefect: str = "prefect"
) -> list[str]:
    """``prefect worker start`` for these sites' queues."""
    command = [prefect, "worker", "start", "--pool", POOL, "--type", "process", "--limit", str(limit)]
    for site in sites:
        command += ["--work-queue", site]
    command += ["--name", name or f"{'+'.join(sites)}@{socket.gethostname()}"]
    return command


def worker_env(
    sites: Sequence[str], settings: Settings, poll_seconds: float, base: dict[str, str] | None = None
) -> dict[str, str]:
    """A worker's environment: its sites, its settings made absolute (its stage processes start in a
    directory of their own), quick polling and heartbeats, and nothing that calls out."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            SITES_ENV: ",".join(sites),
            "RESTORE_INVENTORY": str(settings.inventory.resolve()),
            "RESTORE_DATA_DIR": str(settings.data_dir.resolve()),
            "PREFECT_WORKER_QUERY_SECONDS": f"{poll_seconds:g}",
            "PREFECT_WORKER_HEARTBEAT_SECONDS": f"{max(1.0, poll_seconds):g}",
            "PREFECT_WORKER_PREFETCH_SECONDS": "0",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        }
    )
    env.setdefault("PREFECT_API_URL", f"http://{settings.prefect_host}:{settings.prefect_port}/api")
    return env


def crash_left_runs(client: SyncPrefectClient, sites: Sequence[str]) -> int:
    """A worker starting for these sites ran none of their stage runs still marked Pending or Running:
    their processes died with the worker before it (one worker per site). Say so, so that the scheduler
    sends those stages again at once rather than after the site went silent."""
    left = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            work_queue_name=FlowRunFilterWorkQueueName(any_=list(sites)),
            state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING])
            ),
        ),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[POOL])),
    )
    for run in left:
        client.set_flow_run_state(
            run.id, Crashed(message="its worker was restarted: the stage is run again"), force=True
        )
    return len(left)


def exec_worker(sites: Sequence[str], settings: Settings, *, name: str | None = None, limit: int = 8) -> None:
    """Become the worker of these sites (``restore worker``): pool, queues and deployment made sure
    of, stage runs left by a previous worker marked Crashed, then ``prefect worker start``."""
    import sys
    from pathlib import Path

    env = worker_env(sites, settings, settings.worker_poll_seconds)
    os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
    with get_client(sync_client=True) as client:
        prepare_sites(client, sites)
        crashed = crash_left_runs(client, sites)
    if crashed:
        log.warning("%d stage run(s) of %s were left by the previous worker: run again", crashed, sites)
    prefect = str(Path(sys.executable).with_name("prefect"))
    os.execve(prefect, worker_command(sites, name=name, limit=limit, prefect=prefect), env)


# -- the executor, with the scheduler ---------------------------------------------------------------


@dataclass
class _Sent:
    order: StageOrder
    deliver: Callable[[Outcome], None]
    claims: tuple[int, ...]
    flow_run: UUID | None = None
    seen: StateType | None = None


@dataclass
class SiteStatus:
    """What the scheduler's side knows of a site's worker, from its queue."""

    site: str
    last_polled: dt.datetime | None
    silent_seconds: float

    def up(self, now: dt.datetime) -> bool:
        return (
            self.last_polled is not None and (now - self.last_polled).total_seconds() <= self.silent_seconds
        )

    def why(self) -> str:
        if self.last_polled is None:
            return f"site {self.site}: no worker yet (start 'restore worker {self.site}')"
        since = self.last_polled.astimezone().strftime("%H:%M")
        return f"site {self.site}: no worker since {since}"


@dataclass
class SiteExecutor:
    """Each stage as a flow run of ``restore-stage`` on its host's site's queue (see the module)."""

    ledger: Ledger
    """The scheduler's ledger: to give back the claims of a stage that was lost with its worker."""
    ledger_url: str
    rehearsal: bool = True
    fleet: FleetParameters = field(default_factory=FleetParameters)
    silent_seconds: float = 30.0
    """A site whose queue no worker polled for this long has no worker."""
    poll_seconds: float = 1.0
    """How often flow runs and queues are read."""
    submitters: int = 4
    client_factory: Callable[[], SyncPrefectClient] = lambda: get_client(sync_client=True)
    _sent: dict[UUID, _Sent] = field(default_factory=dict, init=False)
    _sites: dict[str, SiteStatus] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False)
    _deployment: UUID | None = field(default=None, init=False)
    _context: contextvars.Context = field(default_factory=contextvars.copy_context, init=False)
    _local: threading.local = field(default_factory=threading.local, init=False)
    _clients: list[SyncPrefectClient] = field(default_factory=list, init=False)
    submitted: int = field(default=0, init=False)
    lost: int = field(default=0, init=False)

    def open(self, sites: Iterable[str]) -> SiteExecutor:
        """Make sure the pool, the queues and the deployment exist; start watching."""
        with self.client_factory() as client:
            self._deployment = prepare_sites(client, sites)
        self._refresh_sites()
        # The threads talk to the server this caller's Prefect settings name (a flow run's, a test's).
        self._context = contextvars.copy_context()
        self._pool = ThreadPoolExecutor(self.submitters, thread_name_prefix="site-submit")
        self._thread = threading.Thread(
            target=self._context.copy().run, args=(self._watch,), name="site-executor", daemon=True
        )
        self._thread.start()
        return self

    # The Executor protocol: a site executor cannot ship an in-process ``work``.
    def submit(self, start: Any, work: Callable[[], Outcome], deliver: Callable[[Outcome], None]) -> None:
        """What the campaign runs itself: procedure steps (host stages come as orders). A forest
        recovery step runs from here, where the first domain controller is reached, not from a site."""
        assert self._pool is not None, "open() the executor first"
        self._pool.submit(lambda: deliver(work()))

    def status(self, site: str) -> SiteStatus:
        with self._lock:
            return self._sites.get(site) or SiteStatus(site, None, self.silent_seconds)

    def submit_order(self, order: StageOrder, deliver: Callable[[Outcome], None]) -> None:
        site = order.host.site
        status = self.status(site)
        if not status.up(_now()):
            # Nothing is sent or held: the claims go back with this outcome, and the host is tried again.
            deliver(Outcome(order.start.host, Result.MOVED, None, error=status.why()))
            return
        sent = _Sent(order, deliver, tuple(order.claims()))
        assert self._pool is not None, "open() the executor first"
        self._pool.submit(self._context.copy().run, self._create, sent)

    def _create(self, sent: _Sent) -> None:
        order = sent.order
        assert isinstance(order.start.stage, Stage)
        params = StageParameters(
            host=order.host.name,
            stage=order.start.stage,
            site=order.host.site,
            run_id=order.run_id,
            rehearsal=self.rehearsal,
            ledger=shown_url(self.ledger_url),
            claims=list(sent.claims),
            time_scale=self.fleet.time_scale,
            fail_rate=self.fleet.fail_rate,
            duration_noise=self.fleet.duration_noise,
            seed=self.fleet.seed,
            broken_hosts=list(self.fleet.broken_hosts),
        )
        try:
            run = self._client().create_flow_run_from_deployment(
                cast(UUID, self._deployment),
                parameters={"params": params.model_dump(mode="json")},
                work_queue_name=order.host.site,
                tags=["restore", f"site:{order.host.site}", f"run:{order.run_id[:8]}"],
            )
        except Exception as exc:  # the server unreachable: the stage did not start; try again later
            log.warning("could not send %s %s to its site", order.start.stage, order.host.name, exc_info=True)
            self.ledger.slots.release(sent.claims)
            sent.deliver(Outcome(order.start.host, Result.MOVED, None, error=f"not sent: {exc}"))
            return
        sent.flow_run = run.id
        with self._lock:
            self._sent[run.id] = sent
            self.submitted += 1

    def close(self) -> None:
        """Stop watching once every stage sent has come back (the campaign has delivered them all)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for client in self._clients:
            client.__exit__(None, None, None)
        self._clients.clear()

    def _client(self) -> SyncPrefectClient:
        """This thread's client, kept open (a new one per call costs a connection and a version check)."""
        client: SyncPrefectClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self.client_factory().__enter__()
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    # -- watching ------------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self._refresh_sites()
                self._check_runs()
            except Exception:  # the server unreachable for a moment: the next look tries again
                log.warning("could not read the site workers' runs", exc_info=True)

    def _refresh_sites(self) -> None:
        client = self._client()
        queues = client.read_work_queues(work_pool_name=POOL)
        workers = client.read_workers_for_work_pool(POOL)
        # The last sign of life of each site's worker: its queue polled, or its heartbeat (the server
        # records a pool's polls in the background, one pending per pool, so one can be skipped).
        heard: dict[str, dt.datetime] = {}
        for queue in queues:
            if queue.last_polled is not None:
                heard[queue.name] = queue.last_polled.astimezone(dt.UTC)
        for worker in workers:
            if worker.last_heartbeat_time is None:
                continue
            beat = worker.last_heartbeat_time.astimezone(dt.UTC)
            for site in sites_of_worker(worker.name):
                if site not in heard or heard[site] < beat:
                    heard[site] = beat
        with self._lock:
            for queue in queues:
                self._sites[queue.name] = SiteStatus(queue.name, heard.get(queue.name), self.silent_seconds)

    def _check_runs(self) -> None:
        with self._lock:
            ids = list(self._sent)
        if not ids:
            return
        now = _now()
        runs: list[FlowRun] = []
        client = self._client()
        for chunk in range(0, len(ids), 200):
            runs += client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids[chunk : chunk + 200])),
                limit=200,
            )
        for run in runs:
            state = run.state
            if state is None:
                continue
            if state.is_final():
                self._ended(run.id, state)
            elif not self.status(self._sent[run.id].order.host.site).up(now):
                self._lost(client, run.id, state)

    def _ended(self, run_id: UUID, state: State[Any]) -> None:
        with self._lock:
            sent = self._sent.pop(run_id, None)
        if sent is None:
            return
        host = sent.order.start.host
        result = decode(state.message)
        if result is not None:
            sent.deliver(sent.order.outcome(result))
            return
        self.ledger.slots.release(sent.claims)
        if state.type in (StateType.CRASHED, StateType.CANCELLED):
            # The stage's process did not get to say how it ended: the ledger knows where the host is;
            # the next attempt resolves it from there.
            sent.deliver(Outcome(host, Result.MOVED, None, error=f"stage run ended {state.name}"))
        else:
            error = f"the stage's flow run ended {state.name}: {state.message or 'no message'}"
            sent.deliver(Outcome(host, Result.STUCK, error=error))

    def _lost(self, client: SyncPrefectClient, run_id: UUID, state: State[Any]) -> None:
        """Its site went silent while the stage was queued or running: it is not finished."""
        with self._lock:
            sent = self._sent.pop(run_id, None)
        if sent is None:
            return
        why = self.status(sent.order.host.site).why()
        if state.type is StateType.SCHEDULED:
            client.set_flow_run_state(run_id, Cancelled(message=f"{why}: sent again later"), force=True)
        else:
            client.set_flow_run_state(
                run_id, Crashed(message=f"{why}: run again when one is back"), force=True
            )
            log.warning("%s: %s %s lost with its worker", why, sent.order.start.stage, sent.order.host.name)
            self.lost += 1
        self.ledger.slots.release(sent.claims)
        sent.deliver(Outcome(sent.order.start.host, Result.MOVED, None, error=why))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- a drill of the whole site mode on one machine (``restore up --sites``) ----------------------------

DEFAULT_PREFECT_DATABASE = "postgresql+asyncpg://postgres@127.0.0.1:5432/restore_prefect"


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database of ``url`` if it does not exist (the Prefect server's own)."""
    from sqlalchemy import create_engine, text

    target = make_url(url)
    if target.get_backend_name() != "postgresql" or not target.database:
        raise ValueError(f"the Prefect server runs on PostgreSQL in the site mode, not {shown_url(url)}")
    admin = create_engine(
        target.set(drivername="postgresql+psycopg", database="postgres"), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as db:
            found = db.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database})
            if found.first() is None:
                db.execute(text(f'CREATE DATABASE "{target.database}"'))
    finally:
        admin.dispose()


def up_sites(settings: Settings, console: Any, sites: Sequence[str]) -> None:
    """The Prefect server on PostgreSQL, the deployments served, the sites' pool and queues, and one
    worker per site, until interrupted (then the workers and the server stop too)."""
    import signal
    import subprocess
    import sys

    from prefect import serve
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    from restore_flows.flows.server import stop_process_group
    from restore_flows.flows.serving import deployments
    from restore_flows.rehearsal import prefect_api

    database = settings.prefect_database_url or DEFAULT_PREFECT_DATABASE
    ensure_database(database)
    settings = settings.model_copy(update={"prefect_database_url": database})

    def interrupt(_signal: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    workers: list[subprocess.Popen[bytes]] = []
    with (
        prefect_api(settings, console) as api_url,
        temporary_settings(
            # Prefect read its settings when this module imported it: name the server explicitly.
            updates={PREFECT_API_URL: api_url, PREFECT_SERVER_EPHEMERAL_ENABLED: False}
        ),
    ):
        os.environ["RESTORE_INVENTORY"] = str(settings.inventory.resolve())
        with get_client(sync_client=True) as client:
            prepare_sites(client, sites)
        logs = settings.data_dir / "workers"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            for site in sites:
                with open(logs / f"{site}.log", "ab") as out:
                    workers.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "restore_flows", "worker", site],
                            env={**os.environ, "PREFECT_API_URL": api_url},
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
            console.print(
                f"Prefect server on PostgreSQL ({shown_url(database)}), UI {api_url.removesuffix('/api')}/\n"
                f"{len(sites)} site worker(s) (logs in {logs}/): {', '.join(sites)}\n"
                "Run restore-estate with site_workers on. Ctrl-C stops the workers and the server."
            )
            serve(*deployments(settings), limit=10, query_seconds=1, print_starting_message=False)
        finally:
            for process in workers:  # all at once: each takes a few seconds to stop
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
            for process in workers:
                stop_process_group(process, signal.SIGTERM, 20)
