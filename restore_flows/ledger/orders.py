"""Stage orders: the mailbox between the campaign's scheduler and each site's session (the site mode).

The scheduler decides centrally; a site's session flow run, on the site's worker, executes. Both
reach the ledger, so the ledger carries the orders, in one table:

* the scheduler sends an order ``queued`` (host, stage, the pool claims granted);
* the site's session takes its site's queued orders (``taken``, naming itself) by a conditional
  UPDATE, so an order is taken once even if a second session of the site appeared;
* the session writes the stage's result (``done``), guarded by its own name: a session the scheduler
  gave up on cannot answer for its successor;
* the scheduler reads the results back, or ``drop``\\s the orders of a session lost with its worker
  (those already done are answered instead: their result stands);
* each session ``greet``\\s the ledger while it takes orders (``site_sessions``): the scheduler counts
  a site as lost only when both its worker (on the Prefect server) and its session (here) are silent.

The stage's effects are in the host's transitions and attempts, under the run's fencing tokens; an
order is only the message. Nothing here decides anything.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import ColumnElement, Connection, Engine, Table, exists, insert, select, update

from restore_flows.ledger.db import READ_ONLY, retried
from restore_flows.ledger.liveness import dead_runs
from restore_flows.ledger.tables import RunRow, SiteSessionRow, StageOrderRow

ORDERS = cast(Table, StageOrderRow.__table__)
RUNS = cast(Table, RunRow.__table__)
SESSIONS = cast(Table, SiteSessionRow.__table__)
_CHUNK = 500  # ids per IN (...): well under every backend's limit on parameters


class OrderState(StrEnum):
    QUEUED = "queued"
    TAKEN = "taken"
    DONE = "done"
    DROPPED = "dropped"


def still_taken(order_id: int, session: str) -> ColumnElement[bool]:
    """The order is still ``session``'s to run: taken by it, neither answered nor dropped. A host's
    lease is taken for an order only under this condition, in the same statement, so that a session
    taken for lost while it was alive cannot start a stage that was sent again to another."""
    return exists(
        select(ORDERS.c.id).where(
            ORDERS.c.id == order_id,
            ORDERS.c.session == session,
            ORDERS.c.state == OrderState.TAKEN.value,
        )
    )


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A stage to send to its site's session."""

    run_id: str
    site: str
    host: str
    stage: str
    claims: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OrderRecord:
    id: int
    run_id: str
    site: str
    host: str
    stage: str
    claims: tuple[int, ...]
    state: OrderState
    session: str | None
    result: str | None


def _record(r: Any) -> OrderRecord:
    """A row of ``stage_orders`` as a record."""
    return OrderRecord(
        int(r.id),
        str(r.run_id),
        str(r.site),
        str(r.host),
        str(r.stage),
        tuple(int(c) for c in json.loads(r.claims or "[]")),
        OrderState(r.state),
        r.session,
        r.result,
    )


class StageOrders:
    """The orders of the ledger (see the module). Safe to share between threads."""

    def __init__(self, engine: Engine, clock: Callable[[], dt.datetime], stale_seconds: float) -> None:
        self._engine = engine
        self._reader = engine.execution_options(**READ_ONLY)
        self._clock = clock
        self._stale = stale_seconds

    def send(self, run_id: str, site: str, host: str, stage: str, claims: Sequence[int]) -> int:
        """Queue a stage for its site's session; returns the order's id."""
        return self.send_all([Outgoing(run_id, site, host, stage, tuple(claims))])[0]

    @retried
    def send_all(self, orders: Sequence[Outgoing]) -> list[int]:
        """Queue these stages for their sites' sessions, in one transaction; returns their ids, in
        order. (A scheduler starts hundreds of stages at once: one statement for them all, not one
        round trip each.) Sent twice after a commit that seemed to fail, a stage runs once: the
        host's state, not the order, says whether it is still to do."""
        if not orders:
            return []
        now = self._clock()
        rows = [
            {
                "run_id": o.run_id,
                "site": o.site,
                "host": o.host,
                "stage": o.stage,
                "claims": json.dumps(list(o.claims)),
                "state": OrderState.QUEUED.value,
                "created_at": now,
                "updated_at": now,
            }
            for o in orders
        ]
        with self._engine.begin() as db:
            result = db.execute(insert(ORDERS).returning(ORDERS.c.id, sort_by_parameter_order=True), rows)
            return [int(i) for i in result.scalars()]

    @retried
    def take(self, run_id: str, site: str, session: str, limit: int) -> list[OrderRecord]:
        """Up to ``limit`` of this run's queued orders for ``site``, oldest first, now taken by
        ``session``. An order another session took meanwhile is not returned, and a retired session
        gets none (it hears so at its next greeting; until then it must not take its successor's)."""
        if limit <= 0:
            return []
        retired = exists(
            select(SESSIONS.c.session).where(
                SESSIONS.c.session == session, SESSIONS.c.retired_at.is_not(None)
            )
        )
        now = self._clock()
        with self._engine.begin() as db:
            ids = list(
                db.execute(
                    select(ORDERS.c.id)
                    .where(
                        ORDERS.c.run_id == run_id,
                        ORDERS.c.site == site,
                        ORDERS.c.state == OrderState.QUEUED.value,
                    )
                    .order_by(ORDERS.c.id)
                    .limit(limit)
                ).scalars()
            )
            if not ids:
                return []
            db.execute(
                update(ORDERS)
                .where(ORDERS.c.id.in_(ids), ORDERS.c.state == OrderState.QUEUED.value, ~retired)
                .values(state=OrderState.TAKEN.value, session=session, updated_at=now)
            )
            rows = db.execute(
                select(ORDERS)
                .where(ORDERS.c.id.in_(ids), ORDERS.c.session == session)
                .where(ORDERS.c.state == OrderState.TAKEN.value)
                .order_by(ORDERS.c.id)
            ).all()
        return [_record(r) for r in rows]

    @retried
    def answer(self, order_id: int, session: str, result: str) -> bool:
        """The stage's result, by the session that took the order; False if the order is no longer
        its own (the scheduler dropped it: the host's ledger rows say what the stage did)."""
        with self._engine.begin() as db:
            changed = db.execute(
                update(ORDERS)
                .where(
                    ORDERS.c.id == order_id,
                    ORDERS.c.session == session,
                    ORDERS.c.state == OrderState.TAKEN.value,
                )
                .values(state=OrderState.DONE.value, result=result, updated_at=self._clock())
            )
            return bool(changed.rowcount)

    @retried
    def answered(self, order_ids: Sequence[int]) -> list[OrderRecord]:
        """Those of these orders that are done, with their results."""
        found: list[OrderRecord] = []
        with self._reader.connect() as db:
            for at in range(0, len(order_ids), _CHUNK):
                chunk = list(order_ids[at : at + _CHUNK])
                found += [
                    _record(r)
                    for r in db.execute(
                        select(ORDERS).where(ORDERS.c.id.in_(chunk), ORDERS.c.state == OrderState.DONE.value)
                    ).all()
                ]
        return found

    @retried
    def drop(self, order_ids: Sequence[int]) -> list[OrderRecord]:
        """Withdraw these orders (their session is lost): returns those dropped now; an order
        already done keeps its result (read it with :meth:`answered`)."""
        now = self._clock()
        dropped: list[OrderRecord] = []
        with self._engine.begin() as db:
            for at in range(0, len(order_ids), _CHUNK):
                chunk = list(order_ids[at : at + _CHUNK])
                open_ = [OrderState.QUEUED.value, OrderState.TAKEN.value]
                rows = db.execute(
                    select(ORDERS).where(ORDERS.c.id.in_(chunk), ORDERS.c.state.in_(open_))
                ).all()
                db.execute(
                    update(ORDERS)
                    .where(ORDERS.c.id.in_([r.id for r in rows]), ORDERS.c.state.in_(open_))
                    .values(state=OrderState.DROPPED.value, updated_at=now)
                )
                dropped += [_record(r) for r in rows]
        return dropped

    @retried
    def run_alive(self, run_id: str, patience: float | None = None) -> bool:
        """The run that sends the orders has not ended and was heard from within ``patience``
        seconds (default: the ledger's limit for a dead run): a session waits for more."""
        stale = self._stale if patience is None else patience
        with self._reader.connect() as db:
            dead = dead_runs(self._clock(), stale).where(RUNS.c.id == run_id)
            return db.execute(dead).first() is None

    @retried
    def greet(self, run_id: str, site: str, session: str, worker: str) -> bool:
        """The site's session is alive and taking orders (each session writes only its own row).
        False: the scheduler has retired it (took it for lost and started another); it should end."""
        with self._engine.begin() as db:
            row = _mark(db, run_id, site, session, worker, heard_at=self._clock())
        return row is None or row.retired_at is None

    @retried
    def retire(self, run_id: str, site: str, session: str) -> None:
        """The scheduler no longer counts on this session (lost, another started): should it be alive
        after all, its next greeting tells it to end."""
        with self._engine.begin() as db:
            _mark(db, run_id, site, session, "", retired_at=self._clock())

    @retried
    def heard(self, sessions: Sequence[str]) -> dict[str, dt.datetime]:
        """When each of these sessions last greeted the ledger (those that never did, and those
        retired, are left out)."""
        found: dict[str, dt.datetime] = {}
        with self._reader.connect() as db:
            for at in range(0, len(sessions), _CHUNK):
                chunk = list(sessions[at : at + _CHUNK])
                rows = db.execute(
                    select(SESSIONS.c.session, SESSIONS.c.heard_at).where(
                        SESSIONS.c.session.in_(chunk), SESSIONS.c.retired_at.is_(None)
                    )
                )
                found.update({str(r.session): r.heard_at for r in rows})
        return found


def _mark(db: Connection, run_id: str, site: str, session: str, worker: str, **values: dt.datetime) -> Any:
    """Set these times on a session's row, made if it has none yet; returns the updated row (None:
    there was none, it is made now)."""
    found = db.execute(
        update(SESSIONS).where(SESSIONS.c.session == session).values(**values).returning(SESSIONS)
    ).first()
    if found is None:
        now = next(iter(values.values()))
        row = {"session": session, "run_id": run_id, "site": site, "worker": worker}
        db.execute(insert(SESSIONS).values(**row, **{"started_at": now, "heard_at": now, **values}))
    return found
