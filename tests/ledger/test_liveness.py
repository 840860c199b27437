"""Runs heartbeat; a dead run's hosts and pool slots are taken over at once, a live run's waited for.
On SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update

from restore_flows.errors import LeaseHeld, LeaseLost
from restore_flows.ledger.liveness import process_alive
from restore_flows.ledger.pools import CLAIMS, Request
from restore_flows.ledger.repository import RUNS, Ledger
from restore_flows.planning import Plan
from restore_flows.states import Event

HOST = "ws-icu-arl-001"
OTHER = "ws-icu-arl-002"


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def clocked(engine: Engine, sample_plan: Plan) -> tuple[Ledger, Clock]:
    clock = Clock()
    ledger = Ledger(engine, clock=clock, stale_seconds=30)
    ledger.sync_inventory(sample_plan.estate, sample_plan)
    return ledger, clock


def _elsewhere(engine: Engine, run_id: str) -> None:
    """Pretend the run's process is on another machine: only its heartbeat says whether it lives."""
    with engine.begin() as db:
        db.execute(update(RUNS).where(RUNS.c.id == run_id).values(process="another-machine:1"))


def test_a_live_runs_host_is_held_and_a_silent_runs_taken_over_at_once(
    clocked: tuple[Ledger, Clock], engine: Engine
) -> None:
    ledger, clock = clocked
    first = ledger.start_run("rehearsal", "icu", "a")
    _elsewhere(engine, first)
    lease = ledger.acquire(HOST, first, seconds=300)
    second = ledger.start_run("rehearsal", "icu", "b")
    clock.advance(20)
    ledger.heartbeat(first, 300)
    clock.advance(20)  # heard from 20 s ago: alive
    ledger.heartbeat(second, 300)
    with pytest.raises(LeaseHeld, match=f"held by run {first}, alive"):
        ledger.acquire(HOST, second, seconds=300)
    assert ledger.run(first).alive
    clock.advance(11)  # 31 s of silence: dead, although its lease has minutes left
    ledger.heartbeat(second, 300)
    taken = ledger.acquire(HOST, second, seconds=300)
    assert taken.token > lease.token
    assert not ledger.run(first).alive
    # The dead run's late write is refused by the fencing token.
    with pytest.raises(LeaseLost):
        ledger.apply(lease, Event.START_WIPE, actor="a")
    assert [r.id for r in ledger.reap()] == [first]
    assert ledger.run(first).outcome == "lost"


def test_a_run_whose_process_is_gone_on_this_machine_is_dead_at_once(clocked: tuple[Ledger, Clock]) -> None:
    ledger, _ = clocked
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    run = ledger.start_run("rehearsal", "icu", "a")
    with ledger._engine.begin() as db:
        db.execute(update(RUNS).where(RUNS.c.id == run).values(process=f"{_machine()}:{gone.stdout.strip()}"))
    ledger.acquire(HOST, run, seconds=300)
    other = ledger.start_run("rehearsal", "icu", "b")
    assert not ledger.run(run).alive  # no need to wait for its heartbeat to go stale
    assert ledger.acquire(HOST, other, seconds=300).run_id == other
    assert ledger.run(run).outcome == "crashed"  # said so by the run that took the host over
    assert ledger.reap() == []


def test_a_run_whose_process_ended_unreaped_is_dead_at_once(clocked: tuple[Ledger, Clock]) -> None:
    """A killed CLI whose parent died first stays a zombie for ever where init reaps nothing (some
    containers): ``kill(pid, 0)`` still finds it, yet it has ended."""
    ledger, _ = clocked
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        while Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            time.sleep(0.01)  # not a timing: until the child has exited, unreaped
        assert not process_alive(zombie.pid)
        assert process_alive(os.getpid())
        run = ledger.start_run("rehearsal", "icu", "a")
        with ledger._engine.begin() as db:
            db.execute(update(RUNS).where(RUNS.c.id == run).values(process=f"{_machine()}:{zombie.pid}"))
        ledger.acquire(HOST, run, seconds=300)
        other = ledger.start_run("rehearsal", "icu", "b")
        assert not ledger.run(run).alive
        assert ledger.acquire(HOST, other, seconds=300).run_id == other
    finally:
        zombie.wait()


def test_a_dead_runs_pool_slots_are_given_back_at_once(clocked: tuple[Ledger, Clock], engine: Engine) -> None:
    ledger, clock = clocked
    pool = "imaging-arl"
    capacity = ledger.slots.usage()[pool][0]
    dead = ledger.start_run("rehearsal", "icu", "a")
    _elsewhere(engine, dead)
    held = [Request(f"ws-{n}", "reimage", (pool,), 1) for n in range(capacity)]
    assert len(ledger.slots.grant(dead, held, 300).granted) == capacity
    live = ledger.start_run("rehearsal", "lab", "b")
    assert ledger.slots.grant(live, [Request("x", "reimage", (pool,), 5)], 300).granted == ()
    clock.advance(31)
    ledger.heartbeat(live, 300)
    assert [r.host for r in ledger.slots.grant(live, [Request("x", "reimage", (pool,), 5)], 300).granted] == [
        "x"
    ]
    assert ledger.slots.taken_by_others(live) == {}


def _machine() -> str:
    return socket.gethostname()


def test_what_dead_runs_still_hold_is_given_back_when_they_are_reaped(
    clocked: tuple[Ledger, Clock], engine: Engine
) -> None:
    """A run found dead because another took one of its hosts over keeps its other leases (and one
    killed after its last host came online keeps that lease, which no run asks for again): reaping
    gives back every lease and pool claim of every ended run, so that nothing is left held."""
    ledger, clock = clocked
    dead = ledger.start_run("rehearsal", "icu", "a")
    _elsewhere(engine, dead)
    ledger.acquire(HOST, dead, seconds=300)
    ledger.acquire(OTHER, dead, seconds=300)
    pool = "imaging-arl"
    assert ledger.slots.grant(dead, [Request(OTHER, "reimage", (pool,), 1)], 300).granted
    clock.advance(31)
    live = ledger.start_run("rehearsal", "icu", "b")
    assert ledger.acquire(HOST, live, seconds=300).run_id == live  # takes one host over
    ledger.reap()
    assert ledger.host(OTHER).lease_run is None
    assert ledger.host(HOST).lease_run == live  # a live run's lease is its own
    assert ledger.slots.taken_by_others(live) == {}
    with engine.connect() as db:
        open_claims = db.execute(
            select(func.count()).select_from(CLAIMS).where(CLAIMS.c.released_at.is_(None))
        ).scalar_one()
    assert open_claims == 0
