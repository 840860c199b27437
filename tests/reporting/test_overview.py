"""The overview: counts per wave, site and department from the ledger, and what holds progress back."""

from __future__ import annotations

import threading
import time

from restore_flows.drivers.fake import SimulatedFleet
from restore_flows.ledger.status import bucket
from restore_flows.reporting.overview import BUCKETS, Hold, overview, plan_pace, planned
from restore_flows.states import HostState
from tests.execution.conftest import run_threads
from tests.reporting.scenarios import HOSTILE_ERROR, HOSTILE_REASON, PausedFleet, Scenario


def _expected(scenario: Scenario, names: list[str], blocked: set[str]) -> dict[str, int]:
    """The buckets counted straight from the ledger's states: what the overview must agree with."""
    states = scenario.ledger.states()
    counts = dict.fromkeys(BUCKETS, 0)
    for name in names:
        coarse = bucket(states[name])
        counts["blocked" if name in blocked and coarse not in ("online", "failed") else coarse] += 1
    return counts


def test_counts_per_wave_site_and_department_match_the_ledger(trouble: Scenario) -> None:
    view = overview(trouble.ledger, trouble.plan)
    blocked = {"ws-brg-01", "ws-brg-02", "ws-brg-03"}
    states = trouble.ledger.states()
    assert {n for n in blocked if states[n] is HostState.REIMAGED} == blocked
    for planned_wave in trouble.plan.waves:
        wave = view.wave(planned_wave.name)
        counts = wave.counts.to_json()
        expected = _expected(trouble, list(planned_wave.hosts), blocked)
        assert {k: counts[k] for k in BUCKETS} == expected, planned_wave.name
        assert wave.counts.total == len(planned_wave.hosts)
    icu = view.wave("icu")
    assert (icu.counts.online, icu.counts.failed, icu.counts.blocked, icu.counts.percent) == (4, 1, 3, 50.0)
    assert icu.sites["arl"].online == 4
    assert (icu.sites["brg"].failed, icu.sites["brg"].blocked) == (1, 3)
    assert set(icu.departments) == {"icu"}
    assert view.wave("rest").departments["admin"].failed == 1  # on hold: an operator must act
    assert view.sites["brg"]["admin"].total == 2
    assert view.estate.total == len(states)
    assert view.estate.online == sum(1 for s in states.values() if s is HostState.ONLINE)


def test_eta_comes_from_the_forecast_and_is_none_where_an_operator_must_act(trouble: Scenario) -> None:
    view = overview(trouble.ledger, trouble.plan)
    core = view.wave("core")
    assert core.done
    assert core.finished_at is not None
    icu = view.wave("icu")
    assert icu.eta_minutes is None
    assert set(icu.will_not_finish) == {"gw-brg", "ws-brg-01", "ws-brg-02", "ws-brg-03"}
    assert view.eta_minutes is None


def test_failed_and_held_hosts_come_first_with_their_last_error(trouble: Scenario) -> None:
    view = overview(trouble.ledger, trouble.plan)
    people = [b for b in view.blockers if b.needs_people]
    assert [(b.host, b.hold) for b in people] == [("gw-brg", Hold.FAILED), ("pc-brg-02", Hold.ON_HOLD)]
    gateway, held = people
    assert HOSTILE_ERROR in gateway.reason
    assert gateway.holds_back == ("ws-brg-01", "ws-brg-02", "ws-brg-03")
    assert gateway.state is HostState.REIMAGE_FAILED
    assert held.reason == HOSTILE_REASON
    assert held.actor == "ops <night>"


def test_a_host_others_wait_for_is_named_with_who_waits(fresh: Scenario) -> None:
    """While the Arlon gateway is being verified, its three workstations are imaged and wait for it."""
    fleet = PausedFleet()
    thread = threading.Thread(target=run_threads, args=(fresh.ledger, fresh.plan, fleet))
    thread.start()
    try:
        assert fleet.inside.wait(30)
        deadline = time.monotonic() + 30
        waiting = [f"ws-arl-0{n}" for n in (1, 2, 3)]
        while any(fresh.ledger.states()[n] is not HostState.REIMAGED for n in waiting):
            assert time.monotonic() < deadline, fresh.ledger.states()
            time.sleep(0.02)
        view = overview(fresh.ledger, fresh.plan)
        waited = {b.host: b for b in view.blockers if b.hold is Hold.DEPENDENCY}
        # (the Brugge gateway may be mid-way too, its workstations waiting for it as well)
        assert waited["gw-arl"].holds_back == tuple(waiting)
        assert waited["gw-arl"].reason == "verify running"
        assert waited["gw-arl"].eta_minutes is not None
        assert not (set(waited) - {"gw-arl", "gw-brg"})
        assert view.wave("icu").counts.in_progress >= 4  # the gateway and its three workstations
    finally:
        fleet.go.set()
        thread.join(60)
    after = overview(fresh.ledger, fresh.plan)
    assert not [b for b in after.blockers if b.hold is Hold.DEPENDENCY]
    assert after.wave("icu").done


def test_a_host_under_forensic_hold_without_evidence_needs_the_forensic_team(fresh: Scenario) -> None:
    view = overview(fresh.ledger, fresh.plan)
    evidence = [b for b in view.blockers if b.hold is Hold.EVIDENCE]
    assert [b.host for b in evidence] == ["dc-01"]
    # Everything depends on the domain controller: the whole estate waits for its evidence.
    assert len(evidence[0].holds_back) == view.estate.total - 1
    assert view.estate.waiting == view.estate.total


def test_the_plan_and_the_timeline_of_a_finished_restore(fresh: Scenario) -> None:
    _run, summary = run_threads(fresh.ledger, fresh.plan, SimulatedFleet())
    assert summary.ok
    view = overview(fresh.ledger, fresh.plan, plan_forecast=planned(fresh.plan))
    assert view.done
    assert view.eta_minutes == 0.0
    for wave in view.waves:
        assert wave.done
        assert wave.first_started is not None
        assert wave.finished_at is not None
        assert wave.first_started <= wave.online_times[0] <= wave.finished_at
        assert wave.online_at(0.5) is not None
        assert wave.planned_finish_minutes is not None
        assert wave.planned_finish_minutes > 0
    assert view.wave("core").planned_finish_minutes < view.wave("icu").planned_finish_minutes  # type: ignore[operator]
    json = view.to_json()
    assert json["done"] is True
    assert [w["name"] for w in json["waves"]] == ["core", "icu", "rest"]
    assert all(w["planned_finish_at"] for w in json["waves"])


def test_a_rehearsals_plan_is_drawn_at_the_pace_its_ledger_shows(fresh: Scenario) -> None:
    assert plan_pace(fresh.ledger, fresh.plan, rehearsal=True) == 1.0  # nothing observed yet
    _run, summary = run_threads(fresh.ledger, fresh.plan, SimulatedFleet())
    assert summary.ok
    # The simulated stages took milliseconds for planned minutes: the rehearsal ran far faster.
    assert plan_pace(fresh.ledger, fresh.plan, rehearsal=True) < 0.01
    assert plan_pace(fresh.ledger, fresh.plan, rehearsal=False) == 1.0
