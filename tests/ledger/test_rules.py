"""Safety rules enforced by the ledger itself, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text

from restore_flows.errors import LeaseHeld, SafetyViolation, UnknownHost
from restore_flows.ledger.records import Lease
from restore_flows.ledger.repository import Ledger
from restore_flows.states import Event, HostState, IllegalTransition

HELD = "dc-arl-01"  # under forensic hold in the sample estate
PLAIN = "ws-icu-arl-001"
DIGEST = "0123456789abcdef" * 4
PIPELINE = [
    Event.START_WIPE,
    Event.WIPE_DONE,
    Event.START_REIMAGE,
    Event.REIMAGE_DONE,
    Event.START_VERIFY,
    Event.VERIFY_PASSED,
    Event.START_RELEASE,
    Event.RELEASE_DONE,
]


def _approved(ledger: Ledger, *hosts: str) -> tuple[str, dict[str, Lease]]:
    run = ledger.start_run("rehearsal", "test", "tester")
    ledger.record_approval(run, "test", hosts, "Dr. Approver", "2 hosts")
    return run, {host: ledger.acquire(host, run, 60) for host in hosts}


def test_forensic_hold_needs_evidence_before_wiping(ledger: Ledger) -> None:
    assert ledger.host(HELD).forensic_hold
    _, leases = _approved(ledger, HELD)
    with pytest.raises(SafetyViolation, match="forensic hold"):
        ledger.apply(leases[HELD], Event.START_WIPE, actor="run")
    assert ledger.host(HELD).state is HostState.COMPROMISED
    ledger.add_evidence(HELD, DIGEST, "evidence locker 3", "Insp. Meyer", run_id=leases[HELD].run_id)
    assert ledger.apply(leases[HELD], Event.START_WIPE, actor="run") is HostState.WIPING


def test_evidence_registered_by_hand_moves_an_idle_host(ledger: Ledger) -> None:
    record = ledger.add_evidence(HELD, DIGEST.upper(), "locker 3", "Insp. Meyer")
    assert record.sha256 == DIGEST
    assert ledger.host(HELD).state is HostState.EVIDENCE_CAPTURED
    with pytest.raises(SafetyViolation, match="SHA-256"):
        ledger.add_evidence(HELD, "not-a-digest", "locker", "x")


def test_capture_by_driver_needs_a_record(ledger: Ledger) -> None:
    _, leases = _approved(ledger, HELD)
    lease = leases[HELD]
    ledger.apply(lease, Event.CAPTURE_EVIDENCE, actor="run")
    with pytest.raises(SafetyViolation, match="needs an evidence record"):
        ledger.apply(lease, Event.EVIDENCE_CAPTURED, actor="run")
    ledger.add_evidence(HELD, DIGEST, "//forensics/dc-arl-01.E01", "capture-driver", run_id=lease.run_id)
    assert ledger.apply(lease, Event.EVIDENCE_CAPTURED, actor="run") is HostState.EVIDENCE_CAPTURED
    history = ledger.history(HELD)
    assert [(a.stage, a.outcome) for a in history.attempts] == [("evidence", "succeeded")]


def test_destructive_events_need_an_approval_for_the_run(ledger: Ledger) -> None:
    run = ledger.start_run("live", "icu", "tester")
    lease = ledger.acquire(PLAIN, run, 60)
    with pytest.raises(SafetyViolation, match="needs an approval"):
        ledger.apply(lease, Event.START_WIPE, actor="run")
    # An approval of another run, or of other hosts, does not count.
    other = ledger.start_run("live", "icu", "tester")
    ledger.record_approval(other, "icu", [PLAIN], "Dr. A", "shown")
    ledger.record_approval(run, "icu", ["ws-icu-arl-002"], "Dr. A", "shown")
    with pytest.raises(SafetyViolation, match="needs an approval"):
        ledger.apply(lease, Event.START_WIPE, actor="run")
    ledger.record_approval(run, "icu", [PLAIN], "Dr. A", "shown")
    assert ledger.apply(lease, Event.START_WIPE, actor="run") is HostState.WIPING
    with pytest.raises(SafetyViolation, match="approver"):
        ledger.record_approval(run, "icu", [PLAIN], "  ", "shown")


def test_a_clean_host_is_never_wiped_again_without_recompromise(ledger: Ledger) -> None:
    run, leases = _approved(ledger, PLAIN)
    for event in PIPELINE:
        ledger.apply(leases[PLAIN], event, actor="run")
    assert ledger.host(PLAIN).state is HostState.ONLINE
    ledger.release(leases[PLAIN])
    # The table has no wipe from online; and an operator cannot recompromise without a reason.
    lease = ledger.acquire(PLAIN, run, 60)
    with pytest.raises(IllegalTransition):
        ledger.apply(lease, Event.START_WIPE, actor="run")
    with pytest.raises(SafetyViolation, match="operator's decision"):
        ledger.apply(lease, Event.RECOMPROMISE, actor="run")
    ledger.release(lease)
    with pytest.raises(SafetyViolation, match="needs a reason"):
        ledger.operator_event(PLAIN, Event.RECOMPROMISE, actor="ops", reason=" ")
    assert (
        ledger.operator_event(PLAIN, Event.RECOMPROMISE, actor="ops", reason="EDR alert 4711")
        is HostState.COMPROMISED
    )
    lease = ledger.acquire(PLAIN, run, 60)
    assert ledger.apply(lease, Event.START_WIPE, actor="run") is HostState.WIPING
    events = [t.event for t in ledger.history(PLAIN).transitions]
    assert events.count("start_wipe") == 2
    assert "recompromise" in events


def test_clean_flag_survives_a_hold_round_trip(ledger: Ledger, engine: Engine) -> None:
    # The 'clean' mark is what the wipe rule reads: only recompromise clears it.
    run, leases = _approved(ledger, PLAIN)
    for event in PIPELINE[:6]:
        ledger.apply(leases[PLAIN], event, actor="run")
    ledger.release(leases[PLAIN])
    assert ledger.host(PLAIN).clean
    with engine.begin() as db:  # simulate a state reached by any path while still marked clean
        db.execute(text("UPDATE hosts SET state = 'compromised' WHERE name = :n"), {"n": PLAIN})
    lease = ledger.acquire(PLAIN, run, 60)
    with pytest.raises(SafetyViolation, match="verified clean"):
        ledger.apply(lease, Event.START_WIPE, actor="run")


def test_operator_events_wait_for_a_live_lease(ledger: Ledger) -> None:
    run, leases = _approved(ledger, PLAIN)
    ledger.apply(leases[PLAIN], Event.START_WIPE, actor="run")
    ledger.apply(leases[PLAIN], Event.WIPE_FAILED, actor="run", error="disk not found")
    with pytest.raises(LeaseHeld, match="held by run"):
        ledger.operator_event(PLAIN, Event.RETRY, actor="ops", reason=None)
    ledger.release(leases[PLAIN])
    assert ledger.operator_event(PLAIN, Event.RETRY, actor="ops", reason=None) is HostState.COMPROMISED
    attempts = ledger.history(PLAIN).attempts
    assert [(a.stage, a.number, a.outcome, a.error) for a in attempts] == [
        ("wipe", 1, "failed", "disk not found")
    ]
    lease = ledger.acquire(PLAIN, run, 60)
    ledger.apply(lease, Event.START_WIPE, actor="run")
    assert [a.number for a in ledger.history(PLAIN).attempts] == [1, 2]


def test_leases_are_exclusive_and_reentrant(ledger: Ledger) -> None:
    first = ledger.start_run("rehearsal", "a", "x")
    second = ledger.start_run("rehearsal", "b", "x")
    lease = ledger.acquire(PLAIN, first, 60)
    with pytest.raises(LeaseHeld):
        ledger.acquire(PLAIN, second, 60)
    again = ledger.acquire(PLAIN, first, 60)
    assert again.token > lease.token
    ledger.release(again)
    assert ledger.acquire(PLAIN, second, 60).run_id == second


def test_unknown_host(ledger: Ledger) -> None:
    with pytest.raises(UnknownHost):
        ledger.host("no-such-host")
    with pytest.raises(UnknownHost):
        ledger.acquire("no-such-host", "run", 60)


def test_transition_log_is_append_only_in_the_database(ledger: Ledger, engine: Engine) -> None:
    assert not [name for name in dir(Ledger) if "delete" in name or "update" in name]
    with engine.connect() as db:
        for statement in ("UPDATE transitions SET actor = 'forger'", "DELETE FROM transitions"):
            with pytest.raises(Exception, match="append-only"):
                db.execute(text(statement))
            db.rollback()
    assert ledger.transition_count() == 1700
