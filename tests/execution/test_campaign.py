"""The campaign runner on the simulated fleet, threads and a real ledger, without Prefect."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy import event as db_events

from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.errors import LeaseHeld
from restore_flows.execution.campaign import (
    CampaignSettings,
    HostProgress,
    Status,
    WaveToApprove,
    approval_summary,
)
from restore_flows.inventory.estate import Host
from restore_flows.inventory.loader import load_estate
from restore_flows.inventory.models import Stage
from restore_flows.ledger.audit import audit
from restore_flows.ledger.db import make_engine, upgrade
from restore_flows.ledger.pools import Request
from restore_flows.ledger.repository import Ledger
from restore_flows.ledger.tables import PoolClaimRow
from restore_flows.planning import Plan, plan
from restore_flows.scheduling.runner import Retries
from restore_flows.states import Event, HostState
from tests.chaos import terminating
from tests.conftest import WriteInventory
from tests.execution.conftest import FAST, Clock, run_threads

_ENGINES: list[Engine] = []


@pytest.fixture(autouse=True)
def _dispose_engines() -> Iterator[None]:
    """Close what a test's ledgers left open (PostgreSQL warns about connections never closed)."""
    yield
    while _ENGINES:
        _ENGINES.pop().dispose()


PIPELINE_EVENTS = [
    "enroll",
    "start_wipe",
    "wipe_done",
    "start_reimage",
    "reimage_done",
    "start_verify",
    "verify_passed",
    "start_release",
    "release_done",
]


def test_a_campaign_brings_every_host_online(ledger: Ledger, small_plan: Plan) -> None:
    _run_id, summary = run_threads(ledger, small_plan, SimulatedFleet())
    assert summary.ok, [(p.host, p.status, p.reason) for p in summary.hosts.values()]
    assert set(ledger.states().values()) == {HostState.ONLINE}
    for name in ["ws-01", "gw-01"]:
        assert [t.event for t in ledger.history(name).transitions] == PIPELINE_EVENTS
    db = [t.event for t in ledger.history("db-01").transitions]
    assert "start_restore" in db
    assert "start_reimage" not in db
    dc = ledger.history("dc-01")
    assert [t.event for t in dc.transitions][:4] == [
        "enroll",
        "capture_evidence",
        "evidence_captured",
        "start_wipe",
    ]
    assert dc.evidence
    assert dc.evidence[0].run_id is not None
    # One approval per wave, recorded as automatic (a rehearsal), covering that wave's hosts.
    assert [(a.scope, a.automatic) for a in dc.approvals] == [("core", True)]
    assert [a.scope for a in ledger.history("ws-01").approvals] == ["icu"]


def test_a_dependency_gates_the_stage_that_needs_it_not_the_wipe(ledger: Ledger, small_plan: Plan) -> None:
    """The ICU workstations are wiped and imaged while their gateway is still being rebuilt; their
    verification waits until it is online."""
    online: dict[str, float] = {}
    started: dict[tuple[str, str], float] = {}
    for_gateway = threading.Event()

    class Fleet(SimulatedFleet):
        def reimage(self, host: Host) -> None:
            started[(host.name, "reimage")] = time.monotonic()
            if host.name == "gw-01":
                assert for_gateway.wait(30)  # the gateway's install takes until the workstations are imaged
            super().reimage(host)

        def verify(self, host: Host):  # type: ignore[no-untyped-def]
            started[(host.name, "verify")] = time.monotonic()
            return super().verify(host)

    def seen(progress: HostProgress) -> None:
        if progress.status is Status.ONLINE:
            online[progress.host] = time.monotonic()
        imaged = [n for n in small_plan.wave("icu").hosts if n.startswith("ws-") and n != "ws-07"]
        if progress.host.startswith("ws-") and all((n, "reimage") in started for n in imaged):
            for_gateway.set()

    run_threads(ledger, small_plan, Fleet(), on_change=seen)
    assert for_gateway.is_set()
    for n in range(1, 7):
        name = f"ws-0{n}"
        assert started[(name, "reimage")] < online["gw-01"]  # imaged before its dependency was back
        assert started[(name, "verify")] > online["gw-01"]  # verified only after


def test_a_failed_host_blocks_its_dependents_at_their_gate_only(ledger: Ledger, small_plan: Plan) -> None:
    _, summary = run_threads(ledger, small_plan, SimulatedFleet(broken={"gw-02": Stage.REIMAGE}))
    assert not summary.ok
    assert summary.hosts["gw-02"].status is Status.FAILED
    assert "simulated permanent failure" in (summary.hosts["gw-02"].error or "")
    assert ledger.host("gw-02").state is HostState.REIMAGE_FAILED
    blocked = summary.hosts["ws-07"]
    assert blocked.status is Status.BLOCKED
    assert (blocked.reason or "").startswith("blocked: gw-02 gw-02: reimage: simulated permanent failure")
    # Wiping and imaging needed nothing of gw-02: done; verification would have: never started.
    assert ledger.host("ws-07").state is HostState.REIMAGED
    others = [p for n, p in summary.hosts.items() if n not in ("gw-02", "ws-07")]
    assert all(p.status is Status.ONLINE for p in others)


def test_no_wave_waits_for_an_earlier_wave_it_does_not_need(
    write_inventory: WriteInventory, tmp_path: Path
) -> None:
    """A campaign has no barrier: an office PC is back while the core's domain controller restores."""
    the_plan = plan(
        load_estate(
            write_inventory(
                estate="""
                waves:
                  - {name: core, services: [identity]}
                  - {name: rest, services: ["*"]}
                sites:
                  - {name: arl, kind: hospital}
                roles:
                  - {name: dc, kind: server, services: [identity], restore_method: backup}
                  - {name: office, kind: workstation, services: [office]}
                hosts:
                  - {name: dc-01, role: dc, site: arl}
                  - {name: pc-01, role: office, site: arl}
                """
            )
        )
    )
    ledger = _ledger(tmp_path, the_plan)
    pc_online = threading.Event()

    class Fleet(SimulatedFleet):
        def restore_backup(self, host: Host) -> None:
            assert pc_online.wait(30), "the office PC waited for the core wave"

    def seen(progress: HostProgress) -> None:
        if progress.host == "pc-01" and progress.status is Status.ONLINE:
            pc_online.set()

    _, summary = run_threads(ledger, the_plan, Fleet(), on_change=seen)
    assert summary.ok
    assert ledger.history("pc-01").transitions[-1].at < ledger.history("dc-01").transitions[-1].at


class Later:
    """An approver who approves the listed waves at once and the others only when told to."""

    automatic = False

    def __init__(self, now: Sequence[str]) -> None:
        self.now = list(now)
        self.asked: list[str] = []
        self.later = threading.Event()

    def ask(self, waves: Sequence[WaveToApprove]) -> None:
        self.asked = [w.wave for w in waves]

    def poll(self) -> tuple[dict[str, str], dict[str, str]]:
        ready = [w for w in self.asked if w in self.now or self.later.is_set()]
        self.asked = [w for w in self.asked if w not in ready]
        return dict.fromkeys(ready, "Dr. A. Osei"), {}

    def pending(self) -> bool:
        return bool(self.asked)


def test_each_wave_needs_its_own_approval(ledger: Ledger, small_plan: Plan) -> None:
    approver = Later(now=["core"])
    dc_online = threading.Event()

    def seen(progress: HostProgress) -> None:
        if progress.host == "dc-01" and progress.status is Status.ONLINE:
            dc_online.set()

    result: list[object] = []
    thread = threading.Thread(
        target=lambda: result.append(
            run_threads(ledger, small_plan, SimulatedFleet(), approver=approver, on_change=seen)
        )
    )
    thread.start()
    assert dc_online.wait(30)
    # The core wave is back; not one ICU host was touched without its wave's approval.
    icu = small_plan.wave("icu").hosts
    assert all([t.event for t in ledger.history(n).transitions] == ["enroll"] for n in icu)
    approver.later.set()
    thread.join(60)
    assert result
    assert set(ledger.states().values()) == {HostState.ONLINE}
    approvals = ledger.history("ws-01").approvals
    assert [(a.scope, a.approver, a.automatic) for a in approvals] == [("icu", "Dr. A. Osei", False)]


def test_a_wave_that_is_refused_wipes_nothing(ledger: Ledger, small_plan: Plan) -> None:
    class Refuses(Later):
        def poll(self) -> tuple[dict[str, str], dict[str, str]]:
            approved, _ = super().poll()
            refused = dict.fromkeys(self.asked, "no approval within 1 minutes")
            self.asked = []
            return approved, refused

    _, summary = run_threads(ledger, small_plan, SimulatedFleet(), approver=Refuses(now=["core"]))
    assert summary.refused == {"icu": "no approval within 1 minutes"}
    assert summary.hosts["dc-01"].status is Status.ONLINE
    for name in small_plan.wave("icu").hosts:
        assert summary.hosts[name].status is Status.BLOCKED
        assert [t.event for t in ledger.history(name).transitions] == ["enroll"]


def test_retries_with_seeded_failures(ledger: Ledger, small_plan: Plan) -> None:
    fleet = SimulatedFleet(fail_rates={Stage.WIPE: 0.5, Stage.VERIFY: 0.3}, seed=7)
    _, summary = run_threads(ledger, small_plan, fleet)
    attempts = Counter((a.stage, a.number > 1) for n in summary.hosts for a in ledger.history(n).attempts)
    assert attempts[("wipe", True)] > 0  # some wipes needed a second attempt
    for name, progress in summary.hosts.items():
        history = ledger.history(name)
        if progress.status is Status.ONLINE:
            assert history.transitions[-1].to_state is HostState.ONLINE
        elif progress.status is Status.FAILED:  # out of attempts: waits for an operator
            assert history.host.state.value.endswith("_failed"), (name, progress)
            assert history.host.lease_run is None  # given back: an operator may act now
        else:  # behind a failed dependency, at the stage it gates
            assert progress.status is Status.BLOCKED
    # The same seed draws the same failures whatever the thread timing; another seed differs.
    hosts = list(small_plan.estate.hosts.values())
    draws = [fleet._draw(h, Stage.WIPE, 1, "fail") for h in hosts]
    assert draws == [SimulatedFleet(seed=7)._draw(h, Stage.WIPE, 1, "fail") for h in hosts]
    assert draws != [SimulatedFleet(seed=8)._draw(h, Stage.WIPE, 1, "fail") for h in hosts]


def test_a_dependency_outside_the_run_is_waited_for_visibly(ledger: Ledger, small_plan: Plan) -> None:
    waiting = threading.Event()
    reasons: list[str] = []

    def seen(progress: HostProgress) -> None:
        reasons.append(f"{progress.host}: {progress.status.value}: {progress.reason}")
        if progress.host == "gw-01" and (progress.reason or "").startswith(
            "waiting for dc-01 to be online before verify: it is compromised and no run is working on "
            "it: start a run of wave core"
        ):
            waiting.set()

    results: list[object] = []
    icu = threading.Thread(
        target=lambda: results.append(
            run_threads(ledger, small_plan, SimulatedFleet(), "icu", on_change=seen)
        )
    )
    icu.start()
    assert waiting.wait(20), reasons[-10:]
    assert ledger.host("gw-01").state is HostState.REIMAGED  # wiped and imaged meanwhile
    _, core = run_threads(ledger, small_plan, SimulatedFleet(), "core")  # the earlier wave comes online...
    icu.join(30)
    assert core.ok
    assert results
    assert set(ledger.states().values()) == {HostState.ONLINE}


def test_a_dependency_that_never_comes_online_blocks_after_the_timeout(
    ledger: Ledger, small_plan: Plan
) -> None:
    settings = CampaignSettings(
        retries=Retries(backoff_minutes=(0.0,)), poll_seconds=0.02, dependency_timeout=0.0
    )
    _, summary = run_threads(ledger, small_plan, SimulatedFleet(), "icu", settings=settings)
    assert summary.hosts["gw-01"].status is Status.BLOCKED
    assert summary.hosts["gw-01"].reason == "blocked: dc-01 not online after 0 s"
    assert summary.hosts["ws-01"].status is Status.BLOCKED
    assert (summary.hosts["ws-01"].reason or "").startswith("blocked: ")
    assert not summary.ok
    assert ledger.host("gw-01").state is HostState.REIMAGED  # as far as it could go without dc-01


def test_an_ioc_finding_quarantines(ledger: Ledger, small_plan: Plan) -> None:
    _, summary = run_threads(ledger, small_plan, SimulatedFleet(ioc_rate=1.0), "core")
    assert summary.hosts["dc-01"].status is Status.FAILED
    assert ledger.host("dc-01").state is HostState.QUARANTINED
    assert "IOC" in (summary.hosts["dc-01"].error or "")
    assert ledger.host("dc-01").lease_run is None


def _interrupt(ledger: Ledger, clock: Clock, host: str) -> str:
    """A run that started wiping the host, then vanished (its lease runs out)."""
    run = ledger.start_run("rehearsal", "icu", "lost")
    ledger.record_approval(run, "icu", [host], "Dr. A", "shown")
    lease = ledger.acquire(host, run, 60)
    ledger.apply(lease, Event.START_WIPE, actor="lost")
    clock.advance(120)
    return run


@pytest.mark.parametrize("finished", [True, False])
def test_an_interrupted_wipe_is_finished_from_facts_or_resumed(
    ledger: Ledger, small_plan: Plan, clock: Clock, finished: bool
) -> None:
    lost = _interrupt(ledger, clock, "gw-01")
    assert ledger.interrupted() == [("gw-01", "wipe")]

    class Facts(SimulatedFleet):
        def stage_finished(self, host: Host, stage: Stage, started_at: dt.datetime) -> bool:
            return finished  # what the deployment server would say about the lost wipe

    # dc-01, which gw-01 needs before verify, is in no run: the resumed run goes as far as it can.
    settings = CampaignSettings(
        retries=Retries(backoff_minutes=(0.0,)), poll_seconds=0.02, dependency_timeout=0
    )
    run_threads(ledger, small_plan, Facts(), "icu", hosts=("gw-01",), approver="Dr. A", settings=settings)
    history = ledger.history("gw-01")
    events = [t.event for t in history.transitions]
    assert ledger.interrupted() == []
    assert ledger.host("gw-01").state is HostState.REIMAGED
    if finished:
        assert events[:4] == ["enroll", "start_wipe", "wipe_done", "start_reimage"]
    else:
        # The fleet cannot vouch for the lost wipe: it is wiped again, and the history says why.
        assert events[:6] == ["enroll", "start_wipe", "interrupted", "retry", "start_wipe", "wipe_done"]
        assert history.transitions[3].detail == f"resumed after the crash of run {lost}"
        assert [a.outcome for a in history.attempts if a.stage == "wipe"] == ["interrupted", "succeeded"]


class Crash(BaseException):
    """Stands for a kill -9 of the process at that very statement: nothing after it runs."""


def test_a_run_killed_while_taking_over_a_stage_leaves_it_to_resume(
    ledger: Ledger, small_plan: Plan, clock: Clock
) -> None:
    """The run that takes over a lost wipe records 'interrupted' and 'retry' together: killed between
    the two, it used to leave the host wipe_failed, for an operator, and the next run stopped there."""
    first = _interrupt(ledger, clock, "gw-01")
    second = ledger.start_run("rehearsal", "icu", "second")
    ledger.record_approval(second, "icu", ["gw-01"], "Dr. A", "shown")
    lease = ledger.acquire("gw-01", second, 60)
    assert lease.interrupted_stage == "wipe"

    def crash_at_the_retry(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO TRANSITIONS") and "retry" in str(parameters):
            raise Crash

    db_events.listen(ledger._engine, "before_cursor_execute", crash_at_the_retry)
    try:
        with pytest.raises(Crash):
            ledger.resume(
                lease,
                actor="second",
                error="lost mid-stage",
                detail=f"resumed after the crash of run {first}",
            )
    finally:
        db_events.remove(ledger._engine, "before_cursor_execute", crash_at_the_retry)
    assert ledger.host("gw-01").state is HostState.WIPING  # nothing of the takeover was kept
    assert [t.event for t in ledger.history("gw-01").transitions] == ["enroll", "start_wipe"]

    clock.advance(120)  # the second run is gone too: the next one takes over and resumes the wipe
    settings = CampaignSettings(
        retries=Retries(backoff_minutes=(0.0,)), poll_seconds=0.02, dependency_timeout=0
    )

    class Unfinished(SimulatedFleet):
        def stage_finished(self, host: Host, stage: Stage, started_at: dt.datetime) -> bool:
            return False  # the deployment server cannot vouch for the lost wipe

    run_threads(
        ledger, small_plan, Unfinished(), "icu", hosts=("gw-01",), approver="Dr. A", settings=settings
    )
    history = ledger.history("gw-01")
    assert [t.event for t in history.transitions][:6] == [
        "enroll",
        "start_wipe",
        "interrupted",
        "retry",
        "start_wipe",
        "wipe_done",
    ]
    assert history.transitions[3].detail == f"resumed after the crash of run {first}"
    assert ledger.host("gw-01").state is HostState.REIMAGED  # as far as it goes without dc-01


def test_a_clean_host_is_never_wiped_again_after_a_crash(
    ledger: Ledger, small_plan: Plan, clock: Clock
) -> None:
    _, core = run_threads(ledger, small_plan, SimulatedFleet(), "core")  # dc-01, which gw-01 needs
    assert core.ok
    run = ledger.start_run("rehearsal", "icu", "lost")
    ledger.record_approval(run, "icu", ["gw-01"], "Dr. A", "shown")
    lease = ledger.acquire("gw-01", run, 60)
    for event in (Event.START_WIPE, Event.WIPE_DONE, Event.START_REIMAGE, Event.REIMAGE_DONE):
        ledger.apply(lease, event, actor="lost")
    ledger.apply(lease, Event.START_VERIFY, actor="lost")
    ledger.apply(lease, Event.VERIFY_PASSED, actor="lost")
    ledger.apply(lease, Event.START_RELEASE, actor="lost")  # and then the run died
    clock.advance(120)
    settings = CampaignSettings(
        retries=Retries(backoff_minutes=(0.0,)), poll_seconds=0.02, dependency_timeout=0
    )
    _, summary = run_threads(ledger, small_plan, SimulatedFleet(), "icu", hosts=("gw-01",), settings=settings)
    events = [t.event for t in ledger.history("gw-01").transitions]
    assert events.count("start_wipe") == 1
    # The stage left running was the release: it is resumed; the wipe is not repeated.
    assert events[-2:] == ["start_release", "release_done"], summary.hosts["gw-01"]
    assert summary.hosts["gw-01"].status is Status.ONLINE


def test_the_approval_summary_lists_forensic_holds_and_what_is_online(
    ledger: Ledger, small_plan: Plan
) -> None:
    before = approval_summary(small_plan, ["dc-01", "gw-01"], ledger, "core")
    assert before.startswith("Wave core: 2 host(s) will be wiped and rebuilt:\n- arl: 2 server(s)")
    assert "dc-01: evidence NOT yet registered" in before
    assert "online already" not in before
    run_threads(ledger, small_plan, SimulatedFleet(), "core", settings=FAST)
    after = approval_summary(small_plan, ["dc-01", "gw-01", "gw-02"], ledger, "icu")
    assert after.startswith("Wave icu: 2 host(s) will be wiped and rebuilt:")
    assert "1 host(s) of it are online already: nothing is done to them." in after
    assert "forensic hold" not in after  # dc-01 is online: its evidence is no longer in question


def test_a_free_slot_goes_to_the_best_waiting_claim_across_runs(ledger: Ledger, clock: Clock) -> None:
    slots = ledger.slots
    first = slots.grant("run-lab", [Request("a", "reimage", ("imaging-arl",), 3_000_000)], 60)
    second = slots.grant("run-lab", [Request("b", "reimage", ("imaging-arl",), 3_000_001)], 60)
    assert [r.host for r in first.granted + second.granted] == ["a", "b"]
    lab = slots.grant("run-lab", [Request("c", "reimage", ("imaging-arl",), 3_000_002)], 60)
    icu = slots.grant("run-icu", [Request("d", "reimage", ("imaging-arl",), 1_000_005)], 60)
    assert (lab.granted, icu.granted) == ((), ())  # the pool is full: both now wait, filed
    slots.release(first.claims[("a", "reimage")])
    # The lab run asks again first, but the ICU claim waits with a better priority: it keeps the slot.
    again = slots.grant("run-lab", [Request("c", "reimage", ("imaging-arl",), 3_000_002)], 60)
    assert again.granted == ()
    assert again.taken_by_others == {"imaging-arl": 1}
    assert [
        r.host
        for r in slots.grant("run-icu", [Request("d", "reimage", ("imaging-arl",), 1_000_005)], 60).granted
    ] == ["d"]
    assert slots.usage()["imaging-arl"] == (2, 2, 1)
    # A crashed run's claims come back when they expire; a live run renews its own with its heartbeat.
    clock.advance(30)
    slots.renew("run-lab", 60)
    clock.advance(31)
    assert slots.usage()["imaging-arl"] == (2, 1, 1)  # run-icu's grant expired; run-lab's live on
    assert [
        r.host
        for r in slots.grant("run-lab", [Request("c", "reimage", ("imaging-arl",), 3_000_002)], 60).granted
    ] == ["c"]


def test_hosts_already_online_do_not_hold_a_resumed_run(ledger: Ledger, small_plan: Plan) -> None:
    fleet = SimulatedFleet()
    run_threads(ledger, small_plan, fleet, "core")
    _, servers = run_threads(ledger, small_plan, fleet, "icu", hosts=("gw-01", "db-01"))
    assert servers.ok
    _, whole = run_threads(ledger, small_plan, fleet, "icu")
    assert whole.ok, [(p.host, p.status, p.reason) for p in whole.hosts.values()]
    assert ledger.host("ws-01").state is HostState.ONLINE


def test_a_stage_longer_than_the_lease_keeps_the_host(engine: Engine, small_plan: Plan, clock: Clock) -> None:
    """A live install outlasts a lease: the run's heartbeat renews it while the stage runs, so no other
    run can take the host over meanwhile. The ledger's clock is moved by hand, well past the first lease."""
    ledger = Ledger(engine, clock=clock)
    ledger.sync_inventory(small_plan.estate, small_plan)
    entered, finish = threading.Event(), threading.Event()

    class SlowWipe(SimulatedFleet):
        def wipe(self, host: Host) -> None:
            entered.set()
            assert finish.wait(30)

    settings = CampaignSettings(
        lease_seconds=0.6, retries=Retries(backoff_minutes=(0.0,)), poll_seconds=0.02, dependency_timeout=0
    )
    outcome: list[HostState] = []
    worker = threading.Thread(
        target=lambda: outcome.append(
            run_threads(ledger, small_plan, SlowWipe(), "icu", hosts=("gw-01",), settings=settings)[1]
            .hosts["gw-01"]
            .state
        )
    )
    # With the core wave online in this ledger gw-01 could finish; here only its wipe matters.
    worker.start()
    assert entered.wait(10)
    other = ledger.start_run("rehearsal", "core", "another operator")
    for _ in range(5):  # 5 x 0.4 s of ledger time: three times the lease
        clock.advance(0.4)
        renewed = clock.now + dt.timedelta(seconds=0.6)
        deadline = time.monotonic() + 10
        while ledger.host("gw-01").lease_expires != renewed:
            assert time.monotonic() < deadline, "the lease was not renewed during the stage"
            time.sleep(0.02)
        with pytest.raises(LeaseHeld):
            ledger.acquire("gw-01", other, 60)
    finish.set()
    worker.join(30)
    assert outcome  # the run ended (gw-01 then waits for dc-01, outside the run, until the timeout)


def _ledger(directory: Path, the_plan: Plan, url: str | None = None) -> Ledger:
    engine = make_engine(url or f"sqlite:///{directory / 'campaign.sqlite3'}")
    _ENGINES.append(engine)
    upgrade(engine)
    ledger = Ledger(engine)
    ledger.sync_inventory(the_plan.estate, the_plan)
    return ledger


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_sample_estate_with_every_host_in_flight(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """All 1,700 hosts at once, no worker limit: on SQLite and on PostgreSQL (where pool claims used to
    deadlock), no host fails for the database, no claim is left held, every stage ran once."""
    the_plan = plan(load_estate(Path(__file__).resolve().parents[2] / "inventory"))
    url = request.getfixturevalue("ledger_url_postgresql") if backend == "postgresql" else None
    ledger = _ledger(tmp_path, the_plan, url)
    _, summary = run_threads(ledger, the_plan, SimulatedFleet())
    assert summary.ok, Counter(p.status for p in summary.hosts.values())
    assert summary.count(Status.ONLINE) == 1700
    with ledger._engine.connect() as db:
        claims = db.execute(select(PoolClaimRow.__table__)).all()
    assert claims
    assert all(c.released_at is not None for c in claims)
    assert all(c.granted_at is not None for c in claims)
    wipes = Counter(
        t.host
        for n in ("ws-icu-arl-001", "dc-dc1-01")
        for t in ledger.history(n).transitions
        if t.event == "start_wipe"
    )
    assert set(wipes.values()) == {1}


def test_a_host_held_by_a_live_run_is_waited_for_visibly_never_failed(
    ledger: Ledger, small_plan: Plan
) -> None:
    other = ledger.start_run("rehearsal", "icu", "another operator")
    lease = ledger.acquire("gw-01", other, 300)
    reasons: list[str] = []
    seen_held = threading.Event()

    def seen(progress: HostProgress) -> None:
        if progress.host == "gw-01" and progress.reason:
            reasons.append(progress.reason)
            if "is held by run" in progress.reason:
                seen_held.set()

    results: list[object] = []
    thread = threading.Thread(
        target=lambda: results.append(run_threads(ledger, small_plan, SimulatedFleet(), on_change=seen))
    )
    thread.start()
    beat = threading.Event()

    def heartbeat() -> None:  # the other run is alive
        while not beat.wait(0.05):
            ledger.heartbeat(other, 300)

    beating = threading.Thread(target=heartbeat)
    beating.start()
    assert seen_held.wait(20), reasons
    assert f"waiting: host gw-01 is held by run {other}, alive" in next(r for r in reasons if "held" in r)
    beat.set()
    beating.join()
    ledger.release(lease)  # the other run lets go: ours takes it on its next look
    thread.join(60)
    assert results
    assert ledger.host("gw-01").state is HostState.ONLINE
    assert [t.event for t in ledger.history("gw-01").transitions].count("start_wipe") == 1


@pytest.mark.slow
def test_postgresql_connections_terminated_mid_run_fail_no_host(
    ledger_url_postgresql: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pg_terminate_backend on every connection of the ledger, every half second, for the whole run:
    each transaction that loses its connection is run again; no host fails for the database."""
    the_plan = plan(load_estate(Path(__file__).resolve().parents[2] / "inventory"))
    ledger = _ledger(tmp_path, the_plan, ledger_url_postgresql)
    with terminating(ledger_url_postgresql, every=0.5) as killed:
        _, summary = run_threads(ledger, the_plan, SimulatedFleet(), "core", "icu")
    assert sum(killed) > 10, killed  # connections really were cut, many times
    assert summary.ok, [(p.host, p.error) for p in summary.hosts.values() if p.status is not Status.ONLINE]
    assert any("retrying" in r.message for r in caplog.records)
    for name in the_plan.wave("icu").hosts[:20]:
        events = [t.event for t in ledger.history(name).transitions]
        assert events.count("start_wipe") == 1, (name, events)
    # Read by the independent audit: every log replays (no event lost or recorded twice by a retried
    # transaction whose commit was lost with its connection), nothing left held.
    found = audit(ledger._engine, quiet=True)
    assert found.ok, found.problems[:10]
