"""The estate-wide read queries for reports, on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Engine

from restore_flows.ledger import queries
from tests.conftest import WriteInventory
from tests.reporting.scenarios import (
    EVIDENCE_DIGEST,
    HOSTILE_APPROVER,
    HOSTILE_ERROR,
    HOSTILE_LOCATION,
    HOSTILE_REASON,
    on_engine,
    troubled,
)


def test_every_approval_with_what_it_covered(engine: Engine, write_inventory: WriteInventory) -> None:
    scenario = on_engine(engine, write_inventory)
    troubled(scenario)
    found = queries.approvals(scenario.ledger)
    # The run approved each wave by name; the rehearsal run of 'rest' was automatic.
    named = [a for a in found if not a.approval.automatic]
    assert {a.approval.scope for a in named} == {"core", "icu", "rest"}
    assert all(a.approval.approver == HOSTILE_APPROVER for a in named)
    assert all(a.run_mode == "rehearsal" for a in found)
    covered = {a.approval.scope: a.hosts for a in named}
    assert covered == {"core": 1, "icu": 8, "rest": 1}  # pc-brg-02 is on hold: not approved for wiping
    for scope in named:
        run_hosts = scenario.ledger.approved_hosts(scope.approval.run_id)
        assert len(run_hosts) == sum(a.hosts for a in named)
    automatic = [a for a in found if a.approval.automatic]
    assert [(a.approval.scope, a.hosts) for a in automatic] == [("rest", 1)]
    assert [a.approval.approved_at for a in found] == sorted(a.approval.approved_at for a in found)


def test_every_evidence_record(engine: Engine, write_inventory: WriteInventory) -> None:
    scenario = on_engine(engine, write_inventory)
    troubled(scenario)
    found = queries.evidence(scenario.ledger)
    assert [e.host for e in found] == ["dc-01", "gw-brg"]
    by_hand = found[1]
    assert (by_hand.sha256, by_hand.location, by_hand.custodian) == (
        EVIDENCE_DIGEST,
        HOSTILE_LOCATION,
        "CERT <team>",
    )
    assert found[0].run_id is not None  # captured by the run


def test_the_last_transition_of_each_named_host(engine: Engine, write_inventory: WriteInventory) -> None:
    scenario = on_engine(engine, write_inventory)
    troubled(scenario)
    last = queries.last_transitions(scenario.ledger, ["gw-brg", "pc-brg-02", "dc-01", "no-such-host"])
    assert set(last) == {"gw-brg", "pc-brg-02", "dc-01"}
    assert last["gw-brg"].event == "reimage_failed"
    assert HOSTILE_ERROR in (last["gw-brg"].detail or "")
    assert (last["pc-brg-02"].event, last["pc-brg-02"].detail) == ("hold", HOSTILE_REASON)
    assert last["dc-01"].event == "release_done"
    for name, record in last.items():
        assert record == scenario.ledger.history(name).transitions[-1]


def test_first_and_last_stage_per_wave(engine: Engine, write_inventory: WriteInventory) -> None:
    scenario = on_engine(engine, write_inventory)
    assert queries.wave_stage_times(scenario.ledger) == {}
    troubled(scenario)
    times = queries.wave_stage_times(scenario.ledger)
    assert set(times) == {"core", "icu", "rest"}
    for wave in scenario.plan.waves:
        attempts = [a for n in wave.hosts for a in scenario.ledger.history(n).attempts]
        assert times[wave.name].first_started == min(a.started_at for a in attempts)
        assert times[wave.name].last_ended == max(a.ended_at for a in attempts if a.ended_at)
