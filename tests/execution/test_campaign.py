"""The per-host pipeline and the dispatcher, on the simulated fleet, without Prefect."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import Engine

from restore_flows.dispatch import HostProgress, RunSummary, Status
from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.errors import LeaseHeld
from restore_flows.inventory.estate import Host
from restore_flows.inventory.models import Stage
from restore_flows.ledger.repository import Ledger
from restore_flows.pipeline import HostPipeline, PipelineSettings
from restore_flows.planning import Plan
from restore_flows.states import Event, HostState
from restore_flows.waves import WaveRequest, approval_summary, run_wave_threads
from tests.restore.conftest import Clock

FAST = PipelineSettings(backoff_seconds=(0.0,), slot_poll_seconds=0.01)
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


def _run(ledger: Ledger, the_plan: Plan, fleet: SimulatedFleet, wave: str) -> tuple[str, RunSummary]:
    return run_wave_threads(ledger, the_plan, fleet, WaveRequest(wave), workers=4, settings=FAST)


def test_clean_waves_bring_every_host_online(ledger: Ledger, small_plan: Plan) -> None:
    fleet = SimulatedFleet()
    for wave in ("core", "icu"):
        _run_id, summary = _run(ledger, small_plan, fleet, wave)
        assert summary.ok, [(p.host, p.status, p.reason) for p in summary.hosts.values()]
    states = ledger.states()
    assert set(states.values()) == {HostState.ONLINE}
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
    assert all(a.automatic for a in dc.approvals)


def test_failed_host_blocks_only_its_dependents(ledger: Ledger, small_plan: Plan) -> None:
    fleet = SimulatedFleet(broken={"gw-02": Stage.REIMAGE})
    _run(ledger, small_plan, fleet, "core")
    _, summary = _run(ledger, small_plan, fleet, "icu")
    assert not summary.ok
    assert summary.hosts["gw-02"].status is Status.FAILED
    assert "simulated permanent failure" in (summary.hosts["gw-02"].error or "")
    assert ledger.host("gw-02").state is HostState.REIMAGE_FAILED
    blocked = summary.hosts["ws-07"]
    assert blocked.status is Status.BLOCKED
    assert blocked.reason is not None
    assert blocked.reason.startswith("blocked: gw-02 (wave icu) failed")
    assert ledger.host("ws-07").state is HostState.COMPROMISED  # never touched
    others = [p for n, p in summary.hosts.items() if n not in ("gw-02", "ws-07")]
    assert all(p.status is Status.ONLINE for p in others)


def test_retries_with_seeded_failures(ledger: Ledger, small_plan: Plan) -> None:
    fleet = SimulatedFleet(fail_rates={Stage.WIPE: 0.5, Stage.VERIFY: 0.3}, seed=7)
    _run(ledger, small_plan, fleet, "core")
    _, summary = _run(ledger, small_plan, fleet, "icu")
    attempts = Counter((a.stage, a.number > 1) for n in summary.hosts for a in ledger.history(n).attempts)
    assert attempts[("wipe", True)] > 0  # some wipes needed a second attempt
    for name, progress in summary.hosts.items():
        history = ledger.history(name)
        if progress.status is Status.ONLINE:
            assert history.transitions[-1].to_state is HostState.ONLINE
        elif progress.status is Status.FAILED:  # out of attempts: waits for an operator
            assert progress.state.value.endswith("_failed"), (name, progress)
        else:  # behind a failed dependency: never touched
            assert progress.status is Status.BLOCKED
            assert history.transitions[-1].event == "enroll"
    # The same seed draws the same failures whatever the thread timing; another seed differs.
    hosts = list(small_plan.estate.hosts.values())
    draws = [fleet._draw(h, Stage.WIPE, 1, "fail") for h in hosts]
    same = SimulatedFleet(seed=7)
    other = SimulatedFleet(seed=8)
    assert draws == [same._draw(h, Stage.WIPE, 1, "fail") for h in hosts]
    assert draws != [other._draw(h, Stage.WIPE, 1, "fail") for h in hosts]


def test_dependency_in_an_earlier_wave_is_waited_for_visibly(ledger: Ledger, small_plan: Plan) -> None:
    fleet = SimulatedFleet()
    waiting = threading.Event()
    reasons: list[str] = []

    def seen(progress: HostProgress) -> None:
        reasons.append(f"{progress.host}: {progress.status.value}: {progress.reason}")
        if progress.host == "gw-01" and progress.status is Status.WAITING:
            waiting.set()

    results: list[RunSummary] = []
    icu = threading.Thread(
        target=lambda: results.append(
            run_wave_threads(
                ledger, small_plan, fleet, WaveRequest("icu"), workers=4, settings=FAST, on_change=seen
            )[1]
        )
    )
    icu.start()
    assert waiting.wait(10)
    assert "gw-01: waiting: waiting for dc-01 (wave core) to be online" in reasons
    assert ledger.host("gw-01").state is HostState.COMPROMISED
    _, core = _run(ledger, small_plan, fleet, "core")  # the earlier wave comes online...
    icu.join(30)
    assert core.ok
    assert results
    assert results[0].ok


def test_dependency_that_never_comes_online_blocks_after_the_timeout(
    ledger: Ledger, small_plan: Plan
) -> None:
    _, summary = run_wave_threads(
        ledger,
        small_plan,
        SimulatedFleet(),
        WaveRequest("icu"),
        workers=4,
        settings=FAST,
        dependency_timeout=0.0,
    )
    reason = summary.hosts["gw-01"].reason or ""
    assert reason == "waiting for dc-01 (wave core) to be online: gave up after 0 s"
    assert summary.hosts["ws-01"].status is Status.BLOCKED
    assert re.match(
        r"blocked: (gw|db)-01 \(wave icu\) blocked: waiting for dc-01", summary.hosts["ws-01"].reason or ""
    )
    assert not summary.ok
    assert set(ledger.states().values()) == {HostState.COMPROMISED}


def test_ioc_finding_quarantines(ledger: Ledger, small_plan: Plan) -> None:
    fleet = SimulatedFleet(ioc_rate=1.0)
    _, summary = _run(ledger, small_plan, fleet, "core")
    assert summary.hosts["dc-01"].status is Status.FAILED
    assert ledger.host("dc-01").state is HostState.QUARANTINED
    assert "IOC" in (summary.hosts["dc-01"].error or "")


def _interrupt(ledger: Ledger, clock: Clock, host: str) -> str:
    """A run that started wiping the host, then vanished (its lease runs out)."""
    run = ledger.start_run("rehearsal", "icu", "lost")
    ledger.record_approval(run, "icu", [host], "Dr. A", "shown")
    lease = ledger.acquire(host, run, 60)
    ledger.apply(lease, Event.START_WIPE, actor="lost")
    clock.advance(120)
    return run


@pytest.mark.parametrize("finished", [True, False])
def test_interrupted_wipe_is_resolved_from_facts_never_repeated(
    ledger: Ledger, small_plan: Plan, clock: Clock, finished: bool
) -> None:
    _interrupt(ledger, clock, "gw-01")
    assert ledger.interrupted() == [("gw-01", "wipe")]
    fleet = SimulatedFleet(time_scale=1.0 if not finished else 0.0, clock=clock)
    run = ledger.start_run("rehearsal", "icu", "resume")
    ledger.record_approval(run, "icu", ["gw-01"], "Dr. A", "shown")
    outcome = HostPipeline(ledger, fleet, run, "resume", FAST).run(small_plan.estate.hosts["gw-01"])
    events = [t.event for t in ledger.history("gw-01").transitions]
    assert events.count("start_wipe") == 1
    assert ledger.interrupted() == []
    if finished:
        assert outcome.online
        assert events[2] == "wipe_done"
    else:
        assert outcome.state is HostState.WIPE_FAILED
        assert events[2] == "interrupted"
        assert outcome.error == "wipe failed before this run"  # left for an operator, not retried


def test_approval_summary_lists_forensic_holds(ledger: Ledger, small_plan: Plan) -> None:
    text = approval_summary(small_plan, ["dc-01", "gw-01"], ledger)
    assert "2 host(s) will be wiped" in text
    assert "dc-01: evidence NOT yet registered" in text


def test_slots_go_to_the_highest_priority_waiter_across_runs(ledger: Ledger, clock: Clock) -> None:
    slots = ledger.slots
    holder, granted = slots.request("imaging-arl", "a", "run-lab", "reimage", 3_000_000, 60)
    _second, granted_too = slots.request("imaging-arl", "b", "run-lab", "reimage", 3_000_001, 60)
    assert granted
    assert granted_too
    lab, lab_now = slots.request("imaging-arl", "c", "run-lab", "reimage", 3_000_002, 60)
    icu, icu_now = slots.request("imaging-arl", "d", "run-icu", "reimage", 1_000_005, 60)
    assert not lab_now
    assert not icu_now
    slots.release([holder])
    assert not slots.try_grant(lab, "imaging-arl", 60)  # the ICU claim waits with a better priority
    assert slots.try_grant(icu, "imaging-arl", 60)
    assert slots.usage()["imaging-arl"] == (2, 2, 1)
    # A crashed run's slots come back when its claims expire; a live waiter renews its claim.
    clock.advance(30)
    assert not slots.try_grant(lab, "imaging-arl", 60)
    clock.advance(31)
    assert slots.try_grant(lab, "imaging-arl", 60)
    assert slots.usage()["imaging-arl"] == (2, 1, 0)


def test_hold_waits_and_wakes_on_release(ledger: Ledger) -> None:
    slots = ledger.slots
    first, _ = slots.request("imaging-arl", "a", "r", "wipe", 1, 60)
    second, _ = slots.request("imaging-arl", "b", "r", "wipe", 1, 60)
    entered = threading.Event()

    def waiter() -> None:
        with slots.hold(["imaging-arl"], host="c", run_id="r", stage="wipe", priority=1, seconds=60, poll=5):
            entered.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert not entered.wait(0.05)
    slots.release([first])  # notifies in-process waiters at once, well before the 5 s poll
    assert entered.wait(2)
    thread.join(2)
    slots.release([second])
    assert slots.usage()["imaging-arl"] == (2, 0, 0)


def test_dependencies_already_online_do_not_hold_a_resumed_run(ledger: Ledger, small_plan: Plan) -> None:
    # A resumed (or narrowed) run finds some of its own hosts online already; dependents still start.
    fleet = SimulatedFleet()
    _run(ledger, small_plan, fleet, "core")
    _, servers = run_wave_threads(
        ledger, small_plan, fleet, WaveRequest("icu", hosts=("gw-01", "db-01")), workers=4, settings=FAST
    )
    assert servers.ok
    _, whole = _run(ledger, small_plan, fleet, "icu")
    assert whole.ok, [(p.host, p.status, p.reason) for p in whole.hosts.values()]
    assert ledger.host("ws-01").state is HostState.ONLINE


def test_a_stage_longer_than_the_lease_keeps_the_host(engine: Engine, small_plan: Plan, clock: Clock) -> None:
    """A live install outlasts a lease: the run renews it while the stage runs, so no other run can
    take the host over meanwhile. The ledger's clock is moved by hand, well past the first lease."""
    ledger = Ledger(engine, clock=clock)
    ledger.sync_inventory(small_plan.estate, small_plan)
    entered, finish = threading.Event(), threading.Event()

    class SlowWipe(SimulatedFleet):
        def wipe(self, host: Host) -> None:
            entered.set()
            assert finish.wait(30)

    run_id = ledger.start_run("rehearsal", "core", "test")
    ledger.record_approval(run_id, "core", ["gw-01"], "Dr. A", "gw-01")
    settings = PipelineSettings(lease_seconds=0.6, backoff_seconds=(0.0,), slot_poll_seconds=0.01)
    pipeline = HostPipeline(ledger, SlowWipe(), run_id, "test", settings)
    outcome: list[HostState] = []
    worker = threading.Thread(
        target=lambda: outcome.append(pipeline.run(small_plan.estate.hosts["gw-01"]).state)
    )
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
    assert outcome == [HostState.ONLINE]
