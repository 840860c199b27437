"""A worker per site: each host's stages run on its site's Prefect worker, from the site's network,
while one campaign (one scheduler, the ledger's pools and priorities) decides centrally.

* The work pool ``restore-sites`` (process type) has one work queue per site. ``restore worker SITE``
  starts the worker that polls it.
* For each campaign and site, :class:`SiteExecutor` (the campaign's executor in this mode) starts one
  flow run of the ``restore-site`` deployment on the site's queue: the site's *session*. It lives as
  long as the campaign, on the site's worker, in a process of its own.
* Each stage the scheduler starts becomes an order in the ledger (``restore_flows.ledger.orders``:
  host, stage, the pool claims granted; never a secret). The site's session takes its orders, runs
  each as a task run of its flow run (:class:`~restore_flows.execution.stages.StageRunner` against
  the shared ledger, under the campaign's run: its approvals, a fresh fencing token), records which
  worker ran it (``attempts.executed_by``) and writes the result into the order, which the executor
  reads back and turns into the scheduler's outcome.

So a site's flow run holds that site's task runs only (the Prefect UI draws a run of up to 10,000),
and a stage costs a task run, not a process. The session ends when the campaign's run has ended or
has not been heard from for ``patience_seconds`` (minutes, not the ledger's 30 s: a campaign process
short of CPU must not find its sessions gone).

A site whose worker has not been heard from (queue polled, heartbeat: on the Prefect server) and whose
session has not greeted the ledger for ``silent_seconds`` has no worker (a server too busy to record
polls is no reason to withdraw a working site's stages and load it further): its stages are not sent
(each host waits, saying "site arl: no worker since 03:41"), nothing is held for them, and every other
site goes on. Its session is marked Crashed (and so is one a worker finds left Running when it starts
again: one worker per site) and its open orders are dropped; once a worker is back, a new session starts
and the stages are sent again: the ledger shows a host mid-stage, and the stage is resolved from the
host's facts (done, or started again) under a new fencing token that refuses any late write of the lost
one. A session watches its worker and ends within half a second if the worker dies, so the stage that
takes over does not run beside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import flow, runtime, task
from prefect.cache_policies import NO_CACHE
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
from prefect.futures import PrefectConcurrentFuture, PrefectFuture, wait
from prefect.states import Cancelled, Completed, Crashed, Failed
from prefect.types.entrypoint import EntrypointType
from prefect.utilities.annotations import quote
from pydantic import BaseModel, Field
from sqlalchemy.engine import make_url

from restore_flows.drivers.base import Fleet
from restore_flows.drivers.fake import SimulatedFleet, rehearsal_fleet
from restore_flows.execution.campaign import StageOrder
from restore_flows.execution.stages import StageResult, StageRunner
from restore_flows.inventory.estate import Estate
from restore_flows.inventory.loader import load_estate
from restore_flows.inventory.models import Stage
from restore_flows.ledger.orders import OrderRecord, OrderState, Outgoing
from restore_flows.ledger.repository import Ledger
from restore_flows.scheduling.clock import Outcome, Result
from restore_flows.settings import Settings
from restore_flows.states import HostState

log = logging.getLogger(__name__)

POOL = "restore-sites"
SESSION_FLOW = "restore-site"
REFUSED = "refused by the worker: "
"""How a session's Failed state begins when its worker refused it: starting another fails the same way."""
FAILURES_BEFORE_STUCK = 3
"""Sessions of a site that may fail otherwise (a server timing out as it starts) before its hosts stop."""
SITES_ENV = "RESTORE_WORKER_SITES"
"""Set by ``restore worker``: the sites whose queues the worker polls (another site's session is refused)."""


def shown_url(url: str) -> str:
    """A database URL without its password: what a session's parameters may carry."""
    return make_url(url).render_as_string(hide_password=True)


class SessionParameters(BaseModel):
    """A site's session of one campaign, as the scheduler starts it on the site's queue. No secret."""

    site: str = Field(description="The site: the queue this was sent to.")
    run_id: str = Field(description="The ledger run (the campaign) whose orders this session runs.")
    rehearsal: bool = Field(default=True, description="Rehearsal: the simulated fleet and rehearsal ledger.")
    ledger: str = Field(description="The scheduler's ledger, password hidden: the worker's must be the same.")
    threads: int = Field(default=16, ge=1, le=512, description="Stages run at once.")
    time_scale: float = Field(default=0.0, ge=0, description="Rehearsal: the simulated fleet's time scale.")
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    duration_noise: float = Field(default=0.0, ge=0, le=0.9)
    seed: int = 0
    broken_hosts: list[str] = Field(default_factory=list)
    greet_seconds: float = Field(
        default=5.0, gt=0, description="How often the session tells the ledger it is alive and taking orders."
    )
    patience_seconds: float = Field(
        default=600.0,
        gt=0,
        description=(
            "How long the session waits for a campaign run the ledger no longer hears from (its process "
            "starved or restarting) before it ends; a run that has ended ends it at once."
        ),
    )


@dataclass(frozen=True)
class FleetParameters:
    """How a rehearsal's simulated fleet behaves, the same on every worker."""

    time_scale: float = 0.0
    fail_rate: float = 0.0
    duration_noise: float = 0.0
    seed: int = 0
    broken_hosts: tuple[str, ...] = ()


# -- the session, on a site's worker ----------------------------------------------------------------


def worker_name() -> str:
    """This process's worker: the name Prefect's worker gave its flow-run process, else the process."""
    return os.environ.get("PREFECT__WORKER_NAME") or f"{socket.gethostname()}:{os.getpid()}"


def _watch_parent(every: float = 0.5) -> None:
    """End this session's process at once if its worker dies (a ``kill -9`` of the worker): the stage
    the scheduler starts again elsewhere must never run beside one of this session's. The ledger's
    fencing refuses a late write anyway; this stops the work itself."""
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


def decode(text: str | None) -> StageResult | None:
    """A stage's result as its order carries it; None if it is not one."""
    try:
        data: Any = json.loads(text or "")
    except ValueError:
        return None
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


class SessionRefused(Exception):
    """This worker must not run this session (another ledger, another site)."""


def refusal(params: SessionParameters, settings: Settings) -> str | None:
    """Why this worker must not run the session, before it touches any ledger; None: it may."""
    url = settings.ledger_url(rehearsal=params.rehearsal)
    if shown_url(url) != params.ledger:
        return f"this worker's ledger is {shown_url(url)}, the scheduler's {params.ledger}: refused"
    sites = [s for s in os.environ.get(SITES_ENV, "").split(",") if s]
    if sites and params.site not in sites:
        return f"a worker of {', '.join(sites)} got the session of site {params.site}"
    return None


Submit = Callable[[str, Callable[[], None]], None]
"""How a session runs one stage: its label, and the work (a task run of the session's flow run)."""


@contextlib.contextmanager
def _fleet_and_ledger(params: SessionParameters, settings: Settings) -> Iterator[tuple[Ledger, Fleet]]:
    from restore_flows.bootstrap import live_fleet, open_ledger

    # A session holds few connections however many stages it runs: each stage's transactions are
    # short, and every site's session shares the database's connection limit.
    with open_ledger(settings, rehearsal=params.rehearsal, connections=settings.site_session_pool) as context:
        if params.rehearsal:
            yield context.ledger, rehearsal_fleet(params)
        else:
            with live_fleet(settings, load_estate(settings.inventory)) as live:
                yield context.ledger, live


def run_session(
    params: SessionParameters,
    settings: Settings,
    *,
    session: str,
    executed_by: str,
    submit: Submit,
    poll_seconds: float = 0.5,
) -> int:
    """A site's session: take this site's orders of the run, run each through ``submit``, answer it,
    until the run has ended and nothing is in flight. Returns how many stages it ran."""
    why = refusal(params, settings)
    if why is not None:
        raise SessionRefused(why)
    estate = load_estate(settings.inventory)
    actor = f"worker {executed_by}"
    ran = 0
    in_flight: set[int] = set()
    lock = threading.Lock()
    wake = threading.Event()
    with _fleet_and_ledger(params, settings) as (ledger, fleet):
        ledger.executed_by = executed_by
        runner = StageRunner(ledger, fleet, params.run_id, actor, settings.lease_seconds)

        def work(order: OrderRecord) -> Callable[[], None]:
            def stage() -> None:
                try:
                    result = _run_order(order, session, params.site, estate, ledger, runner, fleet)
                    ledger.orders.answer(order.id, session, encode(result))
                finally:
                    with lock:
                        in_flight.discard(order.id)
                    wake.set()

            return stage

        greeted = -math.inf
        retired = False
        while True:
            if not retired and time.monotonic() - greeted >= params.greet_seconds:
                # Retired: the scheduler took this session for lost and started another. It finishes
                # its stages and ends, or it would hold one of its worker's places for good.
                retired = not ledger.orders.greet(params.run_id, params.site, session, executed_by)
                greeted = time.monotonic()
            wake.clear()  # before looking: a stage that ends from now on wakes the wait below
            with lock:
                free = 0 if retired else params.threads - len(in_flight)
            orders = ledger.orders.take(params.run_id, params.site, session, free)
            for order in orders:
                with lock:
                    in_flight.add(order.id)
                ran += 1
                submit(f"{order.stage} {order.host}", work(order))
            if orders and len(orders) == free:
                continue  # there may be more; otherwise wait for a stage to end, or the next look
            with lock:
                idle = not in_flight
            # Not the ledger's 30 s for a dead run: a campaign process starved of CPU (60 sessions starting on
            # a small machine) can miss its heartbeat, and a session that ends then must be started again.
            if idle and (retired or not ledger.orders.run_alive(params.run_id, params.patience_seconds)):
                return ran
            wake.wait(poll_seconds)


def _run_order(
    order: OrderRecord,
    session: str,
    site: str,
    estate: Estate,
    ledger: Ledger,
    runner: StageRunner,
    fleet: Fleet,
) -> StageResult:
    host = estate.hosts.get(order.host)
    if host is None or host.site != site:
        ledger.slots.release(order.claims)
        return StageResult(order.host, None, f"{order.host} is not a host of site {site} here", gave_up=True)
    stage = Stage(order.stage)
    if isinstance(fleet, SimulatedFleet):
        # The fleet draws failures per attempt: continue the count the ledger has.
        fleet.attempts_before(host.name, stage, ledger.attempt_count(host.name, stage.value))
    try:
        return runner.run(host, stage, lambda: order.claims, order=(order.id, session))
    except Exception as exc:  # a bug, or the ledger gone past its retries: this stage only
        log.exception("%s %s", order.stage, order.host)
        ledger.slots.release(order.claims)
        return StageResult(order.host, None, f"unexpected error on the site's worker: {exc}", gave_up=True)


@task(cache_policy=NO_CACHE, retries=0, task_run_name="{label}")
def site_stage(label: str, work: Callable[[], None]) -> None:
    """One stage of one host, a task run of its site's session."""
    work()


@flow(name=SESSION_FLOW, flow_run_name="{params.site} {params.run_id}", log_prints=False)
def restore_site(params: SessionParameters) -> State[Any]:
    """A site's session of a campaign, on the site's worker: the site's stages as its task runs."""
    _watch_parent()
    futures: list[PrefectConcurrentFuture[None]] = []

    def submit(label: str, work: Callable[[], None]) -> None:
        # quote(): hand the callable over as it is; Prefect would otherwise walk and rebuild it.
        futures.append(cast(Any, site_stage.submit(label, cast(Any, quote(work)))))
        if len(futures) > 1_000:  # a campaign's worth of stages: keep only those still running
            futures[:] = [f for f in futures if not f.wrapped_future.done()]

    try:
        ran = run_session(
            params, Settings(), session=str(runtime.flow_run.id), executed_by=worker_name(), submit=submit
        )
    except SessionRefused as refused:
        return Failed(message=f"{REFUSED}{refused}")
    wait(list[PrefectFuture[None]](futures))  # the last task runs record their final state first
    return Completed(message=f"site {params.site}: {ran} stage(s) of run {params.run_id}")


# -- the pool, its queues and the session deployment ----------------------------------------------


SESSION_COMMAND = "python -m prefect.engine"
"""How a worker starts a session's process. Named, so that the worker starts the engine itself:
without a command, Prefect's process worker puts a workspace supervisor (a Python process of its own,
importing Prefect) in front of each flow run, which doubled the CPU a session costs to start and
made 20 sessions starting together on one machine take 100 s. ``python`` is the worker's own
interpreter: :func:`worker_env` puts it first on the worker's PATH."""


def session_deployment() -> RunnerDeployment:
    """``restore-site`` on the sites' pool, imported by module path: a worker with the package
    installed runs it from any directory."""
    return cast(
        RunnerDeployment,
        restore_site.to_deployment(
            name=SESSION_FLOW,
            description="A site's session of a campaign, on its worker: the site's stages as task runs.",
            tags=["restore", "site"],
            work_pool_name=POOL,
            entrypoint_type=EntrypointType.MODULE_PATH,
            job_variables={"command": SESSION_COMMAND},
        ),
    )


def prepare_sites(client: SyncPrefectClient, sites: Iterable[str]) -> UUID:
    """The work pool, a queue per site and the session deployment, created where missing."""
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
    return cast(UUID, session_deployment().apply(work_pool_name=POOL))


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
    path = [str(Path(sys.executable).parent), *(p for p in env.get("PATH", "").split(os.pathsep) if p)]
    env.update(
        {
            "PATH": os.pathsep.join(dict.fromkeys(path)),  # SESSION_COMMAND's python: this one
            SITES_ENV: ",".join(sites),
            "RESTORE_INVENTORY": str(settings.inventory.resolve()),
            "RESTORE_DATA_DIR": str(settings.data_dir.resolve()),
            "PREFECT_WORKER_QUERY_SECONDS": f"{poll_seconds:g}",
            "PREFECT_WORKER_HEARTBEAT_SECONDS": f"{max(1.0, poll_seconds):g}",
            "PREFECT_WORKER_PREFETCH_SECONDS": "0",
            # A server that answers 500 for a moment (its database connections all busy while many
            # sessions start at once) must not crash a session as it starts: ask again, as for 503.
            "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        }
    )
    env.setdefault("PREFECT_API_URL", f"http://{settings.prefect_host}:{settings.prefect_port}/api")
    return env


def crash_left_runs(client: SyncPrefectClient, sites: Sequence[str]) -> int:
    """A worker starting for these sites runs none of their sessions still marked Pending or Running:
    their processes died with the worker before it (one worker per site). Say so, so that the scheduler
    starts new sessions and sends their stages again at once rather than after the site went silent."""
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
            run.id, Crashed(message="its worker was restarted: a new session takes over"), force=True
        )
    return len(left)


def exec_worker(
    sites: Sequence[str], settings: Settings, *, name: str | None = None, limit: int | None = None
) -> None:
    """Become the worker of these sites (``restore worker``): pool, queues and deployment made sure
    of, sessions left by a previous worker marked Crashed, then ``prefect worker start``."""
    env = worker_env(sites, settings, settings.worker_poll_seconds)
    os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
    with get_client(sync_client=True) as client:
        prepare_sites(client, sites)
        crashed = crash_left_runs(client, sites)
    if crashed:
        log.warning("%d session(s) of %s were left by the previous worker: taken over", crashed, sites)
    prefect = str(Path(sys.executable).with_name("prefect"))
    sessions = limit or 2 * len(sites)  # a campaign's session per site, and one replacing it
    os.execve(prefect, worker_command(sites, name=name, limit=sessions, prefect=prefect), env)


# -- the executor, with the scheduler ---------------------------------------------------------------


@dataclass
class _Sent:
    order: StageOrder
    deliver: Callable[[Outcome], None]
    claims: tuple[int, ...]


@dataclass
class SiteStatus:
    """What the scheduler's side knows of a site's worker, from its queue."""

    site: str
    last_polled: dt.datetime | None
    silent_seconds: float
    session_heard: dt.datetime | None = None
    """When the site's session last greeted the ledger: it is taking orders, whatever the server says."""
    server_back: dt.datetime | None = None
    """When the Prefect server answered again after failing: a known worker's silence counts from then
    (the server did not record its polls meanwhile)."""

    def up(self, now: dt.datetime) -> bool:
        signs = [self.last_polled, self.session_heard]
        if self.last_polled is not None:
            signs.append(self.server_back)
        return any(t is not None and (now - t).total_seconds() <= self.silent_seconds for t in signs)

    def why(self) -> str:
        if self.last_polled is None:
            return f"site {self.site}: no worker yet (start 'restore worker {self.site}')"
        since = self.last_polled.astimezone().strftime("%H:%M")
        return f"site {self.site}: no worker since {since}"


@dataclass
class SiteExecutor:
    """Each stage as an order to its host's site's session, one session flow run per site and
    campaign on the site's queue (see the module)."""

    ledger: Ledger
    """The scheduler's ledger: the orders go through it."""
    ledger_url: str
    rehearsal: bool = True
    fleet: FleetParameters = field(default_factory=FleetParameters)
    silent_seconds: float = 30.0
    """A site whose queue no worker polled and whose session did not greet the ledger for this long
    has no worker."""
    poll_seconds: float = 1.0
    """How often the orders' results are read, and the sender looks for stages to send."""
    watch_seconds: float = 2.0
    """How often the sites' workers and sessions are looked at on the Prefect server: each look is
    three requests, and the server also serves every session's task runs."""
    session_patience: float = 600.0
    """How long a session waits for this campaign's run when the ledger no longer hears from it."""
    starting_at_once: int = 16
    """Sessions started and not yet greeting the ledger, at most: each is a process importing Prefect
    and a dozen requests to the server, and 60 at once on a small drill machine made the server time
    out, the sessions fail as they started, and each be started again. The others start as these run."""
    threads: int = 16
    """Stages each site's session runs at once."""
    submitters: int = 4
    client_factory: Callable[[], SyncPrefectClient] = lambda: get_client(sync_client=True)
    _sent: dict[int, _Sent] = field(default_factory=dict, init=False)
    _sessions: dict[tuple[str, str], UUID] = field(default_factory=dict, init=False)
    """The live session (its flow run) of each (site, ledger run)."""
    _sites: dict[str, SiteStatus] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _starting: threading.Lock = field(default_factory=threading.Lock, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False)
    _outbox: list[_Sent] = field(default_factory=list, init=False)
    """Stages the campaign started, not yet sent: the sender sends all that wait at once."""
    _mail: threading.Event = field(default_factory=threading.Event, init=False)
    _closing: threading.Event = field(default_factory=threading.Event, init=False)
    _sender: threading.Thread | None = field(default=None, init=False)
    _deployment: UUID | None = field(default=None, init=False)
    _server_failing: bool = field(default=False, init=False)
    _greeted: set[str] = field(default_factory=set, init=False)
    """Sessions (flow run ids) that have greeted the ledger: started, not starting."""
    _failures: dict[str, int] = field(default_factory=dict, init=False)
    """Sessions of each site that ended Failed."""
    _replaced: dict[tuple[str, str], int] = field(default_factory=dict, init=False)
    """Sessions of each (site, ledger run) lost so far: the next one's idempotency key says which it is."""
    _server_back: dt.datetime | None = field(default=None, init=False)
    _context: contextvars.Context = field(default_factory=contextvars.copy_context, init=False)
    _local: threading.local = field(default_factory=threading.local, init=False)
    _clients: list[SyncPrefectClient] = field(default_factory=list, init=False)
    submitted: int = field(default=0, init=False)
    """Orders sent."""
    sessions: list[UUID] = field(default_factory=list, init=False)
    """Every session flow run started, in order."""
    lost: int = field(default=0, init=False)
    """Orders a session had taken when it was lost with its worker."""

    def open(self, sites: Iterable[str]) -> SiteExecutor:
        """Make sure the pool, the queues and the deployment exist; start watching."""
        with self.client_factory() as client:
            self._deployment = prepare_sites(client, sites)
        self._refresh_sites()
        # The threads talk to the server this caller's Prefect settings name (a flow run's, a test's).
        self._context = contextvars.copy_context()
        self._pool = ThreadPoolExecutor(self.submitters, thread_name_prefix="site-submit")
        # Three threads, so that a slow Prefect server (many sessions starting at once on a small
        # machine) delays neither the orders going out nor the results coming back: both go through
        # the ledger only; the sessions and the sites' workers are looked at on the server.
        for name, loop in (("sites", self._watch), ("answers", self._watch_answers)):
            thread = threading.Thread(target=self._context.copy().run, args=(loop,), name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        self._sender = threading.Thread(
            target=self._context.copy().run, args=(self._send_loop,), name="site-sender", daemon=True
        )
        self._sender.start()
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
        assert self._sender is not None, "open() the executor first"
        sent = _Sent(order, deliver, tuple(order.claims()))
        with self._lock:
            self._outbox.append(sent)
        self._mail.set()

    def _send_loop(self) -> None:
        while True:
            self._mail.wait(self.poll_seconds)
            self._mail.clear()
            with self._lock:
                batch, self._outbox = self._outbox, []
            if batch:
                try:
                    self._send(batch)
                except Exception:  # a bug: say so, and go on sending (a dead sender would stall all)
                    log.exception("sending %d stage(s) to their sites", len(batch))
            elif self._closing.is_set():
                return

    def _send(self, batch: list[_Sent]) -> None:
        """These stages into the ledger in one statement (a campaign starts hundreds at once), then a
        session for each site that has none: the orders wait for it there."""
        outgoing = []
        for sent in batch:
            order = sent.order
            assert isinstance(order.start.stage, Stage)
            outgoing.append(
                Outgoing(order.run_id, order.host.site, order.host.name, order.start.stage.value, sent.claims)
            )
        try:
            ids = self.ledger.orders.send_all(outgoing)
        except Exception as exc:  # the ledger unreachable: not started; tried again later
            log.warning("could not send %d stage(s) to their sites", len(batch), exc_info=True)
            try:
                self.ledger.slots.release([c for sent in batch for c in sent.claims])
            except Exception:  # still unreachable: the claims end with the run's lease
                log.warning("could not give back the claims of %d unsent stage(s)", len(batch), exc_info=True)
            for sent in batch:
                sent.deliver(Outcome(sent.order.start.host, Result.MOVED, None, error=f"not sent: {exc}"))
            return
        with self._lock:
            self._sent.update(zip(ids, batch, strict=True))
            self.submitted += len(batch)
        try:
            self._orphans()
        except Exception:  # the server unreachable for a moment: the watch starts them (_orphans)
            log.warning("could not start the sessions of %d stage(s)", len(batch), exc_info=True)

    def _session(self, site: str, run_id: str) -> UUID:
        """The site's session of this run, started on the site's queue if it has none."""
        with self._starting:
            with self._lock:
                known = self._sessions.get((site, run_id))
            if known is not None:
                return known
            params = SessionParameters(
                site=site,
                run_id=run_id,
                rehearsal=self.rehearsal,
                ledger=shown_url(self.ledger_url),
                threads=self.threads,
                time_scale=self.fleet.time_scale,
                fail_rate=self.fleet.fail_rate,
                duration_noise=self.fleet.duration_noise,
                seed=self.fleet.seed,
                broken_hosts=list(self.fleet.broken_hosts),
                # Several greetings within the silence that counts a site lost: one late is no loss.
                greet_seconds=max(0.5, self.silent_seconds / 4),
                patience_seconds=self.session_patience,
            )
            # A busy server can make the flow run and still answer 500 or time out: without the key,
            # the next try made a second session that nothing here watched nor retired, which took the
            # site's orders beside the first until the campaign ended. With it, the server hands back
            # the run it made; a session lost and replaced takes the next key.
            with self._lock:
                replaced = self._replaced.get((site, run_id), 0)
            run = self._client().create_flow_run_from_deployment(
                cast(UUID, self._deployment),
                parameters={"params": params.model_dump(mode="json")},
                work_queue_name=site,
                tags=["restore", f"site:{site}", f"run:{run_id[:8]}"],
                idempotency_key=f"restore session {run_id} {site} {replaced}",
            )
            with self._lock:
                self._sessions[(site, run_id)] = run.id
                self.sessions.append(run.id)
            return run.id

    def close(self) -> None:
        """Stop watching once every stage sent has come back (the campaign has delivered them all).
        The sessions end by themselves once the campaign's run has ended."""
        self._closing.set()
        self._mail.set()
        if self._sender is not None:
            self._sender.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._stop.set()
        for thread in self._threads:
            thread.join()
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
        while not self._stop.wait(self.watch_seconds):
            try:
                self._refresh_sites()
                self._check_sessions()
                self._orphans()
            except Exception:  # the server or the ledger unreachable for a moment: the next look tries again
                log.warning("could not look at the sites' workers and sessions", exc_info=True)

    def _watch_answers(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self._check_answers()
            except Exception:  # the ledger unreachable for a moment: the next look tries again
                log.warning("could not read the site sessions' answers", exc_info=True)

    def _refresh_sites(self) -> None:
        # The sessions' greetings first, from the ledger: with the Prefect server failing, a site
        # whose session takes its orders stays up (and nothing is declared lost: see _watch).
        with self._lock:
            sessions = dict(self._sessions)
        greeted = self.ledger.orders.heard([str(run) for run in sessions.values()])
        self._greeted.update(greeted)
        session_heard: dict[str, dt.datetime] = {}
        for (site, _run_id), flow_run in sessions.items():
            at = greeted.get(str(flow_run))
            if at is not None and (site not in session_heard or session_heard[site] < at):
                session_heard[site] = at.astimezone(dt.UTC)
        with self._lock:
            for site, status in self._sites.items():
                self._sites[site] = replace(status, session_heard=session_heard.get(site))
        try:
            client = self._client()
            queues = client.read_work_queues(work_pool_name=POOL)
            workers = client.read_workers_for_work_pool(POOL)
        except Exception:
            self._server_failing = True
            raise
        if self._server_failing:
            self._server_failing = False
            self._server_back = _now()
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
                self._sites[queue.name] = SiteStatus(
                    queue.name,
                    heard.get(queue.name),
                    self.silent_seconds,
                    session_heard.get(queue.name),
                    self._server_back,
                )

    def _check_answers(self) -> None:
        with self._lock:
            ids = list(self._sent)
        if not ids:
            return
        for record in self.ledger.orders.answered(ids):
            with self._lock:
                sent = self._sent.pop(record.id, None)
            if sent is None:
                continue
            result = decode(record.result)
            if result is not None:
                sent.deliver(sent.order.outcome(result))
                continue
            self.ledger.slots.release(sent.claims)
            error = f"the site's session answered {record.result!r}, not a stage's result"
            sent.deliver(Outcome(sent.order.start.host, Result.STUCK, error=error))

    def _check_sessions(self) -> None:
        with self._lock:
            sessions = dict(self._sessions)
        if not sessions:
            return
        now = _now()
        client = self._client()
        ids = list(sessions.values())
        runs: dict[UUID, FlowRun] = {}
        for chunk in range(0, len(ids), 200):
            for run in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids[chunk : chunk + 200])), limit=200
            ):
                runs[run.id] = run
        for (site, run_id), flow_run in sessions.items():
            state = runs[flow_run].state if flow_run in runs else None
            if state is None:
                continue
            status = self.status(site)
            if state.type is StateType.FAILED:
                # Refused by its worker (another ledger, another site) or failing again and again:
                # starting another would fail the same way. Its hosts stop here, saying why, for an
                # operator. A session that failed once (the server timing out as it started) is lost.
                why = f"site {site}: its session failed: {state.message or 'no message'}"
                with self._lock:
                    self._failures[site] = failures = self._failures.get(site, 0) + 1
                refused = (state.message or "").startswith(REFUSED)
                self._lost(site, run_id, flow_run, why, stuck=refused or failures >= FAILURES_BEFORE_STUCK)
            elif state.is_final():
                self._lost(site, run_id, flow_run, f"site {site}: its session ended {state.name}")
            elif not status.up(now):
                why = status.why()
                if state.type is StateType.SCHEDULED:
                    client.set_flow_run_state(
                        flow_run, Cancelled(message=f"{why}: started again later"), force=True
                    )
                else:
                    client.set_flow_run_state(
                        flow_run, Crashed(message=f"{why}: started again when one is back"), force=True
                    )
                self._lost(site, run_id, flow_run, why)

    def _orphans(self) -> None:
        """Start a session for each site that has orders and none (orders sent just as its session was
        lost, or before it had one), its worker being up, a few at a time (``starting_at_once``)."""
        now = _now()
        with self._lock:
            wanting = {(s.order.host.site, s.order.run_id) for s in self._sent.values()} - set(self._sessions)
            starting = sum(str(run) not in self._greeted for run in self._sessions.values())
        for site, run_id in sorted(wanting):
            if starting >= self.starting_at_once:
                return
            if self.status(site).up(now):
                self._session(site, run_id)
                starting += 1

    def _lost(self, site: str, run_id: str, flow_run: UUID, why: str, *, stuck: bool = False) -> None:
        """The site's session is gone (with its worker, or ended): its orders not answered are
        withdrawn and their hosts tried again, with a new session once the site has a worker
        (``stuck``: the session failed; its hosts stop, for an operator)."""
        # Before another is started: should this one be alive after all, it ends at its next greeting.
        self.ledger.orders.retire(run_id, site, str(flow_run))
        with self._lock:
            if self._sessions.get((site, run_id)) == flow_run:
                del self._sessions[(site, run_id)]
                self._replaced[(site, run_id)] = self._replaced.get((site, run_id), 0) + 1
            ids = [i for i, s in self._sent.items() if s.order.host.site == site and s.order.run_id == run_id]
        if not ids:
            return
        dropped = self.ledger.orders.drop(ids)
        if dropped:
            log.warning("%s: %d stage(s) withdrawn from its session, sent again", why, len(dropped))
        for record in dropped:
            with self._lock:
                sent = self._sent.pop(record.id, None)
                self.lost += record.state is OrderState.TAKEN
            if sent is None:
                continue
            if record.state is OrderState.TAKEN:
                log.warning("%s: %s %s lost with its session", why, record.stage, record.host)
            self.ledger.slots.release(sent.claims)
            if stuck:
                sent.deliver(Outcome(sent.order.start.host, Result.STUCK, error=why))
            else:
                sent.deliver(Outcome(sent.order.start.host, Result.MOVED, None, error=why))
        # Those done meanwhile keep their result: the next look at the answers delivers them.


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
