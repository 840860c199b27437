"""The site mode's parts without a server: the stage result as an order carries it, what a site's
worker status says, what a worker refuses before touching the ledger, and a site's session running
its orders through the ledger."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from uuid import UUID, uuid4

import httpx
import pytest
from prefect.client.schemas.objects import State, StateType
from prefect.states import Failed, Running
from sqlalchemy import Engine

from restore_flows.drivers.fake import SimulatedFleet, rehearsal_fleet
from restore_flows.execution.stages import StageResult, StageRunner
from restore_flows.flows.sites import (
    REFUSED,
    SESSION_COMMAND,
    SITES_ENV,
    SessionParameters,
    SessionRefused,
    SiteExecutor,
    SiteStatus,
    _run_order,
    _Sent,
    decode,
    encode,
    run_session,
    session_deployment,
    shown_url,
    sites_of_worker,
    worker_env,
)
from restore_flows.inventory.estate import Estate
from restore_flows.inventory.loader import load_estate
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.repository import Ledger
from restore_flows.planning import plan
from restore_flows.scheduling.clock import Outcome, Result
from restore_flows.scheduling.durations import draw
from restore_flows.settings import Settings
from restore_flows.states import HostState
from tests.conftest import WriteInventory

ESTATE = """
waves:
  - {name: rest, services: ["*"]}
sites:
  - {name: arl, kind: hospital}
  - {name: bas, kind: hospital}
roles:
  - {name: ws, kind: workstation, services: [clinical]}
hosts:
  - {name: ws-arl-1, role: ws, site: arl}
  - {name: ws-arl-2, role: ws, site: arl}
  - {name: ws-bas-1, role: ws, site: bas}
"""


@pytest.mark.parametrize(
    "result",
    [
        StageResult("ws-1", HostState.WIPED),
        StageResult("ws-1", HostState.WIPE_FAILED, "disk busy", retryable=True),
        StageResult("ws-1", None, held_by="waiting: host ws-1 is held by run r2"),
        StageResult("ws-1", HostState.WIPING, 'ledger refused: {"no": 1}', gave_up=True),
    ],
)
def test_a_stage_result_survives_its_order(result: StageResult) -> None:
    assert decode(encode(result)) == result


@pytest.mark.parametrize("text", [None, "", "Crashed by the worker", "{not json", "{}", "[1]"])
def test_an_answer_that_is_not_a_result_is_none(text: str | None) -> None:
    assert decode(text) is None


def test_a_site_is_up_while_its_worker_was_heard_from_recently() -> None:
    now = dt.datetime(2026, 12, 1, 3, 45, tzinfo=dt.UTC)
    heard = SiteStatus("arl", now - dt.timedelta(seconds=10), silent_seconds=30)
    silent = SiteStatus("arl", now - dt.timedelta(seconds=31), silent_seconds=30)
    never = SiteStatus("arl", None, silent_seconds=30)
    assert heard.up(now)
    assert not silent.up(now)
    assert not never.up(now)
    since = (now - dt.timedelta(seconds=31)).astimezone().strftime("%H:%M")
    assert silent.why() == f"site arl: no worker since {since}"
    assert "no worker yet" in never.why()


def test_a_site_whose_session_greets_the_ledger_is_up_whatever_the_server_recorded() -> None:
    now = dt.datetime(2026, 12, 1, 3, 45, tzinfo=dt.UTC)
    long_ago = now - dt.timedelta(minutes=5)
    greeting = SiteStatus("arl", long_ago, 30, session_heard=now - dt.timedelta(seconds=5))
    quiet = SiteStatus("arl", long_ago, 30, session_heard=now - dt.timedelta(seconds=31))
    assert greeting.up(now)
    assert not quiet.up(now)


def test_a_worker_s_silence_counts_from_when_the_server_answers_again() -> None:
    now = dt.datetime(2026, 12, 1, 3, 45, tzinfo=dt.UTC)
    long_ago = now - dt.timedelta(minutes=5)
    back = now - dt.timedelta(seconds=10)
    assert SiteStatus("arl", long_ago, 30, server_back=back).up(now)
    assert not SiteStatus("arl", long_ago, 30, server_back=now - dt.timedelta(seconds=31)).up(now)
    assert not SiteStatus("arl", None, 30, server_back=back).up(now)  # a site that never had a worker


def test_a_worker_name_says_its_sites() -> None:
    assert sites_of_worker("arl@vm-01") == ["arl"]
    assert sites_of_worker("arl+bas@vm-01") == ["arl", "bas"]
    assert sites_of_worker("some-worker") == []


def test_a_stage_never_carries_a_password() -> None:
    assert "s3cret" not in shown_url("postgresql+psycopg://restore:s3cret@db.example:5432/ledger")


def _params(**changes: object) -> SessionParameters:
    fields: dict[str, object] = {"site": "arl", "run_id": "r1", "ledger": "sqlite:///elsewhere.sqlite3"}
    fields.update(changes)
    return SessionParameters.model_validate(fields)


def _never(label: str, work: Callable[[], None]) -> None:
    raise AssertionError(f"{label} was run")


def test_a_worker_refuses_a_session_for_another_ledger(
    tmp_path: Path, write_inventory: WriteInventory
) -> None:
    settings = Settings(inventory=write_inventory(estate=ESTATE), data_dir=tmp_path)
    with pytest.raises(SessionRefused, match="refused"):
        run_session(_params(), settings, session="s1", executed_by="arl@vm", submit=_never)
    assert not (tmp_path / "rehearsal.sqlite3").exists()  # the ledger was not even opened


def test_a_worker_refuses_the_session_of_another_site(
    tmp_path: Path, write_inventory: WriteInventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(inventory=write_inventory(estate=ESTATE), data_dir=tmp_path)
    ledger = shown_url(settings.ledger_url(rehearsal=True))
    monkeypatch.setenv(SITES_ENV, "bas")
    with pytest.raises(SessionRefused, match="a worker of bas got the session of site arl"):
        run_session(_params(ledger=ledger), settings, session="s1", executed_by="bas@vm", submit=_never)
    assert not (tmp_path / "rehearsal.sqlite3").exists()


def _ledger(tmp_path: Path, write_inventory: WriteInventory) -> tuple[Settings, str, Engine, Ledger]:
    """The rehearsal ledger of ESTATE, migrated and synced: (settings, its URL, engine, ledger)."""
    inventory = write_inventory(estate=ESTATE)
    settings = Settings(inventory=inventory, data_dir=tmp_path)
    url = settings.ledger_url(rehearsal=True)
    engine = make_engine(url)
    upgrade(engine)
    ledger = Ledger(engine)
    estate = load_estate(inventory)
    ledger.sync_inventory(estate, plan(estate))
    return settings, url, engine, ledger


def test_a_session_runs_its_site_s_orders_and_ends_with_its_run(
    tmp_path: Path, write_inventory: WriteInventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, url, engine, ledger = _ledger(tmp_path, write_inventory)
    run = ledger.start_run("rehearsal", "campaign", "test")
    ledger.record_approval(run, "rest", ["ws-arl-1"], "Dr. Approver", "1 host")
    mine = ledger.orders.send(run, "arl", "ws-arl-1", "wipe", [])
    stranger = ledger.orders.send(run, "arl", "ws-bas-1", "wipe", [])  # sent to the wrong site
    other_site = ledger.orders.send(run, "bas", "ws-bas-1", "wipe", [])
    monkeypatch.setenv(SITES_ENV, "arl")
    labels: list[str] = []
    threads: list[threading.Thread] = []

    def submit(label: str, work: Callable[[], None]) -> None:
        labels.append(label)
        if len(labels) == 2:  # the campaign ends once the session has its orders
            ledger.finish_run(run, "completed")
        threads.append(threading.Thread(target=work))
        threads[-1].start()

    params = _params(ledger=shown_url(url), run_id=run)
    ran = run_session(params, settings, session="s1", executed_by="arl@vm", submit=submit, poll_seconds=0.05)
    for thread in threads:
        thread.join()

    assert ran == 2
    assert sorted(labels) == ["wipe ws-arl-1", "wipe ws-bas-1"]
    assert set(ledger.orders.heard(["s1", "s2"])) == {"s1"}  # it greeted the ledger
    answers = {o.id: decode(o.result) for o in ledger.orders.answered([mine, stranger, other_site])}
    assert set(answers) == {mine, stranger}  # bas's order waits for bas's session
    assert answers[mine] == StageResult("ws-arl-1", HostState.WIPED)
    refused = answers[stranger]
    assert refused is not None
    assert refused.gave_up
    assert refused.error == "ws-bas-1 is not a host of site arl here"
    [attempt] = ledger.history("ws-arl-1").attempts
    assert (attempt.stage, attempt.executed_by) == ("wipe", "arl@vm")
    assert ledger.states(["ws-bas-1"]) == {"ws-bas-1": HostState.COMPROMISED}  # not touched
    engine.dispose()


def test_a_session_waits_for_a_campaign_that_missed_its_heartbeats(
    tmp_path: Path, write_inventory: WriteInventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A campaign process short of CPU misses the ledger's 30 s: its sessions must not end, or each one
    # is started again while the machine is at its busiest.
    settings, url, engine, ledger = _ledger(tmp_path, write_inventory)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=120)
    run = Ledger(engine, clock=lambda: past).start_run("rehearsal", "campaign", "test")
    ledger.record_approval(run, "rest", ["ws-arl-1"], "Dr. Approver", "1 host")
    assert not ledger.orders.run_alive(run)  # dead by the ledger's own limit
    monkeypatch.setenv(SITES_ENV, "arl")

    def submit(label: str, work: Callable[[], None]) -> None:
        work()
        ledger.finish_run(run, "completed")

    params = _params(ledger=shown_url(url), run_id=run, greet_seconds=0.001, patience_seconds=600)
    ran: list[int] = []
    session = threading.Thread(
        target=lambda: ran.append(
            run_session(
                params, settings, session="s1", executed_by="arl@vm", submit=submit, poll_seconds=0.01
            )
        )
    )
    session.start()
    greetings: set[dt.datetime] = set()
    while len(greetings) < 3 and session.is_alive():  # a whole loop, idle, past its run's silence
        greetings.update(ledger.orders.heard(["s1"]).values())
    ledger.orders.send(run, "arl", "ws-arl-1", "wipe", [])
    session.join()
    assert ran == [1]
    engine.dispose()


def test_a_retired_session_ends_while_its_campaign_goes_on(
    tmp_path: Path, write_inventory: WriteInventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Taken for lost while it was alive, another session started: this one must free its worker's place.
    settings, url, engine, ledger = _ledger(tmp_path, write_inventory)
    run = ledger.start_run("rehearsal", "campaign", "test")
    ledger.orders.retire(run, "arl", "s1")
    monkeypatch.setenv(SITES_ENV, "arl")
    ledger.orders.send(run, "arl", "ws-arl-1", "wipe", [])
    params = _params(ledger=shown_url(url), run_id=run, greet_seconds=0.001)
    ran = run_session(params, settings, session="s1", executed_by="arl@vm", submit=_never, poll_seconds=0.01)
    assert ran == 0  # nothing taken, and ended with its run alive
    assert ledger.orders.run_alive(run)
    engine.dispose()


def test_a_session_s_fleet_goes_on_from_the_attempts_the_ledger_has(
    tmp_path: Path, write_inventory: WriteInventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each session draws its simulated failures afresh: it must go on from the host's attempts so far,
    # or a rehearsal through the sites would fail each host's stage the same way on every attempt.
    seed = next(
        s
        for s in range(1_000)
        if draw(s, "ws-arl-1", "wipe", 1, "fail") < 0.5 <= draw(s, "ws-arl-1", "wipe", 2, "fail")
    )
    settings, url, engine, ledger = _ledger(tmp_path, write_inventory)
    monkeypatch.setenv(SITES_ENV, "arl")
    results: list[StageResult | None] = []
    for attempt in (1, 2):  # two runs, one after the other: a session each
        run = ledger.start_run("rehearsal", "campaign", "test")
        ledger.record_approval(run, "rest", ["ws-arl-1"], "Dr. Approver", "1 host")
        order = ledger.orders.send(run, "arl", "ws-arl-1", "wipe", [])

        def submit(label: str, work: Callable[[], None], run: str = run) -> None:
            work()
            ledger.finish_run(run, "completed")

        params = _params(ledger=shown_url(url), run_id=run, fail_rate=0.5, seed=seed)
        run_session(
            params, settings, session=f"s{attempt}", executed_by="arl@vm", submit=submit, poll_seconds=0.05
        )
        [answer] = ledger.orders.answered([order])
        results.append(decode(answer.result))

    assert [r.state if r else None for r in results] == [HostState.WIPE_FAILED, HostState.WIPED]
    assert ledger.attempt_count("ws-arl-1", "wipe") == 2
    engine.dispose()


def _runner(ledger: Ledger, run: str, worker: str) -> tuple[StageRunner, SimulatedFleet]:
    fleet = rehearsal_fleet(_params(run_id=run))
    return StageRunner(ledger, fleet, run, f"worker {worker}"), fleet


def _approved_run(tmp_path: Path, write_inventory: WriteInventory) -> tuple[Estate, Engine, Ledger, str]:
    """ESTATE's ledger and a campaign run approved for ws-arl-1: (estate, engine, ledger, run)."""
    settings, _url, engine, ledger = _ledger(tmp_path, write_inventory)
    run = ledger.start_run("rehearsal", "campaign", "test")
    ledger.record_approval(run, "rest", ["ws-arl-1"], "Dr. Approver", "1 host")
    return load_estate(settings.inventory), engine, ledger, run


def test_two_sessions_of_a_site_work_a_host_in_turn(tmp_path: Path, write_inventory: WriteInventory) -> None:
    # A session taken for lost while it was alive runs on beside its replacement until its next
    # greeting: each may run the next stage of a host the other worked. A lease one of them kept from
    # its earlier stage would be refused ("lost its lease ... token 1; now held by the same run with
    # token 2"), and the host failed: 292 hosts of the 60-site benchmark did.
    estate, engine, ledger, run = _approved_run(tmp_path, write_inventory)
    sessions = {name: _runner(ledger, run, "arl@vm") for name in ("s1", "s2")}
    states = []
    for session, stage in [("s1", "wipe"), ("s2", "reimage"), ("s1", "verify"), ("s2", "release")]:
        ledger.orders.send(run, "arl", "ws-arl-1", stage, [])
        [order] = ledger.orders.take(run, "arl", session, limit=1)
        runner, fleet = sessions[session]
        result = _run_order(order, session, "arl", estate, ledger, runner, fleet)
        assert result.error is None
        states.append(result.state)
    assert states == [HostState.WIPED, HostState.REIMAGED, HostState.VERIFIED_CLEAN, HostState.ONLINE]
    engine.dispose()


def test_an_order_taken_back_from_its_session_is_not_started(
    tmp_path: Path, write_inventory: WriteInventory
) -> None:
    # The session was taken for lost, its order dropped and sent again; the session, alive after all,
    # gets to it late: the stage is its successor's, and the host is not touched.
    estate, engine, ledger, run = _approved_run(tmp_path, write_inventory)
    ledger.orders.send(run, "arl", "ws-arl-1", "wipe", [])
    [order] = ledger.orders.take(run, "arl", "s1", limit=1)
    ledger.orders.drop([order.id])
    runner, fleet = _runner(ledger, run, "arl@vm")
    result = _run_order(order, "s1", "arl", estate, ledger, runner, fleet)
    assert result.state is None
    assert result.held_by is not None
    assert "no longer session s1's" in result.held_by
    assert ledger.states(["ws-arl-1"]) == {"ws-arl-1": HostState.COMPROMISED}
    assert ledger.attempt_count("ws-arl-1", "wipe") == 0
    engine.dispose()


def test_a_worker_starts_its_sessions_with_its_own_python() -> None:
    # The deployment names the command, so Prefect starts no workspace supervisor before each session;
    # "python" in it must be the worker's interpreter whatever PATH the worker was started with.
    env = worker_env(["arl"], Settings(), 1.0, base={"PATH": "/usr/bin:/bin"})
    command = session_deployment().job_variables["command"]
    assert command == SESSION_COMMAND
    found = shutil.which(command.split()[0], path=env["PATH"])
    assert found is not None
    assert Path(found).parent == Path(sys.executable).parent
    assert env["PATH"].split(os.pathsep)[1:] == ["/usr/bin", "/bin"]


@dataclass
class _Server:
    """The Prefect server as the site executor reads it: one site's queue, one session flow run."""

    polled: dt.datetime | None
    session: UUID
    failing: bool = False
    set_states: list[tuple[UUID, StateType]] = field(default_factory=list)
    sites: tuple[str, ...] = ("arl",)
    state: State[Any] = field(default_factory=Running)
    started: dict[str, UUID] = field(default_factory=dict)
    """The sessions created, by site (the last one)."""
    made: dict[str, UUID] = field(default_factory=dict)
    """The flow runs made, by idempotency key."""
    fail_after_making: int = 0
    """Creations that make the flow run, then answer 500 (a server short of connections)."""

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read_work_queues(self, work_pool_name: str) -> list[SimpleNamespace]:
        if self.failing:
            raise httpx.ReadTimeout("the server is busy")
        return [SimpleNamespace(name=site, last_polled=self.polled) for site in self.sites]

    def read_workers_for_work_pool(self, work_pool_name: str) -> list[SimpleNamespace]:
        return []

    def read_flow_runs(self, **_filters: object) -> list[SimpleNamespace]:
        return [SimpleNamespace(id=self.session, state=self.state)]

    def set_flow_run_state(self, flow_run: UUID, state: State[Any], force: bool = False) -> None:
        self.set_states.append((flow_run, state.type))

    def create_flow_run_from_deployment(
        self,
        deployment: UUID,
        *,
        parameters: dict[str, Any],
        work_queue_name: str,
        tags: list[str],
        idempotency_key: str | None = None,
    ) -> SimpleNamespace:
        # As the server does: a key it has seen gets the flow run it made then.
        run = self.made.setdefault(idempotency_key or str(uuid4()), uuid4())
        self.started[work_queue_name] = run
        if self.fail_after_making:
            self.fail_after_making -= 1
            request = httpx.Request("POST", "http://127.0.0.1/api/deployments/x/create_flow_run")
            raise httpx.HTTPStatusError("500", request=request, response=httpx.Response(500, request=request))
        return SimpleNamespace(id=run)


def test_a_session_greeting_the_ledger_is_not_lost_while_the_server_forgets_its_worker(
    tmp_path: Path, write_inventory: WriteInventory
) -> None:
    _settings, url, engine, ledger = _ledger(tmp_path, write_inventory)
    run = ledger.start_run("rehearsal", "campaign", "test")
    server = _Server(polled=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5), session=uuid4())
    executor = SiteExecutor(ledger, url, client_factory=lambda: cast(Any, server), silent_seconds=30)
    executor._sessions[("arl", run)] = server.session
    now = dt.datetime.now(dt.UTC)

    ledger.orders.greet(run, "arl", str(server.session), "arl@vm")  # the session takes its orders
    executor._refresh_sites()
    executor._check_sessions()
    assert server.set_states == []
    assert executor.status("arl").up(now)

    server.failing = True  # the server stops answering: the site stays up on its session's word
    with pytest.raises(httpx.ReadTimeout):
        executor._refresh_sites()
    assert executor.status("arl").up(now)

    earlier = Ledger(engine, clock=lambda: now - dt.timedelta(seconds=60))
    earlier.orders.greet(run, "arl", str(server.session), "arl@vm")  # ...its last greeting, long ago
    server.failing = False
    executor._refresh_sites()
    executor._check_sessions()
    assert server.set_states == []  # the server is back: the worker's silence counts from now

    assert executor._server_back is not None
    executor._server_back -= dt.timedelta(seconds=31)  # ...and the worker stayed silent that long
    executor._refresh_sites()
    executor._check_sessions()
    assert server.set_states == [(server.session, StateType.CRASHED)]
    assert ("arl", run) not in executor._sessions
    assert not executor.status("arl").up(dt.datetime.now(dt.UTC))
    engine.dispose()


def _waiting(executor: SiteExecutor, order: int, site: str, run: str) -> None:
    """A stage sent to ``site`` that waits for its session (as much of it as starting one reads)."""
    executor._sent[order] = cast(
        Any, SimpleNamespace(order=SimpleNamespace(host=SimpleNamespace(site=site), run_id=run))
    )


def test_sessions_start_a_few_at_a_time(tmp_path: Path, write_inventory: WriteInventory) -> None:
    # Many sessions starting at once on a small machine time the server out, and fail as they start.
    _settings, url, engine, ledger = _ledger(tmp_path, write_inventory)
    run = ledger.start_run("rehearsal", "campaign", "test")
    server = _Server(polled=dt.datetime.now(dt.UTC), session=uuid4(), sites=("arl", "bas", "cor"))
    executor = SiteExecutor(ledger, url, client_factory=lambda: cast(Any, server), starting_at_once=2)
    executor._refresh_sites()
    for n, site in enumerate(server.sites):  # a stage sent to each site
        _waiting(executor, n, site, run)

    executor._orphans()
    assert sorted(server.started) == ["arl", "bas"]
    executor._orphans()
    assert sorted(server.started) == ["arl", "bas"]  # both still starting: cor waits

    ledger.orders.greet(run, "arl", str(server.started["arl"]), "arl@vm")  # arl's session runs
    executor._refresh_sites()
    executor._orphans()
    assert sorted(server.started) == ["arl", "bas", "cor"]
    engine.dispose()


def test_a_session_the_server_made_while_answering_an_error_is_not_made_twice(
    tmp_path: Path, write_inventory: WriteInventory
) -> None:
    # In the 60-site benchmark, sessions the executor did not know of ran beside the ones it did.
    _settings, url, engine, ledger = _ledger(tmp_path, write_inventory)
    run = ledger.start_run("rehearsal", "campaign", "test")
    server = _Server(polled=dt.datetime.now(dt.UTC), session=uuid4(), fail_after_making=1)
    executor = SiteExecutor(ledger, url, client_factory=lambda: cast(Any, server))
    executor._refresh_sites()
    _waiting(executor, 1, "arl", run)

    with pytest.raises(httpx.HTTPStatusError):
        executor._orphans()
    executor._orphans()  # tried again: the server hands back the run it made
    assert len(server.made) == 1
    assert executor.sessions == [server.started["arl"]]

    executor._lost("arl", run, server.started["arl"], "site arl: its session ended Completed")
    executor._orphans()  # a new session in its place, under a new key
    assert len(server.made) == 2
    assert executor.sessions == list(server.made.values())
    engine.dispose()


@pytest.mark.parametrize(
    ("message", "failed_before", "result"),
    [
        ("Engine execution exited with unexpected exception", 0, Result.MOVED),  # sent again
        ("Engine execution exited with unexpected exception", 2, Result.STUCK),  # a third time: stop
        (f"{REFUSED}a worker of bas got the session of site arl", 0, Result.STUCK),
    ],
)
def test_a_failed_session_s_hosts_are_sent_again_unless_it_was_refused_or_keeps_failing(
    tmp_path: Path, write_inventory: WriteInventory, message: str, failed_before: int, result: Result
) -> None:
    _settings, url, engine, ledger = _ledger(tmp_path, write_inventory)
    run = ledger.start_run("rehearsal", "campaign", "test")
    server = _Server(polled=dt.datetime.now(dt.UTC), session=uuid4(), state=Failed(message=message))
    executor = SiteExecutor(ledger, url, client_factory=lambda: cast(Any, server))
    executor._sessions[("arl", run)] = server.session
    executor._failures["arl"] = failed_before
    order = ledger.orders.send(run, "arl", "ws-arl-1", "wipe", [])
    outcomes: list[Outcome] = []
    start = SimpleNamespace(host="ws-arl-1")
    sent = SimpleNamespace(order=SimpleNamespace(host=SimpleNamespace(site="arl"), run_id=run, start=start))
    executor._sent[order] = cast(Any, _Sent(cast(Any, sent.order), outcomes.append, ()))

    executor._refresh_sites()
    executor._check_sessions()
    assert [o.result for o in outcomes] == [result]
    assert ("arl", run) not in executor._sessions
    engine.dispose()
