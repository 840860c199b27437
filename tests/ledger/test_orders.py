"""The site mode's stage orders: taken once, answered only by the session that took them, dropped
without losing a result that came first; each session's greetings; on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import Engine

from restore_flows.errors import LeaseHeld, OrderWithdrawn
from restore_flows.ledger.orders import OrderState, Outgoing
from restore_flows.ledger.repository import Ledger


def test_an_order_is_taken_once_and_answered_by_its_session(ledger: Ledger) -> None:
    run = ledger.start_run("rehearsal", "campaign", "test")
    first = ledger.orders.send(run, "arl", "ws-arl-1", "wipe", [3, 4])
    second = ledger.orders.send(run, "arl", "ws-arl-2", "wipe", [])
    ledger.orders.send(run, "bas", "ws-bas-1", "wipe", [])

    taken = ledger.orders.take(run, "arl", "s1", limit=1)
    assert [(o.id, o.host, o.claims, o.state) for o in taken] == [
        (first, "ws-arl-1", (3, 4), OrderState.TAKEN)
    ]
    # Another session of the site (one that should not exist) gets only what is left.
    assert [o.id for o in ledger.orders.take(run, "arl", "s2", limit=10)] == [second]
    assert ledger.orders.take(run, "arl", "s1", limit=10) == []
    assert ledger.orders.take(run, "arl", "s1", limit=0) == []

    assert not ledger.orders.answer(first, "s2", '{"x": 1}')  # not its order
    assert ledger.orders.answered([first, second]) == []
    assert ledger.orders.answer(first, "s1", '{"x": 1}')
    assert not ledger.orders.answer(first, "s1", '{"x": 2}')  # answered once
    [done] = ledger.orders.answered([first, second])
    assert (done.id, done.state, done.result) == (first, OrderState.DONE, '{"x": 1}')


def test_dropping_a_lost_session_s_orders_keeps_a_result_that_came_first(ledger: Ledger) -> None:
    run = ledger.start_run("rehearsal", "campaign", "test")
    done = ledger.orders.send(run, "arl", "ws-arl-1", "wipe", [])
    taken = ledger.orders.send(run, "arl", "ws-arl-2", "wipe", [])
    ledger.orders.take(run, "arl", "s1", limit=2)
    queued = ledger.orders.send(run, "arl", "ws-arl-3", "wipe", [])
    ledger.orders.answer(done, "s1", "{}")

    dropped = ledger.orders.drop([done, taken, queued])
    assert {(o.id, o.state) for o in dropped} == {(taken, OrderState.TAKEN), (queued, OrderState.QUEUED)}
    assert [o.id for o in ledger.orders.answered([done, taken, queued])] == [done]
    assert not ledger.orders.answer(taken, "s1", "{}")  # the lost session's late answer is refused
    assert ledger.orders.take(run, "arl", "s2", limit=10) == []  # nor is a dropped order taken again
    assert ledger.orders.drop([taken]) == []


def test_a_session_waits_for_orders_while_its_run_lives(ledger: Ledger) -> None:
    run = ledger.start_run("rehearsal", "campaign", "test")
    assert ledger.orders.run_alive(run)
    ledger.finish_run(run, "completed")
    assert not ledger.orders.run_alive(run)


def test_stages_sent_together_are_queued_each_with_its_id(ledger: Ledger) -> None:
    run = ledger.start_run("rehearsal", "campaign", "test")
    other = ledger.start_run("rehearsal", "campaign", "test")
    hosts = [Outgoing(run, "arl", f"ws-arl-{n}", "wipe", (n,)) for n in (1, 2, 3)]
    ids = ledger.orders.send_all([*hosts, Outgoing(other, "bas", "ws-bas-1", "reimage", ())])
    assert len(set(ids)) == 4
    taken = ledger.orders.take(run, "arl", "s1", limit=10)
    assert [(o.id, o.host, o.claims) for o in taken] == [
        (ids[0], "ws-arl-1", (1,)),
        (ids[1], "ws-arl-2", (2,)),
        (ids[2], "ws-arl-3", (3,)),
    ]
    [theirs] = ledger.orders.take(other, "bas", "s2", limit=10)
    assert (theirs.id, theirs.run_id, theirs.stage) == (ids[3], other, "reimage")
    assert ledger.orders.send_all([]) == []


def test_a_session_waits_longer_for_a_silent_run_when_told_to(engine: Engine) -> None:
    now = [dt.datetime(2026, 12, 3, 3, 0, tzinfo=dt.UTC)]
    ledger = Ledger(engine, clock=lambda: now[0], stale_seconds=30)
    run = ledger.start_run("rehearsal", "campaign", "test")
    now[0] += dt.timedelta(seconds=31)  # its process missed its heartbeats
    assert not ledger.orders.run_alive(run)
    assert ledger.orders.run_alive(run, patience=600)
    now[0] += dt.timedelta(seconds=600)
    assert not ledger.orders.run_alive(run, patience=600)


def test_a_session_s_greetings_are_read_back_by_name(engine: Engine) -> None:
    now = [dt.datetime(2026, 12, 3, 3, 0, tzinfo=dt.UTC)]
    ledger = Ledger(engine, clock=lambda: now[0])
    run = ledger.start_run("rehearsal", "campaign", "test")
    assert ledger.orders.heard(["s1"]) == {}
    ledger.orders.greet(run, "arl", "s1", "arl@vm")
    first = now[0]
    now[0] += dt.timedelta(seconds=5)
    ledger.orders.greet(run, "arl", "s1", "arl@vm")  # again: renewed, not a second row
    ledger.orders.greet(run, "bas", "s2", "bas@vm")
    assert ledger.orders.heard(["s1", "s2", "s3"]) == {"s1": now[0], "s2": now[0]}
    assert first < now[0]


def test_a_retired_session_hears_so_at_its_next_greeting(engine: Engine) -> None:
    ledger = Ledger(engine)
    run = ledger.start_run("rehearsal", "campaign", "test")
    assert ledger.orders.greet(run, "arl", "s1", "arl@vm")
    ledger.orders.retire(run, "arl", "s1")
    ledger.orders.retire(run, "arl", "s2")  # retired before it ever greeted
    assert not ledger.orders.greet(run, "arl", "s1", "arl@vm")
    assert not ledger.orders.greet(run, "arl", "s2", "arl@vm")
    assert ledger.orders.greet(run, "arl", "s3", "arl@vm")
    assert set(ledger.orders.heard(["s1", "s2", "s3"])) == {"s3"}  # the retired do not count


def test_a_retired_session_takes_no_more_orders(ledger: Ledger) -> None:
    # Taken for lost while alive: until its next greeting it would take the orders meant for the
    # session that replaced it.
    run = ledger.start_run("rehearsal", "campaign", "test")
    order = ledger.orders.send(run, "arl", "ws-arl-1", "wipe", [])
    ledger.orders.retire(run, "arl", "s1")
    assert ledger.orders.take(run, "arl", "s1", limit=10) == []
    assert [o.id for o in ledger.orders.take(run, "arl", "s2", limit=10)] == [order]


def test_a_host_s_lease_is_taken_for_an_order_only_while_its_session_has_it(ledger: Ledger) -> None:
    host = sorted(ledger.states())[0]
    run = ledger.start_run("rehearsal", "campaign", "test")
    first = ledger.orders.send(run, "arl", host, "wipe", [])
    ledger.orders.take(run, "arl", "s1", limit=1)
    with pytest.raises(OrderWithdrawn, match=f"order {first} of {host} is no longer session s2's"):
        ledger.acquire(host, run, 60, order=(first, "s2"))  # not its order
    lease = ledger.acquire(host, run, 60, order=(first, "s1"))

    ledger.orders.drop([first])  # its session taken for lost: the stage is sent again
    second = ledger.orders.send(run, "arl", host, "wipe", [])
    with pytest.raises(OrderWithdrawn):
        ledger.acquire(host, run, 60, order=(first, "s1"))
    ledger.orders.take(run, "arl", "s2", limit=1)
    again = ledger.acquire(host, run, 60, order=(second, "s2"))
    assert again.token > lease.token  # the first order's lease now refuses its writes

    other = ledger.start_run("rehearsal", "campaign", "test")
    third = ledger.orders.send(other, "arl", host, "wipe", [])
    ledger.orders.take(other, "arl", "s3", limit=1)
    with pytest.raises(LeaseHeld) as held:  # another live run holds the host: not a withdrawal
        ledger.acquire(host, other, 60, order=(third, "s3"))
    assert not isinstance(held.value, OrderWithdrawn)
