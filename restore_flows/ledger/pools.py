"""Pool slots with clinical priority, shared by every run through the ledger database.

Prefect's concurrency limits have no priority and hand slots over slowly; here a stage that needs a
pool files a claim, and a free slot goes to the waiting claim with the smallest priority number (the
earliest wave, then the host's place in its wave's start order), whichever run or process filed it.
Claims expire unless renewed (waiting ones renew on every poll), so a crashed run gives its slots
back by itself. Released and expired claims are kept, marked, as the record of who got which slot when.

Each grant decision is one transaction that serializes on the pool: ``SELECT ... FOR UPDATE`` of the
pool row on PostgreSQL; on SQLite every transaction already takes the write lock (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import cast

from sqlalchemy import Connection, Engine, Table, func, insert, select, update

from restore_flows.errors import LedgerError
from restore_flows.ledger.db import READ_ONLY
from restore_flows.ledger.tables import PoolClaimRow, PoolRow

POOLS = cast(Table, PoolRow.__table__)
CLAIMS = cast(Table, PoolClaimRow.__table__)


class PoolWaitCancelled(LedgerError):
    pass


class Slots:
    def __init__(self, engine: Engine, clock: Callable[[], dt.datetime]) -> None:
        self._engine = engine
        self._clock = clock
        # Wakes waiters in this process as soon as a slot is released here; waiters in other
        # processes notice on their next poll.
        self._released = threading.Condition()

    def sync(self, capacities: Mapping[str, int]) -> None:
        with self._engine.begin() as db:
            existing = {r.name: r.capacity for r in db.execute(select(POOLS.c.name, POOLS.c.capacity))}
            new = [{"name": n, "capacity": c} for n, c in capacities.items() if n not in existing]
            if new:
                db.execute(insert(POOLS), new)
            for name, capacity in capacities.items():
                if name in existing and existing[name] != capacity:
                    db.execute(update(POOLS).where(POOLS.c.name == name).values(capacity=capacity))

    def request(
        self, pool: str, host: str, run_id: str, stage: str, priority: int, seconds: float
    ) -> tuple[int, bool]:
        """File a claim and try to have it granted at once (one transaction): (claim id, granted)."""
        now = self._clock()
        with self._engine.begin() as db:
            claim = db.execute(
                insert(CLAIMS)
                .values(
                    pool=pool,
                    host=host,
                    run_id=run_id,
                    stage=stage,
                    priority=priority,
                    requested_at=now,
                    expires_at=now + dt.timedelta(seconds=seconds),
                )
                .returning(CLAIMS.c.id)
            ).scalar_one()
            return int(claim), self._grant(db, int(claim), pool, now, seconds)

    def try_grant(self, claim: int, pool: str, seconds: float) -> bool:
        """Grant the claim if a slot is free and no better claim waits. Renews the claim either way."""
        with self._engine.begin() as db:
            return self._grant(db, claim, pool, self._clock(), seconds)

    @staticmethod
    def _grant(db: Connection, claim: int, pool: str, now: dt.datetime, seconds: float) -> bool:
        expires = now + dt.timedelta(seconds=seconds)
        locked = select(POOLS.c.capacity).where(POOLS.c.name == pool)
        if db.dialect.name != "sqlite":
            locked = locked.with_for_update()
        capacity = db.execute(locked).scalar_one()
        db.execute(
            update(CLAIMS)
            .where(CLAIMS.c.pool == pool, CLAIMS.c.released_at.is_(None), CLAIMS.c.expires_at <= now)
            .values(released_at=CLAIMS.c.expires_at)
        )
        mine = db.execute(
            update(CLAIMS)
            .where(CLAIMS.c.id == claim, CLAIMS.c.released_at.is_(None))
            .values(expires_at=expires)
            .returning(CLAIMS.c.granted_at)
        ).first()
        if mine is None:
            raise LedgerError(f"claim {claim} on pool {pool} expired or was released")
        if mine.granted_at is not None:
            return True
        granted = db.execute(
            select(func.count())
            .select_from(CLAIMS)
            .where(CLAIMS.c.pool == pool, CLAIMS.c.released_at.is_(None), CLAIMS.c.granted_at.is_not(None))
        ).scalar_one()
        if granted >= capacity:
            return False
        best = db.execute(
            select(CLAIMS.c.id)
            .where(CLAIMS.c.pool == pool, CLAIMS.c.released_at.is_(None), CLAIMS.c.granted_at.is_(None))
            .order_by(CLAIMS.c.priority, CLAIMS.c.requested_at, CLAIMS.c.id)
            .limit(1)
        ).scalar_one()
        if best != claim:
            return False
        db.execute(update(CLAIMS).where(CLAIMS.c.id == claim).values(granted_at=now))
        return True

    def renew(self, claims: Sequence[int], seconds: float) -> None:
        if not claims:
            return
        with self._engine.begin() as db:
            db.execute(
                update(CLAIMS)
                .where(CLAIMS.c.id.in_(list(claims)), CLAIMS.c.released_at.is_(None))
                .values(expires_at=self._clock() + dt.timedelta(seconds=seconds))
            )

    def release(self, claims: Sequence[int]) -> None:
        if not claims:
            return
        with self._engine.begin() as db:
            db.execute(
                update(CLAIMS)
                .where(CLAIMS.c.id.in_(list(claims)), CLAIMS.c.released_at.is_(None))
                .values(released_at=self._clock())
            )
        with self._released:
            self._released.notify_all()

    def usage(self) -> dict[str, tuple[int, int, int]]:
        """Pool -> (capacity, granted, waiting), ignoring expired claims."""
        now = self._clock()
        with self._engine.execution_options(**READ_ONLY).connect() as db:
            capacity = {r.name: r.capacity for r in db.execute(select(POOLS.c.name, POOLS.c.capacity))}
            counts: dict[str, list[int]] = {name: [0, 0] for name in capacity}
            for row in db.execute(
                select(CLAIMS.c.pool, CLAIMS.c.granted_at.is_not(None), func.count())
                .where(CLAIMS.c.expires_at > now, CLAIMS.c.released_at.is_(None))
                .group_by(CLAIMS.c.pool, CLAIMS.c.granted_at.is_not(None))
            ):
                counts[row[0]][0 if row[1] else 1] += int(row[2])
        return {name: (capacity[name], c[0], c[1]) for name, c in counts.items()}

    @contextmanager
    def hold(
        self,
        pools: Sequence[str],
        *,
        host: str,
        run_id: str,
        stage: str,
        priority: int,
        seconds: float,
        poll: float = 0.05,
        cancelled: threading.Event | None = None,
    ) -> Iterator[list[int]]:
        """Wait for one slot of each pool (in name order, so two stages never deadlock), hold them."""
        held: list[int] = []
        try:
            for pool in sorted(set(pools)):
                claim, granted = self.request(pool, host, run_id, stage, priority, seconds)
                held.append(claim)
                while not granted:
                    if cancelled is not None and cancelled.is_set():
                        raise PoolWaitCancelled(f"{host}: stopped waiting for pool {pool}")
                    with self._released:
                        self._released.wait(poll)
                    granted = self.try_grant(claim, pool, seconds)
            yield held
        finally:
            self.release(held)
